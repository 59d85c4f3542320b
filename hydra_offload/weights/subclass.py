"""Traceable wrapper tensor subclasses: torchao's quantized weights, and any subclass that
describes itself with ``__tensor_flatten__`` / ``__tensor_unflatten__``.

Such a parameter is a wrapper with no storage of its own: its values live in inner tensors,
attributes of the wrapper named by ``__tensor_flatten__()`` (``qdata``, ``scale``,
``zero_point``... for torchao), possibly wrappers themselves. ``param.data = x`` would
replace the wrapper's metadata and leave those attributes as they were, so the offload never
does that alone: the parts are the inner plain tensors, found recursively, and :meth:`use`
sets each attribute to its new tensor, on the very wrapper objects the model holds. When the
new tensors are on another device than the wrapper reports, the wrapper's metadata is made
to match too, so ``param.device`` tells where its values are read from.

Example:
    >>> import torch
    >>> from torch.testing._internal.two_tensor import TwoTensor
    >>> linear = torch.nn.Linear(2, 2)
    >>> weight = linear.weight.detach()
    >>> linear.weight = torch.nn.Parameter(TwoTensor(weight, weight * 2), requires_grad=False)
    >>> adapter = WrapperSubclass(linear.weight, linear, "weight")
    >>> [shape for shape, _, _ in adapter.layouts()]
    [(2, 2), (2, 2)]
    >>> host = [torch.empty(2, 2), torch.empty(2, 2)]
    >>> adapter.write_to(host)
    >>> adapter.use(host)
    >>> linear.weight.b.data_ptr() == host[1].data_ptr()
    True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from hydra_offload.weights.base import Layout, WeightAdapter, layout_of

__all__ = ["WrapperSubclass", "inner_tensors"]

Path = tuple[str, ...]


def inner_tensors(tensor: torch.Tensor) -> list[tuple[Path, torch.Tensor]]:
    """The plain tensors inside a traceable wrapper subclass, each with its attribute path
    (``("qdata",)``, or ``("inner", "scale")`` through a wrapper inside a wrapper), in
    ``__tensor_flatten__`` order."""
    found: list[tuple[Path, torch.Tensor]] = []

    def visit(obj: torch.Tensor, path: Path) -> None:
        names, _ = obj.__tensor_flatten__()
        for name in names:
            inner = getattr(obj, name)
            if is_traceable_wrapper_subclass(inner):
                visit(inner, (*path, name))
            else:
                found.append(((*path, name), inner))

    visit(tensor, ())
    return found


class WrapperSubclass(WeightAdapter):
    """A parameter that is a traceable wrapper subclass (torchao's quantized tensors, among
    others): its parts are its inner tensors (see the module docstring)."""

    kind: ClassVar[str] = "tensor subclass"

    def _setup(self) -> None:
        self.kind = type(self.param).__name__  # type: ignore[misc]
        parts = inner_tensors(self.param)
        self._paths = [path for path, _ in parts]
        self._layouts = tuple(layout_of(t) for _, t in parts)

    @classmethod
    def problem(cls, param: nn.Parameter, owner: nn.Module) -> str | None:
        what = f"is a tensor subclass ({type(param).__name__})"
        if param.requires_grad:
            return (
                f"{what} that requires grad: quantized weights are offloaded frozen; freeze "
                "it (requires_grad_(False)), as a quantized base under adapters is, or leave "
                "it out with offload_params / cpu_offload_params"
            )
        try:
            parts = inner_tensors(param)
        except Exception as err:  # a subclass whose flatten fails: nothing to move
            return f"{what} whose __tensor_flatten__ failed ({err}); it cannot be offloaded"
        for path, tensor in parts:
            if type(tensor) is not torch.Tensor and not isinstance(tensor, nn.Parameter):
                return (
                    f"{what} whose inner tensor {'.'.join(path)} is a {type(tensor).__name__}, "
                    "not a plain tensor or a traceable wrapper subclass; it cannot be offloaded"
                )
            if tensor.layout != torch.strided:
                return (
                    f"{what} whose inner tensor {'.'.join(path)} has layout {tensor.layout}; "
                    "only dense (strided) tensors can be offloaded"
                )
        return None

    def layouts(self) -> tuple[Layout, ...]:
        return self._layouts

    def write_to(self, tensors: Sequence[torch.Tensor]) -> None:
        with torch.no_grad():
            for tensor, (_, inner) in zip(tensors, inner_tensors(self.param), strict=True):
                tensor.copy_(inner.detach())

    def use(self, tensors: Sequence[torch.Tensor]) -> None:
        param = self.param
        if tensors and tensors[0].device != param.device:
            # The wrapper's own metadata says where it lives: make it match (its attributes,
            # including the inner tensors, stay; they are set below).
            param.data = self._wrap(tensors)
        for path, tensor in zip(self._paths, tensors, strict=True):
            obj: Any = param
            for name in path[:-1]:
                obj = getattr(obj, name)
            # An alias with its own version counter, as a parameter's .data is: autograd may
            # save an inner tensor, and a later copy into the same slot (another layer's
            # weights) must not look like an in-place change of what it saved.
            setattr(obj, path[-1], tensor.data)

    def _wrap(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """A new wrapper of the parameter's structure over ``tensors``."""
        values = dict(zip(self._paths, tensors, strict=True))

        def build(obj: torch.Tensor, path: Path) -> torch.Tensor:
            names, context = obj.__tensor_flatten__()
            inner = {}
            for name in names:
                child = getattr(obj, name)
                key = (*path, name)
                inner[name] = (
                    build(child, key) if is_traceable_wrapper_subclass(child) else values[key]
                )
            return type(obj).__tensor_unflatten__(inner, context, obj.shape, obj.stride())

        return build(self.param, ())

    def rebuild(self, tensors: Sequence[torch.Tensor], memo: dict[int, Any] | None = None) -> Any:
        rebuilt = nn.Parameter(self._wrap(tensors), requires_grad=False)
        for key, value in vars(self.param).items():  # attributes the structure does not carry
            if key not in rebuilt.__dict__ and not isinstance(value, torch.Tensor):
                rebuilt.__dict__[key] = value
        return rebuilt

    def state_entries(
        self, tensors: Sequence[torch.Tensor], keep_vars: bool
    ) -> dict[str, torch.Tensor]:
        rebuilt = self.rebuild(tensors)
        return {self.attr: rebuilt if keep_vars else self._wrap(tensors)}

    def load(self, tensors: Sequence[torch.Tensor], state: Mapping[str, Any], prefix: str) -> None:
        value = state.get(prefix + self.attr)
        if not isinstance(value, torch.Tensor) or type(value) is not type(self.param):
            return
        parts = inner_tensors(value)
        if [p for p, _ in parts] != self._paths or any(
            inner.shape != tensor.shape for (_, inner), tensor in zip(parts, tensors, strict=True)
        ):
            return
        with torch.no_grad():
            for (_, inner), tensor in zip(parts, tensors, strict=True):
                tensor.copy_(inner)

    def _parts(self) -> Sequence[torch.Tensor]:
        return [tensor for _, tensor in inner_tensors(self.param)]
