"""The UVA backend on CPU: 'host' mode reads host storage in place, 'copy' mode copies per forward.

With the compute device = CPU there is no zero-copy view to make: by default (``zero_copy``
``None``) the parameters' ``.data`` is the host tensor itself ('host' mode); ``zero_copy=False``
gives 'copy' mode, the per-forward fetch used on accelerators without zero-copy views, which is
therefore tested here.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from hydra_offload import apply_offload
from hydra_offload.models import DecoderLM
from hydra_offload.runtime.host import ALIGNMENT

ALL = {"uva": {"cpu_offload_gb": 1.0}}


def uva(gb: float = 1.0, params=()) -> dict:
    return {"uva": {"cpu_offload_gb": gb, "cpu_offload_params": list(params)}}


def small_decoder(**kwargs) -> DecoderLM:
    torch.manual_seed(0)
    model = DecoderLM(
        vocab_size=64, hidden_size=32, num_layers=4, num_heads=4, intermediate_size=64, **kwargs
    )
    return model.eval()


def token_ids() -> torch.Tensor:
    return torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))


def entry(handle, name: str):
    (found,) = [e for e in handle._installed.staged.params if e.name == name]
    return found


# --------------------------------------------------------------------------------------------
# Modes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("zero_copy", "mode"),
    [
        (None, "host"),
        (False, "copy"),
        # The docstring says "True: zero-copy or error"; on CPU the host tensor itself is the
        # zero-copy arrangement, and that is what the code gives.
        (True, "host"),
    ],
)
def test_mode_on_cpu(zero_copy, mode):
    model = small_decoder()
    with apply_offload(model, ALL, zero_copy=zero_copy) as handle:
        assert handle._installed.mode == mode


@pytest.mark.parametrize("zero_copy", [None, False, True])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_outputs_are_bit_identical_in_every_mode(zero_copy, tied):
    model = small_decoder(tie_embeddings=tied)
    ids = token_ids()
    expected = model(ids)
    with apply_offload(model, ALL, zero_copy=zero_copy):
        for _ in range(3):
            assert torch.equal(model(ids), expected)


# --------------------------------------------------------------------------------------------
# 'host' mode: the model reads host storage
# --------------------------------------------------------------------------------------------


def test_host_mode_parameters_are_the_host_tensors():
    model = small_decoder()
    with apply_offload(model, ALL) as handle:
        params = dict(model.named_parameters())
        assert [e.name for e in handle._installed.staged.params] == list(params)
        for e in handle._installed.staged.params:
            assert e.param is params[e.name]
            assert e.param.data_ptr() == e.hosts[0].data_ptr()


def test_host_mode_writing_host_storage_changes_the_output():
    model = small_decoder()
    reference = copy.deepcopy(model)
    ids = token_ids()
    with apply_offload(model, ALL) as handle:
        before = model(ids)
        host = entry(handle, "layers.2.mlp.down_proj.weight").hosts[0]
        with torch.no_grad():
            host.mul_(-2.0)
            reference.layers[2].mlp.down_proj.weight.mul_(-2.0)
        after = model(ids)
    assert not torch.equal(after, before)
    assert torch.equal(after, reference(ids))


def test_host_storage_is_one_exact_size_buffer():
    model = small_decoder()
    with apply_offload(model, ALL) as handle:
        plan, stats = handle.plan, handle.stats
        assert stats.backend == "uva"
        assert stats.offloaded_bytes == plan.offloaded_bytes == plan.total_param_bytes
        assert plan.offloaded_bytes <= stats.host_bytes
        assert stats.host_bytes <= plan.offloaded_bytes + ALIGNMENT * len(plan.params)
        assert stats.host_bytes_pinned == stats.pool_bytes == 0
        assert stats.measured is False
        assert stats.device_bytes_saved == plan.device_bytes_saved == plan.offloaded_bytes
        for e in handle._installed.staged.params:
            assert e.hosts[0].data_ptr() % ALIGNMENT == 0


def test_host_mode_copies_nothing_per_forward():
    model = small_decoder()
    ids = token_ids()
    with apply_offload(model, ALL) as handle:
        for _ in range(3):
            model(ids)
        stats = handle.stats
    assert stats.forwards == 3
    assert (stats.h2d_bytes, stats.loads, stats.stalls) == (0, 0, 0)
    assert stats.h2d_bytes_per_forward == 0


def test_budget_offloads_leading_parameters_and_leaves_the_rest_alone():
    model = small_decoder()
    ids = token_ids()
    expected = model(ids)
    before = {n: p.data_ptr() for n, p in model.named_parameters()}
    budget_bytes = 3 * 32 * 32 * 4  # embed_tokens (64 x 32) and a few more
    with apply_offload(model, uva(budget_bytes / 1024**3)) as handle:
        offloaded = handle.plan.offloaded_params
        assert offloaded[0] == "embed_tokens.weight"
        assert 0 < len(offloaded) < len(before)
        hosts = {e.name: e.hosts[0].data_ptr() for e in handle._installed.staged.params}
        for name, param in model.named_parameters():
            if name in offloaded:
                assert param.data_ptr() == hosts[name], name
            else:
                assert param.data_ptr() == before[name], name
        assert torch.equal(model(ids), expected)


def test_cpu_offload_params_filter_selects_only_matching_parameters():
    model = small_decoder()
    ids = token_ids()
    expected = model(ids)
    with apply_offload(model, uva(1.0, params=["mlp"])) as handle:
        assert handle.plan.offloaded_params
        assert all(".mlp." in n for n in handle.plan.offloaded_params)
        assert len(handle.plan.offloaded_params) == 3 * 4
        assert torch.equal(model(ids), expected)


# --------------------------------------------------------------------------------------------
# 'copy' mode: a fresh copy per forward, host memory in between
# --------------------------------------------------------------------------------------------


def test_copy_mode_copies_the_offloaded_bytes_once_per_forward():
    model = small_decoder()
    ids = token_ids()
    modules_owning = sum(1 for m in model.modules() if any(True for _ in m.parameters(False)))
    with apply_offload(model, ALL, zero_copy=False) as handle:
        for forwards in range(1, 4):
            model(ids)
            stats = handle.stats
            assert stats.h2d_bytes == forwards * handle.plan.offloaded_bytes
            assert stats.h2d_bytes_per_forward == handle.plan.offloaded_bytes
            assert stats.loads == forwards * modules_owning
            assert stats.stalls == 0


def test_copy_mode_parameters_point_at_host_memory_between_forwards():
    model = small_decoder()
    ids = token_ids()
    with apply_offload(model, ALL, zero_copy=False) as handle:
        entries = handle._installed.staged.params
        for _ in range(2):
            assert all(e.param.data_ptr() == e.hosts[0].data_ptr() for e in entries)
            model(ids)
        assert all(e.param.data_ptr() == e.hosts[0].data_ptr() for e in entries)


def test_copy_mode_modules_compute_with_a_fresh_copy():
    model = small_decoder()
    ids = token_ids()
    seen = []
    with apply_offload(model, ALL, zero_copy=False) as handle:
        down = model.layers[1].mlp.down_proj
        host = entry(handle, "layers.1.mlp.down_proj.weight").hosts[0]
        # Registered after the offload's own pre-hook, so it sees what forward will use.
        down.register_forward_pre_hook(lambda m, a: seen.append(m.weight.data_ptr()))
        model(ids)
        assert len(seen) == 1
        assert seen[0] != host.data_ptr()
        assert torch.equal(down.weight, host)


def test_copy_mode_releases_copies_when_a_module_raises():
    model = small_decoder()
    ids = token_ids()
    expected = model(ids)
    with apply_offload(model, ALL, zero_copy=False) as handle:
        down = model.layers[2].mlp.down_proj
        fetched = []

        def raising_forward(x):
            fetched.append(down.weight.data_ptr())
            raise ValueError("module failed")

        down.forward = raising_forward
        with pytest.raises(ValueError, match="module failed"):
            model(ids)
        del down.forward
        host = entry(handle, "layers.2.mlp.down_proj.weight").hosts[0]
        assert len(fetched) == 1
        assert fetched[0] != host.data_ptr()  # it ran with a fetched copy
        entries = handle._installed.staged.params
        assert all(e.param.data_ptr() == e.hosts[0].data_ptr() for e in entries)
        assert torch.equal(model(ids), expected)


def test_copy_mode_keeps_tied_weights_one_parameter():
    model = small_decoder(tie_embeddings=True)
    ids = token_ids()
    expected = model(ids)
    with apply_offload(model, ALL, zero_copy=False) as handle:
        assert model.lm_head.weight is model.embed_tokens.weight
        assert handle.plan.offloaded_params.count("embed_tokens.weight") == 1
        assert "lm_head.weight" not in handle.plan.offloaded_params
        for _ in range(3):
            assert torch.equal(model(ids), expected)
            assert model.lm_head.weight is model.embed_tokens.weight
    assert model.lm_head.weight is model.embed_tokens.weight


@pytest.mark.parametrize("zero_copy", [None, False])
def test_load_state_dict_writes_host_storage(zero_copy):
    model = small_decoder()
    fresh = small_decoder()
    with torch.no_grad():
        for p in fresh.parameters():
            p.normal_()
    ids = token_ids()
    with apply_offload(model, ALL, zero_copy=zero_copy) as handle:
        model.load_state_dict(fresh.state_dict())
        for e in handle._installed.staged.params:
            assert torch.equal(e.hosts[0], fresh.get_parameter(e.name)), e.name
        assert torch.equal(model(ids), fresh(ids))


# --------------------------------------------------------------------------------------------
# Training through UVA: gradients and optimizer steps reach host storage
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("zero_copy", [None, False])
def test_gradients_equal_the_unoffloaded_models(zero_copy):
    model = small_decoder().train()
    reference = copy.deepcopy(model)
    ids = token_ids()
    reference(ids).square().mean().backward()
    with apply_offload(model, ALL, zero_copy=zero_copy):
        model(ids).square().mean().backward()
        for (name, p), (_, q) in zip(
            model.named_parameters(), reference.named_parameters(), strict=True
        ):
            assert torch.equal(p.grad, q.grad), name


@pytest.mark.parametrize("zero_copy", [None, False])
def test_optimizer_steps_update_what_the_next_forward_uses(zero_copy):
    model = small_decoder().train()
    reference = copy.deepcopy(model)
    ids = token_ids()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    with apply_offload(model, ALL, zero_copy=zero_copy):
        for _ in range(2):
            for m, o in ((model, opt), (reference, ref_opt)):
                o.zero_grad()
                m(ids).square().mean().backward()
                o.step()
        assert torch.equal(model(ids), reference(ids))
    for (name, p), (_, q) in zip(
        model.named_parameters(), reference.named_parameters(), strict=True
    ):
        assert torch.equal(p, q), name


def test_a_parameter_used_by_a_module_that_does_not_own_it_is_still_correct():
    """A module reading a parameter it does not own (functional use) sees valid weights."""

    class Borrower(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.owner = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.linear(x, self.owner.weight, self.owner.bias)

    torch.manual_seed(0)
    model = Borrower()
    x = torch.randn(3, 8)
    expected = model(x)
    for zero_copy in (None, False):
        with apply_offload(model, ALL, zero_copy=zero_copy):
            assert torch.equal(model(x), expected)
