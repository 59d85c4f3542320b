"""torch.autocast with its cache on (the default outside Lightning) does not keep a copy of
the offloaded weights for the whole autocast region.

The cache keeps the lower-precision cast of every trainable leaf weight until the outermost
region ends, even under ``no_grad``: a device copy of every offloaded weight, which would undo
the offload. Casts are operators, so a dispatch mode sees them: a weight whose cast is cached
is not cast again in the next forward of the same region.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hydra_offload import apply_offload
from hydra_offload.models import DecoderLM
from hydra_offload.runtime.simulated import SimulatedDevice

CONFIGS = {
    "prefetch": ({"prefetch": {"offload_group_size": 2}}, None),
    "uva-host": ({"uva": {"cpu_offload_gb": 1.0}}, None),
    "uva-copy": ({"uva": {"cpu_offload_gb": 1.0}}, False),
}


class CastsOf(TorchDispatchMode):
    """Counts dtype conversions of the given parameters."""

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        super().__init__()
        self.params = {id(p) for p in params}
        self.casts = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None):
        if func is torch.ops.aten._to_copy.default and id(args[0]) in self.params:
            self.casts += 1
        return func(*args, **(kwargs or {}))


def model() -> DecoderLM:
    torch.manual_seed(0)
    return DecoderLM(vocab_size=64, hidden_size=32, num_layers=4, num_heads=4,
                     intermediate_size=64).eval()  # fmt: skip


def two_forwards_in_one_region(m: torch.nn.Module, params: list) -> tuple[list, list]:
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    outputs, casts = [], []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.is_autocast_cache_enabled()
        for _ in range(2):
            with CastsOf(params) as counter:
                outputs.append(m(ids))
            casts.append(counter.casts)
    return outputs, casts


def test_the_autocast_cache_keeps_casts_of_trainable_weights_across_forwards():
    # What the offload must prevent, shown on the model without offload.
    m = model()
    _, casts = two_forwards_in_one_region(m, list(m.parameters()))
    assert casts[0] > 0
    assert casts[1] == 0  # every cast came from the cache


@pytest.mark.parametrize(("config", "zero_copy"), CONFIGS.values(), ids=list(CONFIGS))
def test_offloaded_weights_are_cast_again_in_each_forward_of_one_region(config, zero_copy):
    expected, _ = two_forwards_in_one_region(model(), [])
    m = model()
    with apply_offload(m, config, zero_copy=zero_copy) as handle:
        params = dict(m.named_parameters())
        offloaded = [params[name] for name in handle.plan.offloaded_params]
        outputs, casts = two_forwards_in_one_region(m, offloaded)
    assert casts[0] > 0
    assert casts[1] == casts[0]  # none kept from the first forward
    for got, want in zip(outputs, expected, strict=True):
        assert torch.equal(got, want)


# Within one forward: the cast of a layer's offloaded weights is released when that layer
# ends, before the next layer runs (not only when the forward ends).


def layer_of(name: str) -> str:
    """The layer a parameter belongs to: ``layers.N`` inside the stack, else its module."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "layers" else ".".join(parts[:-1])


class CastLifetimes(TorchDispatchMode):
    """Watches the casts (``aten._to_copy``) of the given parameters through weak references:
    when a weight of one layer is cast, notes every cast of another layer still alive."""

    def __init__(self, layers: dict[int, str]) -> None:
        super().__init__()
        self.layers = layers
        """``id(parameter)`` -> its layer."""
        self.casts: list[tuple[str, weakref.ref]] = []
        self.kept: set[tuple[str, str]] = set()
        """``(layer whose cast is still alive, layer being cast)``."""

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None):
        out = func(*args, **(kwargs or {}))
        layer = self.layers.get(id(args[0])) if func is torch.ops.aten._to_copy.default else None
        if layer is not None:
            self.kept |= {(e, layer) for e, ref in self.casts if e != layer and ref() is not None}
            self.casts.append((layer, weakref.ref(out)))
        return out


def casts_kept_across_layers(m: torch.nn.Module, names: list[str]) -> CastLifetimes:
    """One forward under CPU bf16 autocast with its cache on, watching the named weights
    (trainable leaves, which the cache keeps; ``no_grad``, so autograd keeps nothing)."""
    params = dict(m.named_parameters())
    assert all(params[name].requires_grad for name in names)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    watch = CastLifetimes({id(params[name]): layer_of(name) for name in names})
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.is_autocast_cache_enabled()
        with watch:
            m(ids)
    return watch


def test_without_offload_the_autocast_cache_keeps_each_layers_casts_through_the_forward():
    # What the offload must prevent, and what the watch sees, on the model without offload.
    m = model()
    watch = casts_kept_across_layers(m, [n for n, _ in m.named_parameters()])
    assert ("layers.0", "layers.1") in watch.kept


@pytest.mark.parametrize("simulated", [False, True], ids=["cpu", "simulated"])
@pytest.mark.parametrize(("config", "zero_copy"), CONFIGS.values(), ids=list(CONFIGS))
def test_the_cast_of_an_offloaded_layer_is_released_before_the_next_layer_runs(
    config, zero_copy, simulated
):
    m = model()
    device = SimulatedDevice() if simulated else contextlib.nullcontext()
    with device, apply_offload(m, config, zero_copy=zero_copy) as handle:
        watch = casts_kept_across_layers(m, list(handle.plan.offloaded_params))
    cast = {layer for layer, _ in watch.casts}
    assert len({layer for layer in cast if layer.startswith("layers.")}) >= 2
    assert watch.kept == set()
