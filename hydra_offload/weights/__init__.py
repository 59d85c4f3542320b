"""What a parameter's weights are made of, for the offload: one adapter per kind of
parameter, behind one contract (:class:`~hydra_offload.weights.base.WeightAdapter`).

- a plain tensor: :class:`~hydra_offload.weights.base.PlainTensor`;
- a traceable wrapper subclass (torchao's quantized tensors, and others):
  :class:`~hydra_offload.weights.subclass.WrapperSubclass`;
- bitsandbytes' 4-bit and 8-bit weights: :mod:`~hydra_offload.weights.bitsandbytes`
  (imported only for a model that has them).

:func:`adapter_class` picks the adapter for a parameter; :func:`adapter_for` makes one for a
parameter of a model. A parameter no adapter takes (another tensor subclass) is refused in
one line when the offload is applied, before anything changes.

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    >>> adapter = adapter_for(model, "0.weight")
    >>> adapter.kind, adapter.layouts()
    ('tensor', (((4, 4), (4, 1), torch.float32),))
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from hydra_offload.weights.base import (
    Layout,
    ModulePatch,
    PlainTensor,
    WeightAdapter,
    layout_of,
    layouts_nbytes,
)
from hydra_offload.weights.subclass import WrapperSubclass

__all__ = [
    "Layout",
    "ModulePatch",
    "PlainTensor",
    "WeightAdapter",
    "WrapperSubclass",
    "WeightsInfo",
    "adapter_class",
    "adapter_for",
    "describe",
    "layout_of",
    "layouts_nbytes",
    "offload_problem",
]


def adapter_class(param: torch.Tensor) -> type[WeightAdapter] | None:
    """The adapter for ``param``'s kind, or ``None`` when no adapter handles it."""
    if type(param).__module__.partition(".")[0] == "bitsandbytes":
        from hydra_offload.weights import bitsandbytes

        found = bitsandbytes.adapter_class(param)
        if found is not None:
            return found
    if type(param) in (torch.Tensor, nn.Parameter):
        return PlainTensor
    if is_traceable_wrapper_subclass(param):
        return WrapperSubclass
    if type(param.data) is torch.Tensor:  # a Parameter subclass over a plain tensor
        return PlainTensor
    return None


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (model.get_submodule(path) if path else model), attr


def offload_problem(model: nn.Module, name: str, param: torch.Tensor) -> str | None:
    """Why the parameter ``name`` of ``model`` cannot be offloaded, as the end of a sentence
    that starts with its name; ``None`` when it can.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 2)
        >>> model.weight = torch.nn.Parameter(torch.eye(2).to_sparse())
        >>> offload_problem(model, "weight", model.weight)
        'has layout torch.sparse_coo; only dense (strided) tensors can be offloaded'
    """
    found = adapter_class(param)
    if found is None:
        return (
            f"is a tensor subclass ({type(param).__name__}) that the offload cannot take "
            "apart (neither a traceable wrapper subclass, such as torchao's quantized "
            "tensors, nor a bitsandbytes weight); leave it out with offload_params / "
            "cpu_offload_params"
        )
    owner, _ = _owner(model, name)
    return found.problem(param, owner)  # type: ignore[arg-type]


def adapter_for(
    model: nn.Module,
    name: str,
    param: torch.Tensor | None = None,
    *,
    device: torch.device | None = None,
) -> WeightAdapter:
    """The adapter of the parameter registered as ``name`` in ``model``.

    Args:
        model: the model.
        name: the parameter's name (``model.named_parameters()``).
        param: the parameter, if already at hand.
        device: the compute device, when known (see :class:`WeightAdapter`).

    Raises:
        ValueError: no adapter handles the parameter (see :func:`offload_problem`).
    """
    owner, attr = _owner(model, name)
    if param is None:
        param = getattr(owner, attr)
    found = adapter_class(param)
    if found is None:
        raise ValueError(f"{name} {offload_problem(model, name, param)}")
    return found(param, owner, attr, device=device)  # type: ignore[arg-type]


class WeightsInfo(NamedTuple):
    """How a parameter's values are held, for planning."""

    parts: tuple[Layout, ...]
    """The layouts of its parts; ``()`` for a plain tensor (its own layout)."""
    kind: str
    """``"tensor"``, a tensor subclass's name, ``"bitsandbytes 4-bit"``..."""
    nbytes: int
    """Its true bytes: its parts' (a quantized weight's values and quantization state)."""


def describe(
    model: nn.Module, name: str, param: torch.Tensor, *, device: torch.device | None = None
) -> WeightsInfo:
    """The parts, kind and true bytes of the parameter ``name`` of ``model``, read from
    metadata only. A parameter the offload cannot take (which applying it refuses) counts as
    a plain tensor.

    Example:
        >>> import torch
        >>> describe(torch.nn.Linear(4, 4), "weight", torch.nn.Linear(4, 4).weight)
        WeightsInfo(parts=(), kind='tensor', nbytes=64)
    """
    plain = param.numel() * param.element_size()
    found = adapter_class(param)
    if found is None or found is PlainTensor:
        return WeightsInfo((), "tensor", plain)
    owner, _ = _owner(model, name)
    if found.problem(param, owner) is not None:  # type: ignore[arg-type]
        return WeightsInfo((), found.kind, plain)
    adapter = adapter_for(model, name, param, device=device)
    layouts = adapter.layouts()
    return WeightsInfo(layouts, adapter.kind, layouts_nbytes(layouts))
