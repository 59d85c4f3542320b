"""torch.compile over a model with prefetch offloading: same outputs, hooks run on every call.

The hooks split the graph at each offloaded layer and run eagerly (see ``_Ring.before``), so
copies into shared slots are never reordered or functionalized by the compiler.
"""

from __future__ import annotations

import pytest
import torch

from hydra_offload import apply_offload
from hydra_offload.models import DecoderLM


@pytest.fixture
def model_and_ids():
    torch.manual_seed(0)
    model = DecoderLM(num_layers=4, hidden_size=64, intermediate_size=128, vocab_size=128)
    return model.eval(), torch.randint(0, 128, (2, 8))


@torch.no_grad()
def test_compiled_model_with_prefetch_gives_the_same_outputs(model_and_ids):
    model, ids = model_and_ids
    torch._dynamo.reset()
    expected = torch.compile(model, backend="aot_eager")(ids)
    torch._dynamo.reset()
    with apply_offload(model, {"prefetch": {"offload_group_size": 2}}) as handle:
        compiled = torch.compile(model, backend="aot_eager")
        for calls in range(1, 4):
            assert torch.equal(compiled(ids), expected)
            # every call really ran the hooks: one load per offloaded layer per forward
            assert handle.stats.loads == calls * len(handle.plan.stacks[0].offloaded_layers)
        assert handle.stats.stalls == 0
    torch._dynamo.reset()


@torch.no_grad()
def test_compiled_model_sees_weights_loaded_while_offloaded(model_and_ids):
    model, ids = model_and_ids
    with apply_offload(model, {"prefetch": {"offload_group_size": 2}}):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager")
        compiled(ids)
        state = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
        model.load_state_dict(state)
        got = compiled(ids)
    torch._dynamo.reset()
    fresh = DecoderLM(num_layers=4, hidden_size=64, intermediate_size=128, vocab_size=128)
    fresh.load_state_dict(state)
    assert torch.equal(got, fresh.eval()(ids))
