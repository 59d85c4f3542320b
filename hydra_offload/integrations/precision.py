"""The Trainer's precision, applied to the module before it is offloaded.

Lightning converts the module's weights in ``strategy.setup`` (``precision.convert_module``,
then ``model_to_device``), after :class:`~hydra_offload.OffloadCallback` has offloaded it. A
conversion made then would write new tensors into offloaded parameters (a dtype conversion
re-materialises them on the device) or quantize weights that host memory already holds in
full precision. So the callback applies the precision first, and host storage holds the
weights in their final form:

- a "true" half or double precision (``bf16-true``, ``16-true``, ``64-true``): the module
  is converted to that dtype;
- bitsandbytes (``BitsandbytesPrecision("nf4")``, ``"nf4-dq"``, ``"fp4"``, ``"int8"``...):
  the linear layers are replaced by bitsandbytes' (the plugin's own conversion), and each is
  quantized at once, on the compute device (where moving the module would quantize it), one
  layer at a time, then put back where it was: the device never holds more than one layer
  of full-precision weights. The layers' biases take the plugin's dtype, as bitsandbytes'
  forward would make them at the first call (which would replace an offloaded bias). The
  linear layers of PEFT adapters (LoRA's ``lora_A``, ``lora_B``) are left as they are: they
  train.

The strategy's own conversion then finds nothing left to do.

Example:
    >>> import torch
    >>> from lightning.pytorch.plugins.precision import HalfPrecision
    >>> module = torch.nn.Linear(2, 2)
    >>> apply_precision(HalfPrecision("bf16-true"), module, torch.device("cpu"))
    'bf16-true'
    >>> module.weight.dtype
    torch.bfloat16
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.plugins.precision import DoublePrecision, HalfPrecision, Precision
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn

__all__ = ["apply_precision", "is_bitsandbytes", "lift_module_init_context", "restore_precision"]


def is_bitsandbytes(precision: Precision) -> bool:
    """Whether ``precision`` is Lightning's ``BitsandbytesPrecision`` (checked without
    importing bitsandbytes)."""
    return any(cls.__name__ == "BitsandbytesPrecision" for cls in type(precision).__mro__)


def apply_precision(precision: Precision, module: nn.Module, device: torch.device) -> str | None:
    """Convert ``module`` as ``precision`` will, before it is offloaded (see the module
    docstring); returns what was applied (``"bf16-true"``, ``"bitsandbytes"``...), or
    ``None`` for a precision that leaves the weights as they are (mixed precisions)."""
    if isinstance(precision, (HalfPrecision, DoublePrecision)):
        precision.convert_module(module)
        return str(precision.precision)
    if is_bitsandbytes(precision):
        _quantize_with_bitsandbytes(precision, module, device)
        return "bitsandbytes"
    return None


def _adapter_module_names(module: nn.Module) -> set[str]:
    """Full names of the modules holding PEFT adapters (``layers.0.q.lora_A``)."""
    names = set()
    for name, child in module.named_modules():
        layers = getattr(child, "adapter_layer_names", None)
        if isinstance(layers, (tuple, list)) and hasattr(child, "base_layer"):
            names.update(f"{name}.{layer}" if name else layer for layer in layers)
    return names


def _quantize_with_bitsandbytes(precision: Any, module: nn.Module, device: torch.device) -> None:
    import bitsandbytes as bnb

    ignored = precision.ignore_modules
    adapters = _adapter_module_names(module)
    # Inside configure_model, the plugin's module_init_context has replaced torch.nn.Linear
    # by its own class (so layers made there are bitsandbytes' from the start); its
    # conversion looks for torch.nn.Linear, so it must see the real class.
    patched = torch.nn.Linear
    precision.ignore_modules = set(ignored) | adapters
    torch.nn.Linear = torch.nn.modules.linear.Linear  # type: ignore[misc]
    try:
        precision.convert_module(module)
    finally:
        torch.nn.Linear = patched  # type: ignore[misc]
        precision.ignore_modules = ignored
    dtype = precision.dtype
    # Inside configure_model the default dtype is the plugin's (its tensor_init_context);
    # the strategy quantizes outside it, where bitsandbytes makes its quantization state in
    # float32: quantize as it would.
    with _default_dtype(torch.float32):
        _quantize_layers(bnb, module, device, dtype)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Any:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _quantize_layers(bnb: Any, module: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    for layer in module.modules():
        if not isinstance(layer, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            continue
        weight = layer.weight
        quantized = (
            getattr(weight, "bnb_quantized", False)
            if isinstance(weight, bnb.nn.Params4bit)
            else weight.dtype == torch.int8
        )
        if not quantized:
            home = weight.device
            layer.to(device)  # bitsandbytes quantizes a layer as it moves it to a device
            if home != device and home.type != "meta":
                layer.to(home)
        bias = layer.bias
        if bias is not None and bias.dtype != dtype:
            bias.data = bias.data.to(dtype)


def lift_module_init_context(precision: Precision, module: LightningModule) -> bool:
    """Before :class:`~hydra_offload.OffloadCallback` makes Lightning call ``configure_model``
    on a module that defines none: leave the precision's ``module_init_context`` out of that
    call where it would refuse it. ``BitsandbytesPrecision(ignore_modules=...)`` refuses to
    make layers inside its context, and no layer is made in a ``configure_model`` the module
    does not define. Returns whether it did; :func:`restore_precision` undoes it."""
    if is_overridden("configure_model", module) or not (
        is_bitsandbytes(precision) and getattr(precision, "ignore_modules", None)
    ):
        return False
    precision.__dict__["module_init_context"] = contextlib.nullcontext
    return True


def restore_precision(precision: Precision) -> None:
    """Undo :func:`lift_module_init_context`."""
    if precision.__dict__.get("module_init_context") is contextlib.nullcontext:
        del precision.__dict__["module_init_context"]
