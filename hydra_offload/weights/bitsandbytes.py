"""bitsandbytes' quantized weights: 4-bit (``Linear4bit``: nf4, fp4) and 8-bit
(``Linear8bitLt`` for inference).

Neither is a wrapper subclass: the weight is a plain tensor of packed integers, and what it
takes to read it lies beside it, where the layer's forward looks for it.

- **4-bit** (:class:`Bnb4bit`). ``Params4bit.quant_state`` (shared with the layer's own
  ``quant_state``) holds ``absmax``, the code book and, with double quantization, an
  ``offset`` and a nested state of its own. Parts: the weight's bytes, and one byte buffer
  for the whole quantization state, whose tensors are views into it, so the state moves
  (and is counted) with the weight in one copy. On a CPU with AVX512-BF16, bitsandbytes
  repacks a layer at its first inference forward (another weight order, ``absmax`` in
  bfloat16) and assigns the result to ``weight.data``; while offloaded, the adapter does
  that conversion itself, on the true weights in host memory, just before the layer's
  forward would, and points the layer at the result, so the forward finds the layer packed
  and computes exactly what it computes without the offload. The state buffer is sized for
  both forms when the conversion can happen. Saving a packed layer's state dict makes
  bitsandbytes unpack the live layer; while offloaded, the state dict is built from a copy
  of the true weights instead, with the same entries, and the layer is left as it is.
- **8-bit** (:class:`Bnb8bit`). ``Int8Params`` keeps its scales (``SCB``, and ``CB``, the
  weight itself) on the parameter until the first forward, which moves them to the layer's
  ``state`` and afterwards writes ``state.CB`` back into ``weight.data``. Parts: the int8
  weight and ``SCB``; :meth:`Bnb8bit.use` sets them wherever the layer reads them now, so
  that write-back finds the offloaded tensor. ``has_fp16_weights=True`` (int8 training,
  which quantizes a trainable fp16 weight at every forward and keeps the result on the
  device) is refused.

A 4-bit weight that is not quantized yet (it is when moved to a device) is refused.

Example (bitsandbytes installed: ``pip install "hydra-offload[quant]"``):
    >>> import torch
    >>> import bitsandbytes as bnb
    >>> layer = bnb.nn.Linear4bit(256, 256, quant_type="nf4").to("cpu")  # quantizes it
    >>> adapter = Bnb4bit(layer.weight, layer, "weight", device=torch.device("cpu"))
    >>> [(shape, dtype) for shape, _, dtype in adapter.layouts()]  # weight, state buffer
    [((32768,), torch.uint8), ((2240,), torch.uint8)]
    >>> adapter.nbytes, 256 * 256 * 4  # with its state, 13% of its float32 bytes
    (35008, 262144)
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from hydra_offload.weights.base import Layout, ModulePatch, WeightAdapter, layout_of

__all__ = ["Bnb4bit", "Bnb8bit", "adapter_class"]

_FIELD_ALIGNMENT = 64
"""Each quantization state tensor starts on a multiple of this many bytes of its buffer."""


def adapter_class(param: nn.Parameter) -> type[WeightAdapter] | None:
    """The adapter for a bitsandbytes parameter, or ``None`` for another type."""
    import bitsandbytes as bnb

    if isinstance(param, bnb.nn.Params4bit):
        return Bnb4bit
    if isinstance(param, bnb.nn.Int8Params):
        return Bnb8bit
    return None


def _align(n: int) -> int:
    return -(-n // _FIELD_ALIGNMENT) * _FIELD_ALIGNMENT


Path = tuple[str, ...]


@dataclass(frozen=True)
class _Field:
    """One tensor of the quantization state, as a view into the state buffer."""

    path: Path
    """Attribute path from the ``QuantState``: ``("absmax",)``, ``("state2", "code")``."""
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int
    """Byte offset in the buffer."""

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * self.dtype.itemsize

    def view(self, buffer: torch.Tensor) -> torch.Tensor:
        return buffer[self.offset : self.offset + self.nbytes].view(self.dtype).view(self.shape)


@dataclass(frozen=True)
class _Form:
    """How a 4-bit weight and its quantization state are laid out in the two parts."""

    weight_shape: tuple[int, ...]
    weight_dtype: torch.dtype
    fields: tuple[_Field, ...]

    @property
    def state_bytes(self) -> int:
        return max((f.offset + f.nbytes for f in self.fields), default=0)

    @staticmethod
    def of(weight: torch.Tensor, quant_state: Any) -> _Form:
        fields, offset = [], 0
        for path, tensor in _state_tensors(quant_state):
            fields.append(_Field(path, tuple(tensor.shape), tensor.dtype, offset))
            offset = _align(offset + fields[-1].nbytes)
        return _Form(tuple(weight.shape), weight.dtype, tuple(fields))


def _state_tensors(quant_state: Any) -> list[tuple[Path, torch.Tensor]]:
    """The tensors of a ``QuantState`` (and of its nested state), in attribute order."""
    from bitsandbytes.functional import QuantState

    found: list[tuple[Path, torch.Tensor]] = []
    for name, value in vars(quant_state).items():
        if isinstance(value, torch.Tensor):
            found.append(((name,), value))
        elif isinstance(value, QuantState):
            found += [((name, *path), t) for path, t in _state_tensors(value)]
    return found


def _set(quant_state: Any, path: Path, value: torch.Tensor) -> None:
    obj = quant_state
    for name in path[:-1]:
        obj = getattr(obj, name)
    setattr(obj, path[-1], value)


def _copy_state(quant_state: Any) -> Any:
    """A ``QuantState`` with the same attributes, its nested state copied too (tensors
    shared: replace them)."""
    from bitsandbytes.functional import QuantState

    copied = copy.copy(quant_state)
    for name, value in vars(quant_state).items():
        if isinstance(value, QuantState):
            setattr(copied, name, _copy_state(value))
    return copied


class Bnb4bit(WeightAdapter):
    """A bitsandbytes 4-bit weight (``Params4bit``) and its quantization state (see the
    module docstring)."""

    kind: ClassVar[str] = "bitsandbytes 4-bit"

    def _setup(self) -> None:
        self.form = _Form.of(self.param.data, self.param.quant_state)
        self._state_capacity = max(self.form.state_bytes, self._packed_state_bytes())
        self.hosts: list[torch.Tensor] = []
        self.served: list[torch.Tensor] = []

    @classmethod
    def problem(cls, param: nn.Parameter, owner: nn.Module) -> str | None:
        what = f"is a bitsandbytes 4-bit weight ({type(param).__name__})"
        if param.requires_grad:
            return f"{what} that requires grad: quantized weights are offloaded frozen"
        if not getattr(param, "bnb_quantized", False) or param.quant_state is None:
            return (
                f"{what} that is not quantized yet (bitsandbytes quantizes it when the layer "
                "is moved to a device): move the model to its device, or to the CPU "
                "(.to('cpu')), before offloading"
            )
        if not param.data.is_contiguous():
            return f"{what} whose data is not contiguous; it cannot be offloaded"
        return None

    # -- layout -------------------------------------------------------------------------------

    def _can_pack(self) -> bool:
        """Whether bitsandbytes may repack the layer for the CPU while it is offloaded."""
        quant_state = self.param.quant_state
        if getattr(quant_state, "packing_format_for_cpu", False):
            return False
        if not getattr(self.owner, "support_avx512bf16_for_cpu", False):
            return False
        device = self.device if self.device is not None else self.param.device
        if device.type != "cpu":
            return False
        shape = getattr(quant_state, "shape", None)
        return shape is not None and len(shape) == 2 and shape[0] % 32 == 0 and shape[1] % 2 == 0

    def _packed_state_bytes(self) -> int:
        """Bytes of the state buffer once repacked for the CPU (0 when it cannot be)."""
        if not self._can_pack():
            return 0
        quant_state = self.param.quant_state
        rows, columns = quant_state.shape
        fields = {
            "absmax": ((columns // quant_state.blocksize, rows), torch.bfloat16),
            "code": (tuple(quant_state.code.shape), quant_state.code.dtype),
        }
        if isinstance(quant_state.offset, torch.Tensor):
            fields["offset"] = (tuple(quant_state.offset.shape), quant_state.offset.dtype)
        offset = 0
        for shape, dtype in fields.values():
            count = 1
            for size in shape:
                count *= size
            offset = _align(offset + count * dtype.itemsize)
        return offset

    @property
    def shareable(self) -> bool:
        """Not while the layer may be repacked for the CPU: each process rewrites its host
        copy then, at its own first inference forward."""
        return not self._can_pack()

    def layouts(self) -> tuple[Layout, ...]:
        weight = self.param.data
        return (
            ((weight.numel(),), (1,), weight.dtype),
            ((self._state_capacity,), (1,), torch.uint8),
        )

    # -- moving -------------------------------------------------------------------------------

    def write_to(self, tensors: Sequence[torch.Tensor]) -> None:
        weight, state = tensors
        with torch.no_grad():
            weight.copy_(self.param.data.reshape(-1))
            state.zero_()
            for field, (_, tensor) in zip(
                self.form.fields, _state_tensors(self.param.quant_state), strict=True
            ):
                field.view(state).copy_(tensor)

    def use(self, tensors: Sequence[torch.Tensor]) -> None:
        weight, state = tensors
        form = self.form
        self.param.data = weight.view(form.weight_dtype).view(form.weight_shape)
        quant_state = self.param.quant_state
        for field in form.fields:
            # Own version counters, as for .data (see WrapperSubclass.use).
            _set(quant_state, field.path, field.view(state).data)
        self.served = list(tensors)

    def _standalone(
        self, tensors: Sequence[torch.Tensor], *, unpacked: bool = False
    ) -> tuple[torch.Tensor, Any]:
        """The weight and a ``QuantState`` over copies of ``tensors``, each tensor its own
        (as bitsandbytes makes them); ``unpacked``: in the form bitsandbytes saves."""
        weight, state = tensors
        form = self.form
        data = weight.view(form.weight_dtype).view(form.weight_shape).clone()
        quant_state = _copy_state(self.param.quant_state)
        for field in form.fields:
            _set(quant_state, field.path, field.view(state).clone())
        if unpacked and getattr(quant_state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            data, quant_state = _convert_weight_packed_for_cpu_inverse(data, quant_state)
        return data, quant_state

    def rebuild(self, tensors: Sequence[torch.Tensor], memo: dict[int, Any] | None = None) -> Any:
        data, quant_state = self._standalone(tensors)
        return self._params(data, quant_state, memo)

    def _params(self, data: torch.Tensor, quant_state: Any, memo: dict[int, Any] | None) -> Any:
        param = self.param
        module = getattr(param, "module", None)
        if memo is not None and module is not None:
            module = memo.get(id(module), module)
        return type(param)(
            data=data,
            requires_grad=False,
            quant_state=quant_state,
            blocksize=param.blocksize,
            compress_statistics=param.compress_statistics,
            quant_type=param.quant_type,
            quant_storage=param.quant_storage,
            module=module,
            bnb_quantized=True,
        )

    def state_entries(
        self, tensors: Sequence[torch.Tensor], keep_vars: bool
    ) -> dict[str, torch.Tensor]:
        """Its module's own state dict is built from the true weights while offloaded
        (see :meth:`install`): nothing to add."""
        return {}

    def load(self, tensors: Sequence[torch.Tensor], state: Mapping[str, Any], prefix: str) -> None:
        value = state.get(prefix + self.attr)
        weight = tensors[0]
        if (
            isinstance(value, torch.Tensor)
            and value.numel() == weight.numel()
            and value.dtype == weight.dtype
        ):
            with torch.no_grad():
                weight.copy_(value.reshape(-1))

    def restore(self, tensors: Sequence[torch.Tensor], device: torch.device) -> None:
        data, quant_state = self._standalone(tensors)
        self.param.data = data.to(device)
        live = self.param.quant_state
        for path, tensor in _state_tensors(quant_state):
            _set(live, path, tensor.to(device))
        self.served = []

    def plain_module_state(self) -> dict[str, Any]:
        # The layer's quant_state is the weight's; the weight's copy carries its own.
        return {"quant_state": None} if getattr(self.owner, "quant_state", None) is not None else {}

    def _parts(self) -> Sequence[torch.Tensor]:
        return [self.param.data, *(t for _, t in _state_tensors(self.param.quant_state))]

    # -- while offloaded ------------------------------------------------------------------------

    def install(self, hosts: Sequence[torch.Tensor]) -> list[Any]:
        self.hosts = list(hosts)
        handles: list[Any] = [ModulePatch(self.owner, "_save_to_state_dict", self._save)]
        if self._state_capacity > self.form.state_bytes or self._can_pack():
            handles.append(self.owner.register_forward_pre_hook(self._before_forward, prepend=True))
        return handles

    def _before_forward(self, module: nn.Module, args: Any) -> None:
        """Repack the layer for the CPU when bitsandbytes' forward is about to (its own
        condition), from the true weights, and point the layer at the result."""
        x = args[0] if args else None
        quant_state = self.param.quant_state
        if not (
            isinstance(x, torch.Tensor)
            and x.device.type == "cpu"
            and getattr(module, "support_avx512bf16_for_cpu", False)
            and not module.training
            and not x.requires_grad
            and not getattr(quant_state, "packing_format_for_cpu", False)
        ):
            return
        from bitsandbytes.functional import _convert_weight_packed_for_cpu

        data, standalone = self._standalone(self.hosts)
        packed_data, packed = _convert_weight_packed_for_cpu(data, standalone)
        form = _Form.of(packed_data, packed)
        weight_host, state_host = self.hosts
        if (
            packed_data.numel() * packed_data.element_size()
            != weight_host.numel() * weight_host.element_size()
            or form.state_bytes > state_host.numel()
        ):
            return  # not the conversion this adapter knows: bitsandbytes' forward does it
        # The live state takes the packed form's other attributes, as bitsandbytes sets them.
        for name, value in vars(packed).items():
            if not isinstance(value, torch.Tensor) and not hasattr(value, "absmax"):
                setattr(quant_state, name, value)
        for name in [n for n in vars(quant_state) if n not in vars(packed)]:
            delattr(quant_state, name)
        self.form = form
        with torch.no_grad():
            weight_host.view(torch.uint8).copy_(packed_data.reshape(-1).view(torch.uint8))
            state_host.zero_()
            for field, (_, tensor) in zip(form.fields, _state_tensors(packed), strict=True):
                field.view(state_host).copy_(tensor)
            served = self.served or self.hosts
            for target, host in zip(served, self.hosts, strict=True):
                if target is not host:
                    target.copy_(host)
        self.use(served)

    def _save(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        """The layer's ``_save_to_state_dict`` while offloaded: bitsandbytes' entries, from
        the true weights, without changing the layer (see the module docstring)."""
        nn.Module._save_to_state_dict(self.owner, destination, prefix, keep_vars)
        data, quant_state = self._standalone(self.hosts, unpacked=True)
        rebuilt = self._params(data, quant_state, None)
        destination[prefix + self.attr] = rebuilt if keep_vars else rebuilt.detach()
        for key, value in quant_state.as_dict(packed=True).items():
            destination[f"{prefix}{self.attr}.{key}"] = value


class Bnb8bit(WeightAdapter):
    """A bitsandbytes 8-bit inference weight (``Int8Params`` of a ``Linear8bitLt`` with
    ``has_fp16_weights=False``): the int8 weight and its scales ``SCB`` (see the module
    docstring)."""

    kind: ClassVar[str] = "bitsandbytes 8-bit"

    @classmethod
    def problem(cls, param: nn.Parameter, owner: nn.Module) -> str | None:
        import bitsandbytes as bnb

        what = f"is a bitsandbytes 8-bit weight ({type(param).__name__})"
        if not isinstance(owner, bnb.nn.Linear8bitLt):
            return f"{what} outside a Linear8bitLt; only Linear8bitLt's weights can be offloaded"
        if param.has_fp16_weights or owner.state.has_fp16_weights:
            return (
                f"{what} with has_fp16_weights=True (int8 training): bitsandbytes quantizes "
                "it again at every forward and keeps the result on the device, so it cannot "
                "be offloaded; use has_fp16_weights=False (int8 inference) or leave it out "
                "with offload_params / cpu_offload_params"
            )
        if param.requires_grad:
            return f"{what} that requires grad: quantized weights are offloaded frozen"
        if param.dtype != torch.int8 or _scales(param, owner) is None:
            return (
                f"{what} that is not quantized yet (bitsandbytes quantizes it when the layer "
                "is moved to a device): move the model to its device, or to the CPU "
                "(.to('cpu')), before offloading"
            )
        return None

    def layouts(self) -> tuple[Layout, ...]:
        scales = _scales(self.param, self.owner)
        assert scales is not None
        return (layout_of(self.param.data), layout_of(scales))

    def write_to(self, tensors: Sequence[torch.Tensor]) -> None:
        scales = _scales(self.param, self.owner)
        with torch.no_grad():
            tensors[0].copy_(self.param.data)
            tensors[1].copy_(scales)

    def use(self, tensors: Sequence[torch.Tensor]) -> None:
        weight, scales = tensors[0].data, tensors[1].data  # own version counters
        param, state = self.param, self.owner.state
        param.data = weight
        if param.CB is not None or state.CB is None:  # before the layer's first forward
            param.CB, param.SCB = weight, scales
        else:  # the first forward moved them to the layer's state
            state.CB, state.SCB = weight, scales

    def rebuild(self, tensors: Sequence[torch.Tensor], memo: dict[int, Any] | None = None) -> Any:
        weight, scales = (t.clone() for t in tensors)
        return type(self.param)(
            data=weight, requires_grad=False, has_fp16_weights=False, CB=weight, SCB=scales
        )

    def state_entries(
        self, tensors: Sequence[torch.Tensor], keep_vars: bool
    ) -> dict[str, torch.Tensor]:
        weight, scales = tensors
        value = self.rebuild(tensors) if keep_vars else weight.detach()
        return {self.attr: value, "SCB": scales.detach()}

    def load(self, tensors: Sequence[torch.Tensor], state: Mapping[str, Any], prefix: str) -> None:
        with torch.no_grad():
            for tensor, key in zip(tensors, (self.attr, "SCB"), strict=True):
                value = state.get(prefix + key)
                if isinstance(value, torch.Tensor) and value.shape == tensor.shape:
                    tensor.copy_(value)

    def plain_module_state(self) -> dict[str, Any]:
        # The copied weight carries CB and SCB; its first forward moves them to the state.
        state = copy.copy(self.owner.state)
        state.CB = state.SCB = None
        return {"state": state}

    def _parts(self) -> Sequence[torch.Tensor]:
        scales = _scales(self.param, self.owner)
        return [self.param.data, *([scales] if scales is not None else [])]


def _scales(param: Any, owner: nn.Module) -> torch.Tensor | None:
    """``SCB``: on the weight before the layer's first forward, in its state after."""
    if getattr(param, "SCB", None) is not None:
        return param.SCB
    state = getattr(owner, "state", None)
    return getattr(state, "SCB", None)
