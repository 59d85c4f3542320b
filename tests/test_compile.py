"""torch.compile over a model with prefetch offloading: same outputs, no graph breaks, and the
prefetch steps really run on every call (see :mod:`hydra_offload.runtime.ops`)."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from hydra_offload import apply_offload
from hydra_offload.models import DecoderLM

PREFETCH = {"prefetch": {"offload_group_size": 2}}


def small_model() -> DecoderLM:
    torch.manual_seed(0)
    model = DecoderLM(num_layers=4, hidden_size=64, intermediate_size=128, vocab_size=128)
    return model.eval()


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@torch.no_grad()
def test_compiled_model_with_prefetch_gives_the_same_outputs(backend):
    model, ids = small_model(), torch.randint(0, 128, (2, 8))
    expected = torch.compile(model, backend=backend)(ids)
    torch._dynamo.reset()
    with apply_offload(model, PREFETCH) as handle:
        compiled = torch.compile(model, backend=backend)
        offloaded_layers = len(handle.plan.stacks[0].offloaded_layers)
        for calls in range(1, 4):
            assert torch.equal(compiled(ids), expected)
            # the prefetch steps ran at every call: one load per offloaded layer per forward
            assert handle.stats.loads == calls * offloaded_layers
        assert handle.stats.stalls == 0


@torch.no_grad()
def test_compiling_an_offloaded_model_needs_no_graph_break():
    model, ids = small_model(), torch.randint(0, 128, (2, 8))
    with apply_offload(model, PREFETCH):
        torch.compile(model, backend="aot_eager")(ids)
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1


@torch.no_grad()
def test_compiled_model_sees_weights_loaded_while_offloaded():
    model, ids = small_model(), torch.randint(0, 128, (2, 8))
    with apply_offload(model, PREFETCH):
        compiled = torch.compile(model, backend="aot_eager")
        compiled(ids)
        state = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
        model.load_state_dict(state)
        got = compiled(ids)
    fresh = small_model()
    fresh.load_state_dict(state)
    assert torch.equal(got, fresh(ids))
