"""Moving parameters between their home and host storage, and back, by swapping ``.data``.

The parameter objects stay the same throughout (optimizers, tied weights and user references
keep working); only the tensor each one's ``.data`` points at changes.

Example:
    >>> import torch
    >>> linear = torch.nn.Linear(2, 2)
    >>> weight, before = linear.weight, linear.weight.detach().clone()
    >>> from hydra_offload.runtime.device import DeviceRuntime
    >>> staged = stage_to_host([("weight", linear.weight)], DeviceRuntime(torch.device("cpu")))
    >>> staged.params[0].host.data_ptr() != before.data_ptr()
    True
    >>> restore(staged.params)
    >>> linear.weight is weight and torch.equal(linear.weight, before)
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from hydra_offload.errors import OffloadError
from hydra_offload.runtime.device import DeviceRuntime
from hydra_offload.runtime.host import HostStorage

__all__ = ["MoveGuard", "OffloadedParam", "Staged", "restore", "stage_to_host"]


@dataclass
class OffloadedParam:
    """One parameter under offload: where its true weights live and where it came from."""

    name: str
    param: nn.Parameter
    host: torch.Tensor
    """The true weights, in host storage (same shape, stride and dtype as the parameter)."""
    home: torch.device
    """The device the parameter lived on before offloading; ``restore`` puts it back there."""


@dataclass
class Staged:
    storage: HostStorage
    params: list[OffloadedParam]


def stage_to_host(params: Sequence[tuple[str, nn.Parameter]], runtime: DeviceRuntime) -> Staged:
    """Copy each parameter's values into one new :class:`HostStorage` (page-locked for the
    runtime's device where it has one); the model is unchanged.

    Raises:
        RuntimeError: host memory could not be allocated or page-locked (nothing is kept).
    """
    layouts = [(tuple(p.shape), tuple(p.stride()), p.dtype) for _, p in params]
    storage = runtime.host_storage(layouts)
    staged = []
    try:
        with torch.no_grad():
            for (name, param), host in zip(params, storage.tensors, strict=True):
                host.copy_(param.detach())
                staged.append(OffloadedParam(name, param, host, param.device))
    except BaseException:
        storage.free()
        raise
    return Staged(storage, staged)


def point_at(entries: Sequence[tuple[nn.Parameter, torch.Tensor]]) -> None:
    """Make each parameter's ``.data`` the given tensor."""
    for param, tensor in entries:
        param.data = tensor


def restore(params: Sequence[OffloadedParam], device: torch.device | None = None) -> None:
    """Give each parameter its own tensor again, values from the host, on ``device`` (by
    default the device it lived on before offloading)."""
    with torch.no_grad():
        for entry in params:
            host = entry.host
            home = torch.empty_strided(
                host.shape, host.stride(), dtype=host.dtype, device=device or entry.home
            )
            home.copy_(host)
            entry.param.data = home


class MoveGuard:
    """Refuses ``.to()``, ``.cuda()``, ``.cpu()``, ``.half()``... that would replace an
    offloaded parameter's tensor while the offload is active.

    Such a move would detach the parameter from the storage the offload serves it from (a
    pool slot, a zero-copy view, host memory): the layer would then compute with a stale copy.
    Moves that leave offloaded parameters as they are (``model.to(device)`` onto the compute
    device they already live on) go through. The check runs on the module the call is made
    on, over every offloaded parameter below it, before anything is changed.
    """

    def __init__(self, model: nn.Module, params: Sequence[OffloadedParam]) -> None:
        offloaded = {id(e.param): e for e in params}
        self._patched: list[nn.Module] = []
        for module in model.modules():
            below = [offloaded[id(p)] for p in module.parameters() if id(p) in offloaded]
            if below:
                original = module._apply
                module._apply = partial(self._apply, below, original)  # type: ignore[method-assign]
                self._patched.append(module)

    @staticmethod
    def _apply(below: list[OffloadedParam], original: Any, fn: Any, *args: Any, **kw: Any) -> Any:
        for entry in below:
            data = entry.param.data
            if fn(data) is not data:
                raise OffloadError(
                    f"{entry.name} is offloaded: moving or converting it (.to(), .cuda(), "
                    ".cpu(), .half(), ...) would detach it from its offloaded storage. Call "
                    "remove() on the offload handle first; nothing was changed"
                )
        return original(fn, *args, **kw)

    def remove(self) -> None:
        for module in self._patched:
            module.__dict__.pop("_apply", None)
        self._patched = []
