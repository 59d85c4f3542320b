"""apply_offload and OffloadHandle keep docs/spec.md §6 whatever the backend.

Every test here runs against each backend (prefetch with two layouts, UVA reading host memory,
UVA copying per forward): outputs equal the unoffloaded model's, state_dict / load_state_dict
see the true weights, remove() restores the model exactly, a second offload is refused, an
empty selection is a warned no-op, meta parameters are refused before anything changes, and
a failure half-way through an apply rolls the model back.
Backend-specific mechanics live in test_prefetch.py and test_uva.py.
"""

from __future__ import annotations

import contextlib
import copy
import warnings

import pytest
import torch
from torch import nn

from hydra_offload import OffloadError, OffloadPlanWarning, apply_offload
from hydra_offload.models import DecoderLM
from hydra_offload.runtime import ops

# --------------------------------------------------------------------------------------------
# Backends and models
# --------------------------------------------------------------------------------------------

# (config, keyword arguments of apply_offload)
BACKENDS = {
    "prefetch_every_other_layer": (
        {"prefetch": {"offload_group_size": 2, "offload_num_in_group": 1}},
        {},
    ),
    "prefetch_all_layers_step_2": (
        {
            "prefetch": {
                "offload_group_size": 1,
                "offload_num_in_group": 1,
                "offload_prefetch_step": 2,
            }
        },
        {},
    ),
    "uva_host": ({"uva": {"cpu_offload_gb": 1.0}}, {}),
    "uva_partial_budget": ({"uva": {"cpu_offload_gb": 2e-6}}, {}),  # ~2 KiB: a few params
    "uva_copy": ({"uva": {"cpu_offload_gb": 1.0}}, {"zero_copy": False}),
}

with_each_backend = pytest.mark.parametrize("backend", list(BACKENDS))

HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def offload(model: nn.Module, backend: str):
    config, kwargs = BACKENDS[backend]
    return apply_offload(model, config, **kwargs)


WIDTH = 16


class Block(nn.Module):
    def __init__(self, width: int = WIDTH) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.fc(self.norm(x)))


class WideBlock(nn.Module):
    def __init__(self, width: int = WIDTH) -> None:
        super().__init__()
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(nn.functional.gelu(self.up(x)))


class BufferBlock(nn.Module):
    """A block with buffers: BatchNorm running statistics and a custom registered one."""

    def __init__(self, width: int = WIDTH) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.bn = nn.BatchNorm1d(width)
        self.register_buffer("scale", torch.rand(width) + 0.5)
        with torch.no_grad():
            self.bn.running_mean.normal_()
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.weight.normal_()
            self.bn.bias.normal_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bn(self.fc(x)) * self.scale


class KeywordOnlyBlock(nn.Module):
    def __init__(self, width: int = WIDTH) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, *, hidden_states: torch.Tensor, mask: torch.Tensor | None = None):
        out = torch.tanh(self.fc(hidden_states))
        if mask is not None:
            out = out * mask
        return hidden_states + out


class TupleBlock(nn.Module):
    def __init__(self, width: int = WIDTH) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.gate = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x + torch.tanh(self.fc(x)), self.gate(x).mean()


class Stack(nn.Module):
    """Runs ``layers`` in order; each kind of layer is called the way it expects."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.head = nn.Linear(WIDTH, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        aux = torch.zeros(())
        mask = (torch.arange(WIDTH) % 3 != 0).to(x.dtype)
        for layer in self.layers:
            if isinstance(layer, KeywordOnlyBlock):
                x = layer(hidden_states=x, mask=mask)
            elif isinstance(layer, TupleBlock):
                x, extra = layer(x)
                aux = aux + extra
            else:
                x = layer(x)
        return self.head(x) + aux


def small_decoder(**kwargs) -> DecoderLM:
    sizes = {"vocab_size": 64, "hidden_size": 32, "num_layers": 6, "num_heads": 4}
    return DecoderLM(**sizes, intermediate_size=64, **kwargs)


def shared_layer_stack() -> Stack:
    shared = Block()
    return Stack([shared, Block(), shared, Block(), Block()])


MODELS = {
    "decoder": lambda: small_decoder(),
    "decoder_tied_embeddings": lambda: small_decoder(tie_embeddings=True),
    "shared_layer": shared_layer_stack,
    "buffers": lambda: Stack([BufferBlock() for _ in range(4)]),
    "heterogeneous": lambda: Stack([Block(), WideBlock(), Block(), WideBlock(), Block()]),
    "keyword_only_forward": lambda: Stack([KeywordOnlyBlock() for _ in range(4)]),
    "tuple_outputs": lambda: Stack([TupleBlock() for _ in range(4)]),
}


def build(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    model = MODELS[name]().eval()
    if isinstance(model, DecoderLM):
        return model, torch.randint(0, 64, (2, 7))
    return model, torch.randn(3, WIDTH)


def snapshot_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(actual: dict, expected: dict) -> None:
    assert list(actual) == list(expected)
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype, key
        assert torch.equal(actual[key], value), key


def hook_snapshot(model: nn.Module) -> list[tuple[str, str, tuple]]:
    return [
        (name, attr, tuple(getattr(module, attr)))
        for name, module in model.named_modules(remove_duplicate=False)
        for attr in HOOK_DICTS
    ]


def param_snapshot(model: nn.Module) -> dict[str, tuple]:
    return {
        name: (
            param,
            param.detach().clone(),
            param.device,
            param.dtype,
            param.requires_grad,
            param.stride(),
        )
        for name, param in model.named_parameters(remove_duplicate=False)
    }


@pytest.fixture(autouse=True)
def _quiet_plan_warnings():
    # Partial plans note shared or filtered-out parameters; tests about warnings re-enable them.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OffloadPlanWarning)
        yield


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------


GRAD_MODES = {
    "grad": contextlib.nullcontext,
    "no_grad": torch.no_grad,
    "inference_mode": torch.inference_mode,
}


@with_each_backend
@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("grad_mode", list(GRAD_MODES.values()), ids=list(GRAD_MODES))
def test_outputs_are_bit_identical_to_the_unoffloaded_model(backend, model_name, grad_mode):
    model, inputs = build(model_name)
    with grad_mode():
        expected = model(inputs)
        handle = offload(model, backend)
        assert handle.plan.params, "the backend should offload something in this model"
        for _ in range(3):
            assert torch.equal(model(inputs), expected)
    assert handle.stats.forwards == 3
    assert handle.stats.stalls == 0
    handle.remove()


def test_tied_weights_stay_one_parameter_while_offloaded():
    model, _ = build("decoder_tied_embeddings")
    with offload(model, "uva_copy"):
        assert model.lm_head.weight is model.embed_tokens.weight
    assert model.lm_head.weight is model.embed_tokens.weight


# --------------------------------------------------------------------------------------------
# state_dict / load_state_dict
# --------------------------------------------------------------------------------------------


@with_each_backend
@pytest.mark.parametrize("model_name", ["decoder", "decoder_tied_embeddings", "buffers"])
def test_state_dict_while_offloaded_equals_state_dict_before(backend, model_name):
    model, inputs = build(model_name)
    before = snapshot_state(model)
    with offload(model, backend):
        assert_same_state(model.state_dict(), before)
        model(inputs)  # slots now hold other layers' weights than right after apply
        assert_same_state(model.state_dict(), before)


@with_each_backend
def test_load_state_dict_while_offloaded_changes_the_next_forward(backend):
    model, inputs = build("decoder", seed=0)
    fresh, _ = build("decoder", seed=1)
    new_state = snapshot_state(fresh)
    with offload(model, backend):
        model(inputs)
        model.load_state_dict(new_state)
        for _ in range(2):
            assert torch.equal(model(inputs), fresh(inputs))
        assert_same_state(model.state_dict(), new_state)


@with_each_backend
def test_model_holds_the_loaded_values_after_remove(backend):
    model, inputs = build("decoder", seed=0)
    fresh, _ = build("decoder", seed=1)
    new_state = snapshot_state(fresh)
    with offload(model, backend):
        model(inputs)
        model.load_state_dict(new_state)
        model(inputs)
    assert_same_state(model.state_dict(), new_state)
    assert torch.equal(model(inputs), fresh(inputs))


# --------------------------------------------------------------------------------------------
# remove()
# --------------------------------------------------------------------------------------------


def decoder_with_awkward_params(dtype: torch.dtype) -> DecoderLM:
    """A decoder with a non-contiguous weight and a frozen one, to check they come back so."""
    torch.manual_seed(0)
    model = small_decoder(dtype=dtype).eval()
    up = model.layers[1].mlp.up_proj
    up.weight = nn.Parameter(torch.randn(up.in_features, up.out_features, dtype=dtype).t())
    assert not up.weight.is_contiguous()
    model.layers[3].self_attn.k_proj.weight.requires_grad_(False)
    return model


@with_each_backend
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_remove_restores_parameter_objects_values_devices_dtypes_and_strides(backend, dtype):
    model = decoder_with_awkward_params(dtype)
    inputs = torch.randint(0, 64, (2, 7))
    expected = model(inputs)
    before = param_snapshot(model)
    handle = offload(model, backend)
    model(inputs)
    model(torch.flip(inputs, dims=[0]))
    handle.remove()
    after = param_snapshot(model)
    assert list(after) == list(before)
    for name, (param, value, device, p_dtype, requires_grad, stride) in before.items():
        now = after[name]
        assert now[0] is param, name
        assert torch.equal(now[1], value), name
        assert (now[2], now[3], now[4], now[5]) == (device, p_dtype, requires_grad, stride), name
    assert torch.equal(model(inputs), expected)


@with_each_backend
def test_remove_gives_offloaded_parameters_their_own_storage_back(backend):
    model, inputs = build("decoder")
    handle = offload(model, backend)
    model(inputs)
    handle.remove()
    storages = [p.untyped_storage().data_ptr() for p in model.parameters()]
    assert len(set(storages)) == len(storages)  # no slot, no shared host buffer


@with_each_backend
def test_remove_leaves_no_hook_behind_and_keeps_the_users_hooks(backend):
    model, inputs = build("decoder")
    calls = []
    model.layers[1].register_forward_hook(lambda *_: calls.append("user"))
    before = hook_snapshot(model)
    handle = offload(model, backend)
    assert hook_snapshot(model) != before  # the check below would catch a leftover
    model(inputs)
    handle.remove()
    assert hook_snapshot(model) == before
    model(inputs)
    assert calls == ["user", "user"]


@with_each_backend
def test_remove_forgets_the_offload_in_global_registries(backend):
    model, inputs = build("decoder")
    rings = dict(ops._RINGS)
    handle = offload(model, backend)
    model(inputs)
    handle.remove()
    assert dict(ops._RINGS.items()) == rings


@with_each_backend
def test_remove_to_an_explicit_device_restores_the_model_there(backend):
    # On CPU the only device there is; the CUDA tests move weights back to the CPU.
    model, inputs = build("decoder")
    expected = model(inputs)
    params = param_snapshot(model)
    handle = offload(model, backend)
    model(inputs)
    handle.remove(device="cpu")
    for name, param in model.named_parameters():
        assert param is params[name][0], name
        assert param.device == torch.device("cpu"), name
        assert torch.equal(param, params[name][1]), name
    assert torch.equal(model(inputs), expected)


@with_each_backend
def test_remove_twice_is_a_no_op(backend):
    model, inputs = build("decoder")
    expected = model(inputs)
    handle = offload(model, backend)
    handle.remove()
    restored = param_snapshot(model)
    hooks = hook_snapshot(model)
    handle.remove()
    assert not handle.active
    assert hook_snapshot(model) == hooks
    for name, (param, value, *_) in restored.items():
        assert dict(model.named_parameters(remove_duplicate=False))[name] is param
        assert torch.equal(param, value)
    assert torch.equal(model(inputs), expected)


@with_each_backend
def test_context_manager_removes_on_exit(backend):
    model, inputs = build("decoder")
    expected = model(inputs)
    hooks = hook_snapshot(model)
    with offload(model, backend) as handle:
        assert handle.active
        assert torch.equal(model(inputs), expected)
    assert not handle.active
    assert hook_snapshot(model) == hooks
    assert torch.equal(model(inputs), expected)


@with_each_backend
def test_context_manager_removes_when_the_body_raises(backend):
    model, inputs = build("decoder")
    expected = model(inputs)
    before = param_snapshot(model)
    hooks = hook_snapshot(model)
    handle = None

    def body():
        nonlocal handle
        with offload(model, backend) as handle:
            model(inputs)
            raise KeyError("body failed")

    with pytest.raises(KeyError, match="body failed"):
        body()
    assert not handle.active
    assert hook_snapshot(model) == hooks
    for name, param in model.named_parameters(remove_duplicate=False):
        assert param is before[name][0]
        assert torch.equal(param, before[name][1])
    assert torch.equal(model(inputs), expected)


def test_forwards_in_and_out_of_inference_mode_can_alternate():
    model, inputs = build("decoder")
    expected = model(inputs)
    with offload(model, "prefetch_every_other_layer"):
        for mode in [torch.inference_mode, contextlib.nullcontext, torch.no_grad] * 2:
            with mode():
                assert torch.equal(model(inputs), expected)


def test_handle_repr_says_whether_it_is_active():
    model, _ = build("decoder")
    handle = offload(model, "prefetch_every_other_layer")
    assert "active" in repr(handle)
    handle.remove()
    assert "removed" in repr(handle)


# --------------------------------------------------------------------------------------------
# One offload per model
# --------------------------------------------------------------------------------------------


@with_each_backend
@pytest.mark.parametrize("second", ["prefetch_every_other_layer", "uva_host"])
def test_applying_twice_raises_and_leaves_the_first_offload_working(backend, second):
    model, inputs = build("decoder")
    expected = model(inputs)
    handle = offload(model, backend)
    hooks = hook_snapshot(model)
    pointers = [p.data_ptr() for p in model.parameters()]
    with pytest.raises(OffloadError, match="already has an offload applied"):
        offload(model, second)
    assert hook_snapshot(model) == hooks
    assert [p.data_ptr() for p in model.parameters()] == pointers
    assert handle.active
    for _ in range(2):
        assert torch.equal(model(inputs), expected)
    assert handle.stats.stalls == 0
    handle.remove()
    assert torch.equal(model(inputs), expected)


@with_each_backend
def test_applying_to_a_submodule_of_an_offloaded_model_raises(backend):
    model, inputs = build("decoder")
    expected = model(inputs)
    handle = offload(model, backend)
    with pytest.raises(OffloadError):
        apply_offload(model.layers, {"uva": {"cpu_offload_gb": 1.0}})
    with pytest.raises(OffloadError):
        apply_offload(model.layers[5].mlp, {"uva": {"cpu_offload_gb": 1.0}})
    assert torch.equal(model(inputs), expected)
    handle.remove()


@with_each_backend
def test_applying_to_a_model_containing_an_offloaded_one_raises(backend):
    model, inputs = build("decoder")
    expected = model(inputs)
    handle = offload(model, backend)
    wrapper = nn.ModuleDict({"inner": model, "other": nn.Linear(2, 2)})
    with pytest.raises(OffloadError):
        apply_offload(wrapper, {"uva": {"cpu_offload_gb": 1.0}})
    assert torch.equal(model(inputs), expected)
    handle.remove()


@with_each_backend
def test_applying_again_after_remove_works(backend):
    model, inputs = build("decoder")
    expected = model(inputs)
    offload(model, backend).remove()
    second = offload(model, backend)
    assert second.active
    for _ in range(2):
        assert torch.equal(model(inputs), expected)
    second.remove()
    third = offload(model, "uva_host")
    assert torch.equal(model(inputs), expected)
    third.remove()


# --------------------------------------------------------------------------------------------
# Empty selections and refused models
# --------------------------------------------------------------------------------------------

EMPTY_SELECTIONS = {
    "prefetch_filter_matches_only_params_outside_the_layers": {
        "prefetch": {"offload_group_size": 2, "offload_params": ["embed_tokens"]}
    },
    "prefetch_filter_matches_nothing": {
        "prefetch": {"offload_group_size": 2, "offload_params": ["no_such_segment"]}
    },
    "prefetch_group_larger_than_the_stack": {"prefetch": {"offload_group_size": 16}},
    "uva_tiny_budget_filter_matches_nothing": {
        "uva": {"cpu_offload_gb": 1e-9, "cpu_offload_params": ["no_such_segment"]}
    },
    "uva_forced_with_zero_budget": {"offload_backend": "uva"},
}


@pytest.mark.parametrize("config", list(EMPTY_SELECTIONS.values()), ids=list(EMPTY_SELECTIONS))
def test_empty_selection_is_a_no_op_with_a_warning(config):
    model, inputs = build("decoder")
    expected = model(inputs)
    params = param_snapshot(model)
    pointers = [p.data_ptr() for p in model.parameters()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        handle = apply_offload(model, config)
    messages = [str(w.message) for w in caught if w.category is OffloadPlanWarning]
    assert any("selects no parameter" in m for m in messages), messages
    assert handle.plan.params == ()
    assert handle.stats.offloaded_bytes == handle.stats.host_bytes == 0
    assert [p.data_ptr() for p in model.parameters()] == pointers
    for _ in range(2):
        assert torch.equal(model(inputs), expected)
    handle.remove()
    for name, param in model.named_parameters(remove_duplicate=False):
        assert param is params[name][0]


def test_backend_none_is_a_silent_no_op():
    model, inputs = build("decoder")
    expected = model(inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        handle = apply_offload(model, {})
    assert handle.plan.backend == "none"
    assert handle.plan.params == ()
    assert torch.equal(model(inputs), expected)
    handle.remove()


def decoder_with_a_meta_layer(index: int) -> DecoderLM:
    model, _ = build("decoder")
    model.layers[index] = copy.deepcopy(model.layers[index]).to("meta")
    return model


@pytest.mark.parametrize(
    "config",
    [
        {"prefetch": {"offload_group_size": 2, "offload_num_in_group": 1}},
        {"uva": {"cpu_offload_gb": 1.0}},
    ],
    ids=["prefetch", "uva"],
)
def test_meta_parameters_selected_for_offload_raise_and_leave_the_model_untouched(config):
    model = decoder_with_a_meta_layer(3)
    params = param_snapshot(model)
    hooks = hook_snapshot(model)
    with pytest.raises(OffloadError, match=r"meta device.*layers\.3\."):
        apply_offload(model, config)
    assert hook_snapshot(model) == hooks
    for name, param in model.named_parameters(remove_duplicate=False):
        assert param is params[name][0]
        assert param.device == params[name][2]
        if not param.is_meta:
            assert torch.equal(param, params[name][1])
    # Nothing was registered: an offload that leaves the meta layer alone is accepted.
    handle = apply_offload(model, {"uva": {"cpu_offload_gb": 1.0, "cpu_offload_params": ["norm"]}})
    assert handle.plan.params
    handle.remove()


# --------------------------------------------------------------------------------------------
# A failure half-way rolls back
# --------------------------------------------------------------------------------------------


def fail(*args, **kwargs):
    raise torch.OutOfMemoryError("injected failure")


def point_half_then_fail(entries):
    entries = list(entries)
    for entry, tensors in entries[: len(entries) // 2]:
        entry.weights.use(tensors)
    fail()


# (backend, what to replace, replacement): failures at successive stages of an apply.
FAILURES = {
    "host_storage_prefetch": (
        "prefetch_every_other_layer",
        "hydra_offload.runtime.device.HostStorage",
        fail,
    ),
    "host_storage_uva": ("uva_host", "hydra_offload.runtime.device.HostStorage", fail),
    "pool_allocation": (
        "prefetch_every_other_layer",
        "hydra_offload.backends.prefetch.BufferPool",
        fail,
    ),
    "prefetch_preload_after_hooks": (
        "prefetch_all_layers_step_2",
        "hydra_offload.backends.prefetch._Ring.preload",
        fail,
    ),
    "uva_host_half_pointed": (
        "uva_host",
        "hydra_offload.backends.uva.point_at",
        point_half_then_fail,
    ),
    "uva_copy_hooks": ("uva_copy", "hydra_offload.backends.uva.UVAOffload._hook_owners", fail),
}


@pytest.mark.parametrize(
    ("backend", "target", "replacement"), list(FAILURES.values()), ids=list(FAILURES)
)
def test_a_failure_half_way_restores_the_model(monkeypatch, backend, target, replacement):
    model, inputs = build("decoder")
    expected = model(inputs)
    params = param_snapshot(model)
    hooks = hook_snapshot(model)
    rings = dict(ops._RINGS)
    with monkeypatch.context() as patch:
        patch.setattr(target, replacement)
        with pytest.raises(torch.OutOfMemoryError, match="injected failure"):
            offload(model, backend)
    assert hook_snapshot(model) == hooks
    for name, param in model.named_parameters(remove_duplicate=False):
        assert param is params[name][0], name
        assert torch.equal(param, params[name][1]), name
    storages = [p.untyped_storage().data_ptr() for p in model.parameters()]
    assert len(set(storages)) == len(storages)
    assert dict(ops._RINGS.items()) == rings
    assert torch.equal(model(inputs), expected)
    # Nothing of the failed offload is registered: applying again works.
    with offload(model, backend):
        assert torch.equal(model(inputs), expected)
