"""Several offloads side by side, mode switches, and models with nothing to offload."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hydra_offload import OffloadPlanWarning, apply_offload
from hydra_offload.models import DecoderLM

PREFETCH = {"prefetch": {"offload_group_size": 2}}


def model(seed: int) -> DecoderLM:
    torch.manual_seed(seed)
    return DecoderLM(num_layers=4, hidden_size=32, num_heads=4, intermediate_size=64,
                     vocab_size=64).eval()  # fmt: skip


@torch.no_grad()
def test_two_models_offloaded_in_one_process_keep_their_own_pools():
    a, b = model(0), model(1)
    ids = torch.randint(0, 64, (2, 8))
    expected_a, expected_b = a(ids), b(ids)
    with apply_offload(a, PREFETCH) as ha, apply_offload(b, PREFETCH) as hb:
        slots_a = {t.data_ptr() for e in ha._installed.pool.slots for s in e for t in s.tensors}
        slots_b = {t.data_ptr() for e in hb._installed.pool.slots for s in e for t in s.tensors}
        assert not slots_a & slots_b
        assert ha._installed.rings[0].copy_stream is not hb._installed.rings[0].copy_stream
        for _ in range(3):  # interleaved
            assert torch.equal(a(ids), expected_a)
            assert torch.equal(b(ids), expected_b)
        assert ha.stats.stalls == hb.stats.stalls == 0


@pytest.mark.parametrize("config", [PREFETCH, {"uva": {"cpu_offload_gb": 1.0}}])
def test_train_and_eval_switches_keep_outputs_identical(config):
    m = model(0)
    reference = model(0)
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad(), apply_offload(m, config):
        for mode in (True, False, True, False):
            m.train(mode)
            reference.train(mode)
            assert torch.equal(m(ids), reference(ids))


def test_a_model_without_parameters_is_a_no_op_with_a_warning():
    empty = nn.Sequential(nn.ReLU(), nn.ReLU())
    with pytest.warns(OffloadPlanWarning, match="selects no parameter"):
        handle = apply_offload(empty, {"uva": {"cpu_offload_gb": 1.0}})
    assert handle.plan.params == ()
    assert torch.equal(empty(torch.ones(2)), torch.ones(2))
    handle.remove()
