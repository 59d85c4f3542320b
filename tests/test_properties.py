"""Invariant: under prefetch offloading, outputs equal the unoffloaded model's whatever the
layout and whatever order the layers run in (a layer never computes with another layer's
weights), on the CPU runtime and on the simulated device (copies complete later, on other
threads; a missing wait raises)."""

from __future__ import annotations

import copy
import warnings

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from hydra_offload import OffloadPlanWarning, apply_offload
from hydra_offload.models import DecoderBlock

HIDDEN = 8
FILTERS = [(), ("mlp",), ("self_attn.q_proj",)]


class Ordered(nn.Module):
    def __init__(self, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            DecoderBlock(HIDDEN, num_heads=2, intermediate_size=16) for _ in range(num_layers)
        )

    def forward(self, x: torch.Tensor, order: list[int]) -> torch.Tensor:
        for index in order:
            x = self.layers[index](x)
        return x


@st.composite
def scenarios(draw):
    num_layers = draw(st.integers(1, 8))
    group = draw(st.integers(1, num_layers + 1))  # group > layers: nothing offloaded
    k = draw(st.integers(1, group))
    step = draw(st.integers(1, 4))
    params = draw(st.sampled_from(FILTERS))
    order = st.lists(st.integers(0, num_layers - 1), min_size=0, max_size=3 * num_layers)
    orders = [draw(order), draw(order)]
    return num_layers, group, k, step, params, orders


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    # One simulated device serves every example of a run (that is the intent).
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(scenarios())
def test_outputs_equal_the_unoffloaded_model_whatever_the_order(run_on, scenario):
    num_layers, group, k, step, params, orders = scenario
    torch.manual_seed(0)
    model = Ordered(num_layers).eval()
    reference = copy.deepcopy(model)
    state = {key: value.clone() for key, value in model.state_dict().items()}
    x = torch.randn(2, 3, HIDDEN)
    config = {
        "prefetch": {
            "offload_group_size": group,
            "offload_num_in_group": k,
            "offload_prefetch_step": step,
            "offload_params": list(params),
        },
        "layers": "layers",
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OffloadPlanWarning)
        handle = apply_offload(model, config)
    try:
        for order in [*orders, *orders]:
            assert torch.equal(model(x, order), reference(x, order))
        offloaded = model.state_dict()
        assert all(torch.equal(offloaded[key], value) for key, value in state.items())
    finally:
        handle.remove()
    assert torch.equal(model(x, orders[0]), reference(x, orders[0]))
