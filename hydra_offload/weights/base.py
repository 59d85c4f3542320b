"""The contract between the offload and one kind of parameter: which plain tensors hold its
weights, and how to make the parameter use others.

The backends move plain, dense tensors: host storage, pool slots, zero-copy views and copies
are all made of them. A parameter is not always one such tensor: a quantized weight is a
tensor subclass whose values live in inner tensors (torchao), or a tensor whose
quantization state sits beside it (bitsandbytes). A :class:`WeightAdapter`, one per
offloaded parameter, is what the backends see instead of the parameter:

- :meth:`~WeightAdapter.layouts`: the ``(shape, stride, dtype)`` of each *part*, the plain
  tensors that together hold the parameter's values (one part for a plain tensor);
- :meth:`~WeightAdapter.write_to`: copy the parameter's values into tensors of those layouts
  (host storage, when the offload is applied);
- :meth:`~WeightAdapter.use`: make the parameter, and whatever holds its state, read its
  values from such tensors (a pool slot, a zero-copy view, host storage, a device copy),
  keeping the parameter object and any object that wraps it;
- :meth:`~WeightAdapter.rebuild`: a separate parameter over such tensors, for pickles, deep
  copies and state dicts, which must hold the true weights whatever the parameter reads now;
- :meth:`~WeightAdapter.install`: whatever the kind needs while offloaded (hooks that keep
  a library's own in-place changes of the weights true), undone by removing the handles.

One module per library family implements it (:mod:`~hydra_offload.weights.subclass` for
traceable tensor subclasses such as torchao's, :mod:`~hydra_offload.weights.bitsandbytes`);
:func:`hydra_offload.weights.adapter_for` picks one. This module holds the contract and the
adapter of a plain tensor.

Example:
    >>> import torch
    >>> linear = torch.nn.Linear(2, 2)
    >>> weights = PlainTensor(linear.weight, linear, "weight")
    >>> weights.layouts()
    (((2, 2), (2, 1), torch.float32),)
    >>> host = [torch.empty(2, 2)]
    >>> weights.write_to(host)
    >>> weights.use(host)
    >>> linear.weight.data_ptr() == host[0].data_ptr()
    True
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

__all__ = [
    "Layout",
    "ModulePatch",
    "PlainTensor",
    "WeightAdapter",
    "layout_of",
    "layouts_nbytes",
]

Layout = tuple[tuple[int, ...], tuple[int, ...], torch.dtype]
"""``(shape, stride, dtype)`` of one part."""


def layout_of(tensor: torch.Tensor) -> Layout:
    """The :data:`Layout` of a plain tensor."""
    return tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype


def layouts_nbytes(layouts: Sequence[Layout]) -> int:
    """Bytes of the values of tensors of these layouts (elements times element size)."""
    total = 0
    for shape, _, dtype in layouts:
        count = 1
        for size in shape:
            count *= size
        total += count * dtype.itemsize
    return total


class WeightAdapter(abc.ABC):
    """One offloaded parameter as the offload moves it (see the module docstring).

    Args:
        param: the parameter.
        owner: the module it is registered in (its attribute ``attr``).
        attr: its name in ``owner``.
        device: the compute device, when known (a format whose layout depends on where it
            computes plans for it); ``None``: the parameter's device.

    The layouts are fixed for the life of the offload: what :meth:`use` and
    :meth:`rebuild` are given always has them.
    """

    kind: ClassVar[str] = "tensor"
    """What the parameter is, in words (plans and messages)."""

    def __init__(
        self,
        param: nn.Parameter,
        owner: nn.Module,
        attr: str,
        *,
        device: torch.device | None = None,
    ) -> None:
        self.param = param
        self.owner = owner
        self.attr = attr
        self.device = device
        self._setup()

    def _setup(self) -> None:  # noqa: B027 (optional: most kinds read nothing up front)
        """Read what this kind needs of the parameter once (called by the constructor)."""

    @classmethod
    def problem(cls, param: nn.Parameter, owner: nn.Module) -> str | None:
        """Why ``param`` cannot be offloaded by this adapter, as the end of a sentence that
        starts with its name; ``None`` when it can. Read before anything is changed."""
        return None

    @abc.abstractmethod
    def layouts(self) -> tuple[Layout, ...]:
        """The layout of each part, in a fixed order."""

    @property
    def nbytes(self) -> int:
        """Bytes of the parts."""
        return layouts_nbytes(self.layouts())

    @property
    def shareable(self) -> bool:
        """Whether the processes of a node may share one host copy of these weights (when
        frozen): not when this process may rewrite them (see
        :mod:`hydra_offload.runtime.shared`)."""
        return True

    @abc.abstractmethod
    def write_to(self, tensors: Sequence[torch.Tensor]) -> None:
        """Copy the parameter's current values into ``tensors`` (of :meth:`layouts`)."""

    @abc.abstractmethod
    def use(self, tensors: Sequence[torch.Tensor]) -> None:
        """Make the parameter read its values from ``tensors`` (of :meth:`layouts`), in
        place: the parameter object, and any object holding its state, stay the same."""

    @abc.abstractmethod
    def rebuild(self, tensors: Sequence[torch.Tensor], memo: dict[int, Any] | None = None) -> Any:
        """A new parameter of the same kind over ``tensors``, separate from the model (for
        pickling, deep copies and state dicts). ``memo``: a deep copy's memo, when called
        for one (objects the parameter refers to, such as its module, map to their
        copies)."""

    def state_entries(
        self, tensors: Sequence[torch.Tensor], keep_vars: bool
    ) -> dict[str, torch.Tensor]:
        """The state dict entries of the parameter's owner that hold these weights, keys
        relative to the owner's prefix, built over ``tensors`` (the true weights)."""
        rebuilt = self.rebuild(tensors)
        return {self.attr: rebuilt if keep_vars else rebuilt.detach()}

    @abc.abstractmethod
    def load(self, tensors: Sequence[torch.Tensor], state: Mapping[str, Any], prefix: str) -> None:
        """Copy the entries of a state dict being loaded that hold this parameter's weights
        (keys: ``prefix``, its owner's, then :attr:`attr`...) into ``tensors``. An entry of
        another layout is left alone: the module's own loader reports it."""

    def restore(self, tensors: Sequence[torch.Tensor], device: torch.device) -> None:
        """Give the parameter its own memory on ``device`` again, values from ``tensors``."""
        homes = []
        with torch.no_grad():
            for (shape, stride, dtype), tensor in zip(self.layouts(), tensors, strict=True):
                home = torch.empty_strided(shape, stride, dtype=dtype, device=device)
                home.copy_(tensor)
                homes.append(home)
        self.use(homes)

    def install(self, hosts: Sequence[torch.Tensor]) -> list[Any]:
        """Called once the parameter is offloaded, with the host tensors of its true
        weights: whatever this kind needs while offloaded. Returns removable handles: hooks
        (``RemovableHandle``) and :class:`ModulePatch` es."""
        return []

    def plain_module_state(self) -> dict[str, Any]:
        """Attributes of :attr:`owner` to replace in a pickle or deep copy of it (state the
        module keeps beside the parameter, which the parameter's copy carries itself)."""
        return {}

    def parts(self) -> list[torch.Tensor]:
        """The plain tensors the parameter reads its values from now."""
        return list(self._parts())

    @abc.abstractmethod
    def _parts(self) -> Sequence[torch.Tensor]: ...


class PlainTensor(WeightAdapter):
    """A parameter whose ``.data`` is one plain, dense tensor (the common case): its one
    part is ``.data`` itself, and :meth:`use` sets ``.data``."""

    kind: ClassVar[str] = "tensor"

    @classmethod
    def problem(cls, param: nn.Parameter, owner: nn.Module) -> str | None:
        if param.layout != torch.strided:
            return f"has layout {param.layout}; only dense (strided) tensors can be offloaded"
        return None

    def layouts(self) -> tuple[Layout, ...]:
        return (layout_of(self.param),)

    def write_to(self, tensors: Sequence[torch.Tensor]) -> None:
        with torch.no_grad():
            tensors[0].copy_(self.param.detach())

    def use(self, tensors: Sequence[torch.Tensor]) -> None:
        self.param.data = tensors[0]

    def rebuild(self, tensors: Sequence[torch.Tensor], memo: dict[int, Any] | None = None) -> Any:
        if memo is not None:  # as Parameter.__deepcopy__
            return type(self.param)(tensors[0], self.param.requires_grad)
        rebuilt = nn.Parameter(tensors[0], requires_grad=self.param.requires_grad)
        rebuilt.__dict__.update(vars(self.param))
        return rebuilt

    def state_entries(
        self, tensors: Sequence[torch.Tensor], keep_vars: bool
    ) -> dict[str, torch.Tensor]:
        if keep_vars:
            return {self.attr: nn.Parameter(tensors[0], requires_grad=self.param.requires_grad)}
        return {self.attr: tensors[0].detach()}

    def load(self, tensors: Sequence[torch.Tensor], state: Mapping[str, Any], prefix: str) -> None:
        value = state.get(prefix + self.attr)
        if isinstance(value, torch.Tensor) and value.shape == tensors[0].shape:
            with torch.no_grad():
                tensors[0].copy_(value)

    def _parts(self) -> Sequence[torch.Tensor]:
        return (self.param.data,)


class ModulePatch:
    """An attribute of one module replaced, for as long as the offload is applied, by an
    instance attribute (``module.name = value``); :meth:`remove` takes it off again.
    Pickles and deep copies of the module leave it out."""

    def __init__(self, module: nn.Module, name: str, value: Any) -> None:
        self.module = module
        self.name = name
        self.value = value
        module.__dict__[name] = value

    def remove(self) -> None:
        if self.module.__dict__.get(self.name) is self.value:
            del self.module.__dict__[self.name]
