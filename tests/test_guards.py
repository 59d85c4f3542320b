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


# (move, config) pairs whose move converts no offloaded parameter: they must go through.
UNTOUCHED = {("embedding_half", "prefetch")}  # the embedding is outside the layer stack
REFUSED = [
    pytest.param(MOVES[move], CONFIGS[config], id=f"{move}-{config}")
    for move in MOVES
    for config in CONFIGS
    if (move, config) not in UNTOUCHED
]


@pytest.mark.parametrize(("move", "config"), REFUSED)
def test_a_move_that_would_detach_offloaded_weights_is_refused_unchanged(config, move):
    m = model()
    ids = torch.randint(0, 64, (2, 8))
    expected = m(ids)
    with apply_offload(m, config) as handle:
        dtypes = {n: p.dtype for n, p in m.named_parameters()}
        assert set(_touched(m, move)) & set(handle.plan.offloaded_params)
        with pytest.raises(OffloadError, match="is offloaded: moving or converting it"):
            move(m)
        assert {n: p.dtype for n, p in m.named_parameters()} == dtypes
        assert torch.equal(m(ids), expected)


@pytest.mark.parametrize(("move", "config"), sorted(UNTOUCHED))
def test_a_move_that_converts_no_offloaded_parameter_goes_through(move, config):
    m = model()
    with apply_offload(m, CONFIGS[config]) as handle:
        touched = _touched(m, MOVES[move])
        assert touched
        assert not touched & set(handle.plan.offloaded_params)
        before = {n: p.dtype for n, p in m.named_parameters()}
        MOVES[move](m)
        after = {n: p.dtype for n, p in m.named_parameters()}
    assert {n for n in before if after[n] != before[n]} == touched


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


DEVICE_MOVES = {
    "to_meta": lambda m: m.to("meta"),
    "to_empty_meta": lambda m: m.to_empty(device="meta"),
    "submodule_to_meta": lambda m: m.layers[1].to(torch.device("meta")),
}


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("move", DEVICE_MOVES.values(), ids=DEVICE_MOVES.keys())
def test_a_device_move_of_offloaded_weights_is_refused_unchanged(config, move):
    # A move to another device (here `meta`, the one a CPU-only machine has; on a GPU
    # `.cpu()` or `.to("cuda:1")`: tests/test_cuda_streams.py) would leave the layers computing
    # with whatever the moved tensors hold.
    m = model()
    ids = torch.randint(0, 64, (2, 8))
    expected = m(ids)
    with apply_offload(m, config):
        devices = {n: p.device for n, p in m.named_parameters()}
        with pytest.raises(OffloadError, match="is offloaded: moving or converting it"):
            move(m)
        assert {n: p.device for n, p in m.named_parameters()} == devices
        assert torch.equal(m(ids), expected)
