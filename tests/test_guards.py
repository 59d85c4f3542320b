"""Moving or converting a model while offloaded is refused before anything changes."""

from __future__ import annotations

import pytest
import torch

from hydra_offload import OffloadError, apply_offload
from hydra_offload.models import DecoderLM

CONFIGS = {
    "prefetch": {"prefetch": {"offload_group_size": 2}},
    "uva_host": {"uva": {"cpu_offload_gb": 1e-4}},
}


def model() -> DecoderLM:
    torch.manual_seed(0)
    return DecoderLM(num_layers=4, hidden_size=32, num_heads=4, intermediate_size=64,
                     vocab_size=64).eval()  # fmt: skip


MOVES = {
    "half": lambda m: m.half(),
    "to_float64": lambda m: m.to(torch.float64),
    "submodule_double": lambda m: m.layers[1].double(),
    "leaf_bfloat16": lambda m: m.layers[1].mlp.up_proj.to(torch.bfloat16),
    "embedding_half": lambda m: m.embed_tokens.half(),
}


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("move", MOVES.values(), ids=MOVES.keys())
def test_a_move_that_would_detach_offloaded_weights_is_refused_unchanged(config, move):
    m = model()
    ids = torch.randint(0, 64, (2, 8))
    expected = m(ids)
    with apply_offload(m, config) as handle:
        dtypes = {n: p.dtype for n, p in m.named_parameters()}
        if not any(name in handle.plan.offloaded_params for name in _touched(m, move)):
            pytest.skip("this move touches no offloaded parameter under this config")
        with pytest.raises(OffloadError, match="is offloaded: moving or converting it"):
            move(m)
        assert {n: p.dtype for n, p in m.named_parameters()} == dtypes
        assert torch.equal(m(ids), expected)


def _touched(m: DecoderLM, move) -> set[str]:
    """Names of the parameters a move would convert (found on a fresh copy)."""
    fresh = model()
    before = {n: p.dtype for n, p in fresh.named_parameters()}
    move(fresh)
    return {n for n, p in fresh.named_parameters() if p.dtype != before[n]}


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_moves_that_leave_offloaded_weights_in_place_work(config):
    m = model()
    ids = torch.randint(0, 64, (2, 8))
    expected = m(ids)
    with apply_offload(m, config):
        m.to("cpu")
        m.float()
        m.to(torch.float32)
        assert torch.equal(m(ids), expected)


def test_after_remove_the_model_moves_freely():
    m = model()
    apply_offload(m, CONFIGS["prefetch"]).remove()
    m.half()
    assert all(p.dtype == torch.float16 for p in m.parameters())
    assert all("_apply" not in module.__dict__ for module in m.modules())
