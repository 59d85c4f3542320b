"""The UVA backend: selected weights live in host memory and kernels read them there.

Three ways to serve a module its offloaded weights, chosen at apply time:

- ``zero_copy`` (CUDA): the parameter's ``.data`` becomes a CUDA tensor whose address is the
  page-locked host memory (unified virtual addressing). Kernels read the weights over the
  interconnect; module code is untouched and nothing is copied per forward.
- ``host`` (CPU compute device): the parameter's ``.data`` is the host tensor itself; the CPU
  reads it directly, which is the same arrangement without a device in between.
- ``copy``: where no zero-copy view can be made (another accelerator) or when asked with
  ``zero_copy=False``: between forwards ``.data`` points at host memory; a pre-forward hook on
  each module that owns offloaded weights gives them a fresh device copy, and the
  post-forward hook points them back at host memory, releasing the copy.

Tied parameters are offloaded once; every module that shares them sees the same parameter.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from hydra_offload._warnings import warn_at_caller
from hydra_offload.plan import OffloadPlan
from hydra_offload.runtime import DeviceRuntime
from hydra_offload.runtime.counters import Counters
from hydra_offload.runtime.host import HostStorage
from hydra_offload.runtime.params import OffloadedParam, Staged, point_at, restore, stage_to_host

__all__ = ["UVAMode", "UVAOffload"]

UVAMode = Literal["zero_copy", "host", "copy"]


class UVAOffload:
    """The installed UVA offload of one model (see :func:`hydra_offload.apply_offload`)."""

    pool_bytes = 0

    def __init__(
        self,
        model: nn.Module,
        plan: OffloadPlan,
        runtime: DeviceRuntime,
        counters: Counters,
        *,
        zero_copy: bool | None = None,
    ) -> None:
        self.runtime = runtime
        self.counters = counters
        self._hooks: list[RemovableHandle] = []
        self._saving: list[tuple[nn.Module, Any]] = []
        self._grad_storage: HostStorage | None = None
        self.mode: UVAMode = _choose_mode(runtime, zero_copy)
        params = dict(model.named_parameters())
        self.staged: Staged = stage_to_host(
            [(p.name, params[p.name]) for p in plan.params],
            pin_for=runtime.device if self.mode == "zero_copy" else None,
        )
        try:
            views = self._zero_copy_views(zero_copy) if self.mode == "zero_copy" else None
            if views is not None:
                point_at([(e.param, v) for e, v in zip(self.staged.params, views, strict=True)])
            else:
                point_at([(e.param, e.host) for e in self.staged.params])
            if self.mode == "copy":
                self._hook_owners(model)
            if self.mode != "host":
                self._hook_grads()
        except BaseException:
            self.remove()
            raise

    def _zero_copy_views(self, required: bool | None) -> list[torch.Tensor] | None:
        """Zero-copy views of host storage, checked to read the same bytes; on failure,
        switch to copy mode (or raise, when zero-copy was required)."""
        try:
            views = self.staged.storage.device_views(self.runtime.device)
            first = self.staged.params[0].host
            if not torch.equal(views[0].cpu(), first):
                raise RuntimeError("the zero-copy view does not read the host bytes")
        except (RuntimeError, TypeError, ValueError) as err:
            if required:
                raise
            warn_at_caller(
                f"UVA zero-copy views are unavailable on {self.runtime.device} ({err}); "
                "falling back to per-forward copies",
                RuntimeWarning,
            )
            self.mode = "copy"
            return None
        return views

    def _hook_owners(self, model: nn.Module) -> None:
        entry_of = {id(e.param): e for e in self.staged.params}
        for module in model.modules():
            owned = [entry_of[id(p)] for p in module._parameters.values() if id(p) in entry_of]
            if owned:
                self._hooks += [
                    module.register_forward_pre_hook(partial(self._fetch, owned)),
                    module.register_forward_hook(partial(self._release, owned), always_call=True),
                ]

    def _fetch(self, owned: list[OffloadedParam], module: nn.Module, args: Any) -> None:
        device = self.runtime.device
        copies: dict[int, torch.Tensor] = {}
        for entry in owned:
            copy = torch.empty_strided(
                entry.host.shape, entry.host.stride(), dtype=entry.host.dtype, device=device
            )
            copy.copy_(entry.host, non_blocking=True)
            entry.param.data = copy
            copies[id(entry.param)] = copy
            self.counters.h2d_bytes += entry.host.numel() * entry.host.element_size()
        self.counters.loads += 1
        if torch.is_grad_enabled():
            # Autograd may save a parameter itself (not a view of its data), and read its
            # .data in backward, when it points at host storage again: save the copy.
            saving = torch.autograd.graph.saved_tensors_hooks(partial(_pack, copies), _unpack)
            saving.__enter__()
            self._saving.append((module, saving))

    def _release(self, owned: list[OffloadedParam], module: nn.Module, args: Any, out: Any) -> None:
        if self._saving and self._saving[-1][0] is module:
            self._saving.pop()[1].__exit__(None, None, None)
        for entry in owned:
            entry.param.data = entry.host

    def _hook_grads(self) -> None:
        """Gradients of trainable offloaded parameters live in host memory too.

        Zero-copy: the gradient becomes a zero-copy view of page-locked host memory, so
        autograd accumulates into host memory and the optimizer's update (through the
        parameter's view) lands there; the optimizer's own state (e.g. Adam's moments) is
        allocated by the optimizer on the device. Copy mode: between forwards the parameter
        is its host tensor, and so is its gradient.
        """
        trainable = [e for e in self.staged.params if e.param.requires_grad]
        if not trainable:
            return
        layouts = [(tuple(e.host.shape), tuple(e.host.stride()), e.host.dtype) for e in trainable]
        zero_copy = self.mode == "zero_copy"
        self._grad_storage = HostStorage(
            layouts, pin_for=self.runtime.device if zero_copy else None
        )
        grads = self._grad_storage.device_views(self.runtime.device) if zero_copy else None
        for i, entry in enumerate(trainable):
            home = grads[i] if grads is not None else self._grad_storage.tensors[i]
            self._hooks.append(
                entry.param.register_post_accumulate_grad_hook(partial(_grad_home, home))
            )

    def remove(self, device: torch.device | None = None) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self.runtime.synchronize()
        grads = {id(e.param): e.param.grad for e in self.staged.params}
        for entry in self.staged.params:
            entry.param.grad = None
        restore(self.staged.params, device)
        for entry in self.staged.params:
            grad = grads[id(entry.param)]
            if grad is not None:  # out of host storage, onto the parameter's device
                entry.param.grad = grad.to(entry.param.device, copy=True)
        self.staged.storage.free()
        if self._grad_storage is not None:
            self._grad_storage.free()
            self._grad_storage = None


def _grad_home(home: torch.Tensor, param: torch.Tensor) -> None:
    """After autograd accumulated a gradient: keep it in ``home`` (host memory), so the
    next accumulations add there and no gradient stays in device memory."""
    grad = param.grad
    if grad is None or grad is home:
        return
    home.copy_(grad)
    param.grad = None
    param.grad = home


def _pack(copies: dict[int, torch.Tensor], tensor: torch.Tensor) -> torch.Tensor:
    return copies.get(id(tensor), tensor)


def _unpack(saved: torch.Tensor) -> torch.Tensor:
    return saved


def _choose_mode(runtime: DeviceRuntime, zero_copy: bool | None) -> UVAMode:
    if not runtime.is_accelerator:
        return "copy" if zero_copy is False else "host"
    if runtime.is_cuda and zero_copy is not False:
        return "zero_copy"
    if zero_copy:
        raise ValueError(
            f"zero_copy=True needs a CUDA device; {runtime.device} has no zero-copy view of "
            "host memory (use zero_copy=None to fall back to per-forward copies)"
        )
    return "copy"
