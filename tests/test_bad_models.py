"""Models the backends cannot serve are refused up front, naming the parameter, unchanged."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hydra_offload import OffloadError, apply_offload
from hydra_offload.models import DecoderLM

UVA_ALL = {"uva": {"cpu_offload_gb": 1.0}}


def model() -> DecoderLM:
    torch.manual_seed(0)
    return DecoderLM(num_layers=2, hidden_size=32, num_heads=4, intermediate_size=64,
                     vocab_size=64).eval()  # fmt: skip


def snapshot(m: nn.Module) -> dict[str, tuple[int, torch.Tensor]]:
    return {n: (id(p), p.detach().clone()) for n, p in m.named_parameters()}


def assert_unchanged(m: nn.Module, before: dict) -> None:
    after = snapshot(m)
    assert after.keys() == before.keys()
    for name, (ident, value) in before.items():
        assert after[name][0] == ident
        assert torch.equal(after[name][1], value)
    assert all(not module._forward_pre_hooks for module in m.modules())


class _Marked(torch.Tensor):
    """A tensor subclass standing in for a quantized weight."""


def test_a_tensor_subclass_parameter_is_refused():
    m = model()
    m.lm_head.weight = nn.Parameter(m.lm_head.weight.detach().as_subclass(_Marked))
    before = snapshot(m)
    with pytest.raises(OffloadError, match=r"lm_head\.weight is a tensor subclass \(_Marked"):
        apply_offload(m, UVA_ALL)
    assert_unchanged(m, before)


def test_a_sparse_parameter_is_refused():
    m = model()
    m.extra = nn.Linear(4, 4)
    m.extra.weight = nn.Parameter(torch.eye(4).to_sparse())
    with pytest.raises(OffloadError, match=r"extra\.weight has layout torch\.sparse_coo"):
        apply_offload(m, UVA_ALL)


def test_another_librarys_offload_hooks_are_refused():
    m = model()
    m.layers[0]._hf_hook = object()  # what accelerate's cpu_offload leaves behind
    before = snapshot(m)
    with pytest.raises(OffloadError, match=r"layers\.0 carries Hugging Face accelerate"):
        apply_offload(m, UVA_ALL)
    assert_unchanged(m, before)


def test_more_host_memory_than_available_is_refused_with_the_figures(monkeypatch):
    import hydra_offload.offload as offload

    monkeypatch.setattr(offload, "available_host_bytes", lambda: 1000)
    m = model()
    before = snapshot(m)
    figures = r"needs [\d,]+ bytes of host memory \([\d,]+ bytes of weights.*\) but only 1,000"
    with pytest.raises(OffloadError, match=figures):
        apply_offload(m, UVA_ALL)
    assert_unchanged(m, before)


def test_non_contiguous_parameters_keep_their_strides():
    m = model()
    m.lm_head.weight = nn.Parameter(m.lm_head.weight.detach().t().contiguous().t())
    stride = m.lm_head.weight.stride()
    ids = torch.randint(0, 64, (2, 8))
    expected = m(ids)
    for config in (UVA_ALL, {"prefetch": {"offload_group_size": 1}}):
        with apply_offload(m, config):
            assert torch.equal(m(ids), expected)
        assert m.lm_head.weight.stride() == stride
