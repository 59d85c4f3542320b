"""plan_offload: layer stacks (docs/spec.md §4), group rule, pool, UVA budget (docs/spec.md §5).

Models are built on the ``meta`` device wherever possible: the planner reads names, shapes,
strides and dtypes only, so a meta model is enough and any access to tensor data would fail.
"""

from __future__ import annotations

import dataclasses
import re
import warnings

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from hydra_offload import (
    LayerStackError,
    OffloadConfig,
    OffloadPlan,
    OffloadPlanWarning,
    plan_offload,
)
from hydra_offload.models import DecoderLM

GIB = 1024**3

# Tiny models on purpose: many of their plans save under 5% of the model's parameter bytes on
# the device (or nothing, when the pool holds every offloaded layer), which warns.
SAVES_LITTLE = pytest.mark.filterwarnings(
    "ignore:the plan saves .* below the 5%:hydra_offload.plan.OffloadPlanWarning"
)
MIXED_STACK = pytest.mark.filterwarnings(
    "ignore:offload.layers. the auto-detected layer stack .* is mixed"
    ":hydra_offload.plan.OffloadPlanWarning"
)


# --------------------------------------------------------------------------------------------
# Helpers and small models
# --------------------------------------------------------------------------------------------


def prefetch(group, k=1, step=1, params=(), layers=None, backend="auto"):
    return OffloadConfig(
        offload_backend=backend,
        prefetch={
            "offload_group_size": group,
            "offload_num_in_group": k,
            "offload_prefetch_step": step,
            "offload_params": list(params),
        },
        layers=layers,
    )


def uva(gb, params=()):
    return OffloadConfig(uva={"cpu_offload_gb": float(gb), "cpu_offload_params": list(params)})


def nbytes(param):
    return param.numel() * param.element_size()


def tiny_lm(num_layers=8, **kwargs):
    sizes = {"vocab_size": 32, "hidden_size": 8, "num_heads": 2, "intermediate_size": 16}
    sizes.update(kwargs)
    with torch.device("meta"):
        return DecoderLM(num_layers=num_layers, **sizes)


def layer_bytes(layer):
    return sum(nbytes(p) for p in layer.parameters())


def layer_indices(names, prefix="layers"):
    """The distinct layer indices that occur in ``names`` under ``prefix``."""
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\." if prefix else r"^(\d+)\.")
    return sorted({int(m.group(1)) for n in names if (m := pattern.match(n))})


class Wrapped(nn.Module):
    """A Hugging Face style wrapper: the decoder lives under ``model``."""

    def __init__(self, num_layers=4):
        super().__init__()
        self.model = DecoderLM(
            vocab_size=32, hidden_size=8, num_heads=2, intermediate_size=16, num_layers=num_layers
        )
        self.head = nn.Linear(8, 3)


class Block(nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, width)


class MixedDtypeBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.wide = nn.Linear(8, 16, dtype=torch.float32)
        self.narrow = nn.Linear(16, 8, dtype=torch.bfloat16)
        self.tiny = nn.Linear(4, 4, bias=False, dtype=torch.float16)


class Experts(nn.Module):
    def __init__(self, num_experts=4, width=8):
        super().__init__()
        self.w13_weight = nn.Parameter(torch.empty(num_experts, 2 * width, width))
        self.w2_weight = nn.Parameter(torch.empty(num_experts, width, width))


class MoEMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(8, 4, bias=False)
        self.experts = Experts()


class DenseBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.Linear(8, 8)
        self.mlp = nn.Linear(8, 8)


class MoEBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.Linear(8, 8)
        self.mlp = MoEMLP()


class Hetero(nn.Module):
    """A stack mixing dense and MoE blocks (dense at even positions)."""

    def __init__(self, n=6):
        super().__init__()
        self.layers = nn.ModuleList(MoEBlock() if i % 2 else DenseBlock() for i in range(n))


class Stack(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.block = nn.ModuleList(Block() for _ in range(n))


class EncoderDecoder(nn.Module):
    """T5 style: two stacks, ``encoder.block`` and ``decoder.block``."""

    def __init__(self, encoder_layers=4, decoder_layers=6):
        super().__init__()
        self.shared = nn.Embedding(16, 8)
        self.encoder = Stack(encoder_layers)
        self.decoder = Stack(decoder_layers)


class ThreeLinears(nn.Module):
    """Hand-sized float32 parameters for UVA budgets.

    a.weight 400 B, a.bias 40 B, b.weight 800 B, b.bias 80 B, c.weight 800 B, c.bias 40 B.
    """

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(10, 10)
        self.b = nn.Linear(10, 20)
        self.c = nn.Linear(20, 10)


THREE_SIZES = {
    "a.weight": 400,
    "a.bias": 40,
    "b.weight": 800,
    "b.bias": 80,
    "c.weight": 800,
    "c.bias": 40,
}
ALL_THREE = tuple(THREE_SIZES)


def three_linears():
    with torch.device("meta"):
        return ThreeLinears()


# --------------------------------------------------------------------------------------------
# Group rule
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("group", "k", "n", "expected"),
    [
        (8, 2, 24, (6, 7, 14, 15, 22, 23)),
        (8, 2, 26, (6, 7, 14, 15, 22, 23)),
        (4, 1, 8, (3, 7)),
        (3, 1, 7, (2, 5)),
        (5, 2, 12, (3, 4, 8, 9)),
        (1, 1, 3, (0, 1, 2)),
        (3, 3, 5, (0, 1, 2, 3, 4)),
        (2, 1, 2, (1,)),
        (8, 2, 7, (6,)),
    ],
)
@SAVES_LITTLE
def test_group_rule_selects_the_last_k_layers_of_each_group(group, k, n, expected):
    model = tiny_lm(n)
    plan = plan_offload(model, prefetch(group, k))
    assert plan.backend == "prefetch"
    assert plan.stacks[0].offloaded_layers == expected
    assert plan.stacks[0].num_layers == n
    assert tuple(layer_indices(plan.offloaded_params)) == expected
    assert expected == tuple(i for i in range(n) if i % group >= group - k)
    # Every parameter of every offloaded layer moves (no filter).
    for i in expected:
        local = {f"layers.{i}.{name}" for name, _ in model.layers[i].named_parameters()}
        assert local <= set(plan.offloaded_params)
    assert not any("stays on the device" in note for note in plan.notes)


@pytest.mark.parametrize(("group", "k", "n"), [(8, 2, 6), (8, 1, 4), (4, 2, 2), (3, 1, 2)])
def test_too_few_layers_offloads_nothing_with_a_note(group, k, n):
    plan = plan_offload(tiny_lm(n), prefetch(group, k))
    assert plan.params == ()
    assert plan.pool == ()
    assert plan.offloaded_bytes == 0
    assert plan.device_bytes_saved == 0
    assert plan.stacks[0].offloaded_layers == ()
    assert any(f"offload_group_size ({group})" in note for note in plan.notes), plan.notes


# --------------------------------------------------------------------------------------------
# Offloaded parameters: names, order, bytes
# --------------------------------------------------------------------------------------------


def test_offloaded_params_are_fully_qualified_in_named_parameters_order():
    with torch.device("meta"):
        model = Wrapped(num_layers=6)
    plan = plan_offload(model, prefetch(3, 2, layers="model.layers"))
    expected = tuple(
        name
        for name, _ in model.named_parameters()
        if name.startswith(("model.layers.1.", "model.layers.2.", "model.layers.4."))
        or name.startswith("model.layers.5.")
    )
    assert plan.offloaded_params == expected
    assert plan.layers == ("model.layers",)
    for planned in plan.params:
        assert planned.stack == "model.layers"
        assert planned.name == f"model.layers.{planned.layer}.{planned.local_name}"


def test_offloaded_bytes_is_the_exact_sum_over_mixed_dtypes():
    with torch.device("meta"):
        model = nn.Sequential(*(MixedDtypeBlock() for _ in range(4)))
    plan = plan_offload(model, prefetch(2, 1))
    params = dict(model.named_parameters())
    assert layer_indices(plan.offloaded_params, prefix="") == [1, 3]
    # 8*16*4 + 16*4 + 16*8*2 + 8*2 + 4*4*2 = 512 + 64 + 256 + 16 + 32 = 880 bytes per block.
    assert layer_bytes(model[1]) == 880
    assert plan.offloaded_bytes == 2 * 880
    assert plan.offloaded_bytes == sum(nbytes(params[n]) for n in plan.offloaded_params)
    for planned in plan.params:
        param = params[planned.name]
        assert planned.nbytes == nbytes(param)
        assert planned.dtype == param.dtype
        assert planned.shape == tuple(param.shape)
        assert planned.stride == param.stride()


def test_total_param_bytes_counts_every_parameter():
    model = tiny_lm(4)
    plan = plan_offload(model, prefetch(2))
    assert plan.total_param_bytes == sum(nbytes(p) for p in model.parameters())


# --------------------------------------------------------------------------------------------
# Prefetch pool
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("step", "slots"), [(1, 1), (2, 2), (3, 3), (4, 4), (5, 4), (9, 4)])
@SAVES_LITTLE
def test_pool_has_step_slots_per_entry_capped_by_offloaded_layers(step, slots):
    model = tiny_lm(8)  # G=2, K=1: layers 1, 3, 5, 7 are offloaded
    plan = plan_offload(model, prefetch(2, 1, step))
    block = model.layers[1]
    local_names = [name for name, _ in block.named_parameters()]
    assert sorted(slot.local_name for slot in plan.pool) == sorted(local_names)
    assert all(slot.count == slots for slot in plan.pool)
    assert all(slot.stack == "layers" for slot in plan.pool)
    assert plan.pool_bytes == slots * layer_bytes(block)
    assert plan.stacks[0].pool_bytes == plan.pool_bytes
    assert plan.offloaded_bytes == 4 * layer_bytes(block)
    assert plan.device_bytes_saved == plan.offloaded_bytes - plan.pool_bytes


@pytest.mark.parametrize("step", [1, 2, 3])
def test_offloaded_layer_j_uses_slot_j_mod_step(step):
    plan = plan_offload(tiny_lm(8), prefetch(2, 1, step))
    ordinal = {layer: j for j, layer in enumerate(plan.stacks[0].offloaded_layers)}
    for planned in plan.params:
        assert planned.slot == ordinal[planned.layer] % step


@SAVES_LITTLE
def test_pool_entries_are_distinct_by_name_shape_stride_and_dtype():
    with torch.device("meta"):
        model = nn.Module()
        model.layers = nn.ModuleList(nn.Linear(4, 8) for _ in range(6))
        # Layer 3: same name and shape as the others, transposed storage (another stride).
        model.layers[3].weight = nn.Parameter(torch.empty(4, 8).t())
        # Layer 5: same name and shape, another dtype.
        model.layers[5].bias = nn.Parameter(torch.empty(8, dtype=torch.float16))
    plan = plan_offload(model, prefetch(2, 1, step=3))  # layers 1, 3, 5
    entries = {(s.local_name, s.shape, s.stride, s.dtype): s.count for s in plan.pool}
    assert entries == {
        ("weight", (8, 4), (4, 1), torch.float32): 2,  # layers 1 and 5
        ("weight", (8, 4), (1, 8), torch.float32): 1,  # layer 3
        ("bias", (8,), (1,), torch.float32): 2,  # layers 1 and 3
        ("bias", (8,), (1,), torch.float16): 1,  # layer 5
    }
    assert plan.pool_bytes == 2 * 128 + 128 + 2 * 32 + 16
    assert plan.device_bytes_saved == plan.offloaded_bytes - plan.pool_bytes


@pytest.mark.parametrize(("group", "k", "step"), [(2, 1, 4), (2, 1, 7), (1, 1, 8), (4, 2, 4)])
def test_note_when_the_pool_holds_every_offloaded_layer(group, k, step):
    with pytest.warns(OffloadPlanWarning, match=r"the plan saves 0 B of device memory, 0\.0%"):
        plan = plan_offload(tiny_lm(8), prefetch(group, k, step))
    assert plan.offloaded_bytes > 0
    assert plan.pool_bytes == plan.offloaded_bytes
    assert plan.device_bytes_saved == 0
    assert any("no device memory is saved" in note for note in plan.notes), plan.notes


def test_no_saving_note_when_the_pool_is_smaller_than_the_offloaded_layers():
    plan = plan_offload(tiny_lm(8), prefetch(2, 1, 3))
    assert plan.device_bytes_saved > 0
    assert not any("no device memory is saved" in note for note in plan.notes)


# --------------------------------------------------------------------------------------------
# offload_params filter
# --------------------------------------------------------------------------------------------


def test_offload_params_moves_only_matching_parameters_of_offloaded_layers():
    model = tiny_lm(8)
    plan = plan_offload(model, prefetch(2, 1, params=["mlp"]))
    expected = tuple(
        name
        for name, _ in model.named_parameters()
        if layer_indices([name]) in ([1], [3], [5], [7]) and ".mlp." in name
    )
    assert len(expected) == 12
    assert plan.offloaded_params == expected
    assert sorted(s.local_name for s in plan.pool) == [
        "mlp.down_proj.weight",
        "mlp.gate_proj.weight",
        "mlp.up_proj.weight",
    ]
    assert plan.stacks[0].offloaded_layers == (1, 3, 5, 7)


@SAVES_LITTLE
def test_offload_params_multi_segment_pattern():
    model = tiny_lm(4)
    plan = plan_offload(model, prefetch(2, 1, params=["self_attn.q_proj"]))
    assert plan.offloaded_params == (
        "layers.1.self_attn.q_proj.weight",
        "layers.3.self_attn.q_proj.weight",
    )


@MIXED_STACK  # dense and MoE blocks in one stack, on purpose
def test_selected_layer_whose_parameters_all_fail_the_filter_is_not_offloaded():
    with torch.device("meta"):
        model = Hetero(6)  # dense at 0, 2, 4; MoE at 1, 3, 5
    plan = plan_offload(model, prefetch(1, 1, step=2, params=["experts"]))
    assert plan.stacks[0].offloaded_layers == (1, 3, 5)
    assert plan.offloaded_params == tuple(
        f"layers.{i}.mlp.experts.{w}" for i in (1, 3, 5) for w in ("w13_weight", "w2_weight")
    )
    # Slots count offloaded layers only: the MoE layers are ordinals 0, 1, 2 -> slots 0, 1, 0.
    assert [p.slot for p in plan.params if p.local_name == "mlp.experts.w2_weight"] == [0, 1, 0]
    assert {s.local_name: s.count for s in plan.pool} == {
        "mlp.experts.w13_weight": 2,
        "mlp.experts.w2_weight": 2,
    }
    experts_bytes = sum(nbytes(p) for p in model.layers[1].mlp.experts.parameters())
    assert plan.offloaded_bytes == 3 * experts_bytes
    assert plan.pool_bytes == 2 * experts_bytes


# --------------------------------------------------------------------------------------------
# Explicit layer paths
# --------------------------------------------------------------------------------------------


def test_explicit_layers_path():
    model = tiny_lm(4)
    plan = plan_offload(model, prefetch(2, 1, layers="layers"))
    assert plan.layers == ("layers",)
    assert plan.candidates == ()
    assert plan.stacks[0].offloaded_layers == (1, 3)


def test_explicit_nested_layers_path():
    with torch.device("meta"):
        model = Wrapped(num_layers=4)
    plan = plan_offload(model, prefetch(2, 1, layers="model.layers"))
    assert plan.layers == ("model.layers",)
    assert plan.stacks[0].path == "model.layers"
    assert layer_indices(plan.offloaded_params, prefix="model.layers") == [1, 3]
    assert all(name.startswith("model.layers.") for name in plan.offloaded_params)


@pytest.mark.parametrize(
    "layers", [["encoder.block", "decoder.block"], ["decoder.block", "encoder.block"]]
)
def test_two_layer_paths_give_two_stacks_with_separate_pools(layers):
    with torch.device("meta"):
        model = EncoderDecoder(encoder_layers=4, decoder_layers=6)
    plan = plan_offload(model, prefetch(2, 1, step=2, layers=layers))
    assert plan.layers == tuple(layers)
    by_path = {s.path: s for s in plan.stacks}
    assert [s.path for s in plan.stacks] == layers
    assert by_path["encoder.block"].offloaded_layers == (1, 3)
    assert by_path["decoder.block"].offloaded_layers == (1, 3, 5)
    assert by_path["encoder.block"].num_layers == 4
    assert by_path["decoder.block"].num_layers == 6
    block = layer_bytes(model.encoder.block[0])
    assert by_path["encoder.block"].offloaded_bytes == 2 * block
    assert by_path["decoder.block"].offloaded_bytes == 3 * block
    assert plan.offloaded_bytes == 5 * block
    # One pool entry per (stack, parameter of a block); same local names, never shared.
    locals_ = sorted(name for name, _ in model.encoder.block[0].named_parameters())
    for path in ("encoder.block", "decoder.block"):
        assert sorted(s.local_name for s in plan.pool if s.stack == path) == locals_
        assert all(s.count == 2 for s in plan.pool if s.stack == path)
        assert by_path[path].pool_bytes == 2 * block
    assert len(plan.pool) == 2 * len(locals_)
    assert plan.pool_bytes == 4 * block
    # Parameters stay in named_parameters() order whatever the order of the paths.
    order = [name for name, _ in model.named_parameters()]
    assert list(plan.offloaded_params) == [n for n in order if n in set(plan.offloaded_params)]
    assert plan.offloaded_params[0].startswith("encoder.block.1.")
    assert {p.stack for p in plan.params} == {"encoder.block", "decoder.block"}


def test_missing_layers_path_lists_the_module_lists_found():
    with torch.device("meta"):
        model = Wrapped(num_layers=4)
    with pytest.raises(LayerStackError) as caught:
        plan_offload(model, prefetch(2, 1, layers="model.blocks"))
    message = str(caught.value)
    assert "offload.layers" in message
    assert "'model.blocks'" in message
    assert "model.layers (4 x DecoderBlock)" in message


def test_missing_layers_path_in_a_model_without_module_lists():
    with torch.device("meta"):
        model = nn.Linear(4, 4)
    with pytest.raises(LayerStackError, match="has no module list"):
        plan_offload(model, prefetch(2, 1, layers="layers"))


@pytest.mark.parametrize(
    ("path", "kind"),
    [("model.norm", "RMSNorm"), ("model.layers.0", "DecoderBlock"), ("head", "Linear")],
)
def test_layers_path_that_is_not_a_module_list_is_an_error(path, kind):
    with torch.device("meta"):
        model = Wrapped(num_layers=4)
    with pytest.raises(LayerStackError, match=rf"'{re.escape(path)}' is a {kind}, not an nn\."):
        plan_offload(model, prefetch(2, 1, layers=path))


def test_layers_paths_inside_each_other_are_an_error():
    with torch.device("meta"):
        model = Hetero(4)
        model.layers[1].mlp.experts_list = nn.ModuleList(nn.Linear(2, 2) for _ in range(2))
    with pytest.raises(LayerStackError, match="lies inside"):
        plan_offload(model, prefetch(2, 1, layers=["layers", "layers.1.mlp.experts_list"]))


def test_empty_module_list_path_is_an_error():
    with torch.device("meta"):
        model = Wrapped(num_layers=2)
        model.empty = nn.ModuleList()
    with pytest.raises(LayerStackError, match="empty"):
        plan_offload(model, prefetch(2, 1, layers="empty"))


# --------------------------------------------------------------------------------------------
# Auto-detection
# --------------------------------------------------------------------------------------------


class ManyLists(nn.Module):
    def __init__(self):
        super().__init__()
        self.small = nn.ModuleList(nn.Linear(2, 2) for _ in range(3))  # 3 * 24 B
        self.big = nn.ModuleList(nn.Linear(16, 16) for _ in range(2))  # 2 * 1088 B
        self.mixed = nn.ModuleList([nn.Linear(32, 32), nn.LayerNorm(32)])
        self.single = nn.ModuleList([nn.Linear(64, 64)])


@SAVES_LITTLE
def test_auto_detect_picks_the_module_list_with_most_parameter_bytes():
    with torch.device("meta"):
        model = ManyLists()
    plan = plan_offload(model, prefetch(2, 1))
    assert plan.layers == ("big",)
    assert plan.offloaded_params == ("big.1.weight", "big.1.bias")
    decided = {c.path: c for c in plan.candidates}
    assert set(decided) == {"small", "big", "mixed", "single"}
    assert [c.path for c in plan.candidates if c.chosen] == ["big"]
    assert decided["big"].param_bytes == 2 * (16 * 16 + 16) * 4
    assert decided["small"].param_bytes == 3 * (2 * 2 + 2) * 4
    assert "fewer parameter bytes" in decided["small"].reason
    # Holding more bytes does not make a list without two children of one class a stack.
    assert decided["single"].param_bytes > decided["big"].param_bytes
    assert decided["mixed"].param_bytes > decided["big"].param_bytes
    assert "fewer than two children of one class" in decided["single"].reason
    assert "fewer than two children of one class" in decided["mixed"].reason
    assert decided["mixed"].num_children == 2
    assert decided["mixed"].same_class == 1
    assert all(c.reason for c in plan.candidates)


@SAVES_LITTLE
def test_auto_detect_tie_goes_to_the_shallower_path():
    with torch.device("meta"):
        model = nn.Module()
        model.deep = nn.Module()  # registered first, but deeper
        model.deep.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))
        model.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))
    plan = plan_offload(model, prefetch(2, 1))
    assert plan.layers == ("layers",)
    decided = {c.path: c for c in plan.candidates}
    assert decided["deep.layers"].param_bytes == decided["layers"].param_bytes
    assert decided["layers"].chosen
    assert not decided["deep.layers"].chosen
    assert "same parameter bytes" in decided["deep.layers"].reason


def test_auto_detect_finds_the_nested_decoder_stack():
    with torch.device("meta"):
        model = Wrapped(num_layers=4)
    plan = plan_offload(model, prefetch(2, 1))
    assert plan.layers == ("model.layers",)
    assert layer_indices(plan.offloaded_params, prefix="model.layers") == [1, 3]


def test_auto_detect_a_model_that_is_itself_a_sequential_of_blocks():
    with torch.device("meta"):
        model = nn.Sequential(*(Block() for _ in range(4)))
    plan = plan_offload(model, prefetch(2, 1))
    assert plan.layers == ("",)
    assert plan.stacks[0].path == ""
    assert plan.stacks[0].offloaded_layers == (1, 3)
    assert plan.offloaded_params == (
        "1.norm.weight",
        "1.norm.bias",
        "1.fc.weight",
        "1.fc.bias",
        "3.norm.weight",
        "3.norm.bias",
        "3.fc.weight",
        "3.fc.bias",
    )
    assert plan.candidates[0].display_path == "<root>"
    assert plan.candidates[0].chosen
    assert "<root>" in plan.summary()


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.Linear(4, 4),
        lambda: nn.Sequential(nn.Linear(4, 4)),
        lambda: nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.LayerNorm(4)),
    ],
    ids=["no-list", "one-child", "no-two-of-a-class"],
)
def test_no_layer_stack_is_an_error_naming_offload_layers(make):
    with torch.device("meta"):
        model = make()
    with pytest.raises(LayerStackError, match=r"offload\.layers"):
        plan_offload(model, prefetch(2, 1))


# --------------------------------------------------------------------------------------------
# UVA budget
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("budget", "patterns", "expected"),
    [
        # 400 + 40 + 800 = 1240 >= 1000: stop after b.weight (overshoot 240 < 800).
        (1000, (), ("a.weight", "a.bias", "b.weight")),
        # Skip a.*: 800 + 80 + 800 = 1680 >= 1000.
        (1000, ("b", "c"), ("b.weight", "b.bias", "c.weight")),
        # 400 + 800 = 1200 >= 1000.
        (1000, ("weight",), ("a.weight", "b.weight")),
        (1, (), ("a.weight",)),
        (400, (), ("a.weight",)),
        (401, (), ("a.weight", "a.bias")),
        (440, (), ("a.weight", "a.bias")),
        (441, (), ("a.weight", "a.bias", "b.weight")),
        (2160, (), ALL_THREE),
        (81, ("bias",), ("a.bias", "b.bias")),
        (121, ("bias",), ("a.bias", "b.bias", "c.bias")),
    ],
)
def test_uva_budget_walk_by_hand(budget, patterns, expected):
    plan = plan_offload(three_linears(), uva(budget / GIB, patterns))
    assert plan.backend == "uva"
    assert plan.budget_bytes == budget
    assert plan.offloaded_params == expected
    assert plan.offloaded_bytes == sum(THREE_SIZES[n] for n in expected)
    assert plan.pool == ()
    assert plan.pool_bytes == 0
    assert plan.device_bytes_saved == plan.offloaded_bytes
    assert all(p.layer is None and p.slot is None for p in plan.params)


def test_uva_budget_bytes_is_int_of_gib():
    plan = plan_offload(three_linears(), uva(1000 / GIB))
    assert plan.budget_bytes == 1000
    plan = plan_offload(three_linears(), uva(0.5))
    assert plan.budget_bytes == GIB // 2
    plan = plan_offload(three_linears(), uva(1e-9))
    assert plan.budget_bytes == int(1e-9 * GIB) == 1


@pytest.mark.parametrize("patterns", [(), ("weight",), ("b", "c")])
def test_uva_overshoots_by_at_most_the_last_parameter(patterns):
    model = three_linears()
    eligible = [n for n in ALL_THREE if not patterns or any(p in n.split(".") for p in patterns)]
    for budget in range(1, 2200, 7):
        plan = plan_offload(model, uva(budget / GIB, patterns))
        assert plan.budget_bytes == budget
        # A prefix of the eligible parameters, in order.
        assert list(plan.offloaded_params) == eligible[: len(plan.params)], budget
        used = plan.offloaded_bytes
        if len(plan.params) < len(eligible):
            assert used >= budget, budget
        assert used - plan.params[-1].nbytes < budget, budget


def test_uva_budget_zero_offloads_nothing():
    plan = plan_offload(three_linears(), OffloadConfig(offload_backend="uva"))
    assert plan.backend == "uva"
    assert plan.budget_bytes == 0
    assert plan.params == ()
    assert plan.offloaded_bytes == 0
    assert plan.notes, "a budget of 0 deserves a note"


def test_uva_budget_larger_than_the_model_offloads_everything_eligible_with_a_note():
    plan = plan_offload(three_linears(), uva(1, ["weight"]))
    assert plan.offloaded_params == ("a.weight", "b.weight", "c.weight")
    assert plan.offloaded_bytes == 2000
    assert any("exceeds" in note and "2,000" in note for note in plan.notes), plan.notes


def test_uva_budget_exactly_the_model_has_no_excess_note():
    plan = plan_offload(three_linears(), uva(2160 / GIB))
    assert plan.offloaded_params == ALL_THREE
    assert not any("exceeds" in note for note in plan.notes)


def test_uva_counts_tied_weights_once():
    with torch.device("meta"):
        tied = DecoderLM(num_layers=2, vocab_size=64, hidden_size=8, num_heads=2,
                         intermediate_size=16, tie_embeddings=True)  # fmt: skip
        untied = DecoderLM(num_layers=2, vocab_size=64, hidden_size=8, num_heads=2,
                           intermediate_size=16)  # fmt: skip
    embedding = 64 * 8 * 4
    assert tied.lm_head.weight is tied.embed_tokens.weight
    total = plan_offload(untied, uva(1)).total_param_bytes - embedding
    # A budget of exactly the deduplicated size offloads everything, each parameter once.
    plan = plan_offload(tied, uva(total / GIB))
    assert plan.total_param_bytes == total
    assert plan.offloaded_bytes == total
    assert plan.offloaded_params == tuple(name for name, _ in tied.named_parameters())
    assert "embed_tokens.weight" in plan.offloaded_params
    assert "lm_head.weight" not in plan.offloaded_params
    assert len(set(plan.offloaded_params)) == len(plan.offloaded_params)
    assert not any("exceeds" in note for note in plan.notes)


# --------------------------------------------------------------------------------------------
# Shared parameters under prefetch
# --------------------------------------------------------------------------------------------


@SAVES_LITTLE
def test_prefetch_keeps_a_parameter_shared_with_a_module_outside_the_layer_on_the_device():
    model = tiny_lm(4)
    shared = model.layers[3].input_layernorm.weight
    model.norm.weight = shared  # registered first inside layer 3, again as norm.weight
    plan = plan_offload(model, prefetch(2, 1, step=2))
    assert "layers.3.input_layernorm.weight" not in plan.offloaded_params
    assert "norm.weight" not in plan.offloaded_params
    assert "layers.1.input_layernorm.weight" in plan.offloaded_params
    assert "layers.3.self_attn.q_proj.weight" in plan.offloaded_params
    assert plan.stacks[0].offloaded_layers == (1, 3)
    assert plan.offloaded_bytes == 2 * layer_bytes(model.layers[1]) - nbytes(shared)
    notes = [n for n in plan.notes if "layers.3.input_layernorm.weight" in n]
    assert len(notes) == 1
    assert "stays on the device" in notes[0]
    assert "norm.weight" in notes[0]
    # Only layer 1 uses the input_layernorm entry: one slot, not two.
    counts = {s.local_name: s.count for s in plan.pool}
    assert counts["input_layernorm.weight"] == 1
    assert counts["self_attn.q_proj.weight"] == 2


def test_prefetch_keeps_a_parameter_shared_between_two_layers_on_the_device():
    model = tiny_lm(4)
    model.layers[3].mlp.down_proj.weight = model.layers[1].mlp.down_proj.weight
    plan = plan_offload(model, prefetch(2, 1))
    assert not any(name.endswith("mlp.down_proj.weight") for name in plan.offloaded_params)
    assert "layers.1.mlp.up_proj.weight" in plan.offloaded_params
    notes = [note for note in plan.notes if "stays on the device" in note]
    assert notes == [
        "layers.1.mlp.down_proj.weight stays on the device: it is registered as "
        "layers.1.mlp.down_proj.weight, layers.3.mlp.down_proj.weight, not inside one layer"
    ]


def test_uva_filter_selects_a_tied_parameter_by_any_of_its_names():
    tied = tiny_lm(2, tie_embeddings=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", OffloadPlanWarning)
        plan = plan_offload(tied, uva(1, params=["lm_head"]))
    assert plan.offloaded_params == ("embed_tokens.weight",)


def test_offload_params_matching_only_outside_offloaded_layers_is_explained_not_warned():
    with warnings.catch_warnings():
        warnings.simplefilter("error", OffloadPlanWarning)
        plan = plan_offload(tiny_lm(4), prefetch(2, 1, params=["lm_head"]))
    assert plan.params == ()
    assert any("matches no parameter of the offloaded layers" in note for note in plan.notes)


# --------------------------------------------------------------------------------------------
# Patterns that match nothing
# --------------------------------------------------------------------------------------------


def test_unmatched_offload_params_pattern_warns_and_is_noted():
    with pytest.warns(OffloadPlanWarning, match="'expert'") as record:
        plan = plan_offload(tiny_lm(4), prefetch(2, 1, params=["mlp", "expert"]))
    assert len([w for w in record if issubclass(w.category, OffloadPlanWarning)]) == 1
    assert any("'expert'" in note and "offload_params" in note for note in plan.notes)
    assert not any("'mlp'" in note for note in plan.notes)
    assert all(".mlp." in name for name in plan.offloaded_params)
    assert plan.offloaded_params


def test_unmatched_cpu_offload_params_pattern_warns_and_is_noted():
    with pytest.warns(OffloadPlanWarning, match="'w2'"):
        plan = plan_offload(three_linears(), uva(1, ["w2", "c"]))
    assert any("'w2'" in note and "cpu_offload_params" in note for note in plan.notes)
    assert plan.offloaded_params == ("c.weight", "c.bias")


@pytest.mark.parametrize(
    "make",
    [
        lambda: (three_linears(), uva(1, ["nothing"])),
        lambda: (tiny_lm(4), prefetch(2, 1, params=["nothing"])),
    ],
    ids=["uva", "prefetch"],
)
def test_unmatched_patterns_warning_points_at_the_caller(make):
    model, config = make()
    with pytest.warns(OffloadPlanWarning) as record:
        plan_offload(model, config)
    assert record[0].filename == __file__


def test_matching_patterns_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error", OffloadPlanWarning)
        plan = plan_offload(tiny_lm(4), prefetch(2, 1, params=["mlp", "self_attn.q_proj"]))
        plan_offload(three_linears(), uva(1, ["a", "c.bias"]))
    assert not any("matched no parameter" in note for note in plan.notes)


# --------------------------------------------------------------------------------------------
# Backends and config forms
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        OffloadConfig(),
        OffloadConfig(uva={"cpu_offload_params": ["mlp"]}),
        OffloadConfig(prefetch={"offload_params": ["mlp"]}),
        OffloadConfig(layers="does.not.exist"),
        {},
        {"offload_backend": "auto"},
    ],
)
def test_backend_none_gives_an_empty_plan(config):
    model = tiny_lm(4)
    plan = plan_offload(model, config)
    assert plan.backend == "none"
    assert plan.params == ()
    assert plan.stacks == ()
    assert plan.pool == ()
    assert plan.layers == ()
    assert plan.candidates == ()
    assert plan.budget_bytes is None
    assert plan.offloaded_bytes == plan.pool_bytes == plan.device_bytes_saved == 0
    assert plan.total_param_bytes == sum(nbytes(p) for p in model.parameters())


PREFETCH_SETTINGS = {
    "prefetch": {
        "offload_group_size": 4,
        "offload_num_in_group": 2,
        "offload_prefetch_step": 2,
        "offload_params": ["mlp", "self_attn"],
    },
    "layers": "layers",
}
UVA_SETTINGS = {"uva": {"cpu_offload_gb": 1000 / GIB, "cpu_offload_params": ["layers"]}}


@pytest.mark.parametrize("settings", [PREFETCH_SETTINGS, UVA_SETTINGS], ids=["prefetch", "uva"])
@pytest.mark.parametrize("form", ["dict", "dictconfig"])
def test_config_as_dict_or_dictconfig_gives_the_same_plan(settings, form):
    model = tiny_lm(8)
    expected = plan_offload(model, OffloadConfig.model_validate(settings))
    config = settings if form == "dict" else OmegaConf.create(settings)
    plan = plan_offload(model, config)
    assert plan == expected
    assert plan.config_hash == OffloadConfig.model_validate(settings).compute_hash()
    assert plan.params


@SAVES_LITTLE
def test_layer_list_in_a_dictconfig():
    with torch.device("meta"):
        model = EncoderDecoder(2, 2)
    node = OmegaConf.create(
        {"prefetch": {"offload_group_size": 2}, "layers": ["encoder.block", "decoder.block"]}
    )
    plan = plan_offload(model, node)
    assert plan.layers == ("encoder.block", "decoder.block")
    assert [s.offloaded_layers for s in plan.stacks] == [(1,), (1,)]


# --------------------------------------------------------------------------------------------
# Purity: the planner reads structure only
# --------------------------------------------------------------------------------------------


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


@SAVES_LITTLE
def test_plan_on_a_real_cpu_model_changes_nothing():
    torch.manual_seed(0)
    model = DecoderLM(vocab_size=32, hidden_size=8, num_heads=2, intermediate_size=16,
                      num_layers=4, tie_embeddings=True)  # fmt: skip
    before = [(n, p, p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = [
        (m._forward_hooks.copy(), m._forward_pre_hooks.copy()) for m in model.modules()
    ]  # fmt: skip
    with _RecordOps() as recorder:
        plans = [
            plan_offload(model, prefetch(2, 1, step=2)),
            plan_offload(model, uva(1000 / GIB)),
            plan_offload(model, OffloadConfig()),
        ]
    assert recorder.ops == [], "planning must not run tensor operations"
    assert plans[0].params
    assert plans[1].params
    after = list(model.named_parameters())
    assert [n for n, *_ in before] == [n for n, _ in after]
    for (name, param, value, grad), (_, now) in zip(before, after, strict=True):
        assert now is param, name
        assert now.device.type == "cpu"
        assert now.requires_grad == grad
        assert torch.equal(now, value), name
    assert model.lm_head.weight is model.embed_tokens.weight
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert [
        (m._forward_hooks, m._forward_pre_hooks) for m in model.modules()
    ] == hooks  # fmt: skip


# --------------------------------------------------------------------------------------------
# A 7B-class model on meta
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_7b():
    with torch.device("meta"):
        return DecoderLM(hidden_size=4096, num_layers=32, num_heads=32, intermediate_size=11008,
                         vocab_size=32000, dtype=torch.bfloat16)  # fmt: skip


def test_7b_total_param_bytes(llama_7b):
    plan = plan_offload(llama_7b, OffloadConfig())
    assert plan.total_param_bytes == 6738415616 * 2


def test_7b_prefetch_every_fourth_layer(llama_7b):
    plan = plan_offload(llama_7b, prefetch(4, 1, step=1))
    h, inter = 4096, 11008
    per_layer = (4 * h * h + 3 * h * inter + 2 * h) * 2  # bf16
    assert per_layer == 404766720
    assert all(layer_bytes(layer) == per_layer for layer in llama_7b.layers)
    assert plan.stacks[0].offloaded_layers == (3, 7, 11, 15, 19, 23, 27, 31)
    assert plan.offloaded_bytes == 8 * per_layer
    assert plan.offloaded_bytes == sum(layer_bytes(llama_7b.layers[i]) for i in range(3, 32, 4))
    assert plan.pool_bytes == per_layer
    assert plan.device_bytes_saved == 7 * per_layer
    assert len(plan.params) == 8 * 9
    assert all(p.dtype == torch.bfloat16 for p in plan.params)


# --------------------------------------------------------------------------------------------
# The plan object
# --------------------------------------------------------------------------------------------


def test_plan_is_frozen():
    plan = plan_offload(tiny_lm(4), prefetch(2, 1))
    assert isinstance(plan, OffloadPlan)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.backend = "uva"
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.params[0].name = "x"
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.stacks[0].offloaded_layers = ()
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.pool[0].count = 9
    assert isinstance(plan.params, tuple)
    assert isinstance(plan.notes, tuple)


def test_prefetch_summary_shows_backend_layers_and_exact_bytes():
    plan = plan_offload(tiny_lm(24), prefetch(8, 2, step=2))
    text = plan.summary()
    assert "prefetch" in text
    assert "6, 7, 14, 15, 22, 23" in text
    assert "6 of 24 layers" in text
    for value in (
        plan.offloaded_bytes,
        plan.pool_bytes,
        plan.device_bytes_saved,
        plan.total_param_bytes,
    ):
        assert f"{value:,} B" in text, value
    for note in plan.notes:
        assert note[:40] in " ".join(text.split())


def test_uva_summary_shows_backend_budget_and_exact_bytes():
    plan = plan_offload(three_linears(), uva(1000 / GIB))
    text = plan.summary()
    assert "uva" in text
    assert "1,000 B" in text
    assert "1,240 B" in text
    assert "2,160 B" in text
