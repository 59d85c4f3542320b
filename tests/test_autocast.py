"""torch.autocast with its cache on (the default outside Lightning) does not keep a copy of
the offloaded weights for the whole autocast region.

The cache keeps the lower-precision cast of every trainable leaf weight until the outermost
region ends, even under ``no_grad``: a device copy of every offloaded weight, which would undo
the offload. Casts are operators, so a dispatch mode sees them: a weight whose cast is cached
is not cast again in the next forward of the same region.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hydra_offload import apply_offload
from hydra_offload.models import DecoderLM

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
