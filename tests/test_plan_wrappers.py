"""Planning through ``torch.compile`` wrappers, ``layers`` entries that select nothing, and
the warnings for auto-detected stacks that mix layer classes or save little.

The models are small, built here, and mostly on the ``meta`` device: planning reads
structure only. ``torch.compile`` only wraps a module (``OptimizedModule``, the original
under ``_orig_mod``) until its first call, so nothing is compiled here.
"""

from __future__ import annotations

import itertools
import re
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

from hydra_offload import LayerStackError, OffloadPlanWarning, apply_offload, plan_offload
from hydra_offload.models import DecoderLM
from hydra_offload.plan import MIN_SAVED_FRACTION

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.script_method. is deprecated")


def prefetch(layers=None, group=2, k=1, step=1):
    settings = {
        "offload_group_size": group,
        "offload_num_in_group": k,
        "offload_prefetch_step": step,
    }
    return {"prefetch": settings, "layers": layers}


def nbytes(module):
    return sum(p.numel() * p.element_size() for p in module.parameters())


def plan_quietly(model, config):
    """Plan, failing on any OffloadPlanWarning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", OffloadPlanWarning)
        return plan_offload(model, config)


def plan_warnings(model, config):
    """The plan and the messages of the OffloadPlanWarnings it emitted."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = plan_offload(model, config)
    return plan, [str(w.message) for w in caught if w.category is OffloadPlanWarning]


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)


class Net(nn.Module):
    """Eight blocks under ``blocks`` and a head."""

    def __init__(self, n=8):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(n))
        self.head = nn.Linear(8, 2)


class Holder(nn.Module):
    """A LightningModule-like holder: the network under ``net``, compiled or not."""

    def __init__(self, net, compile_net=True):
        super().__init__()
        self.net = torch.compile(net) if compile_net else net
        self.loss = nn.CrossEntropyLoss()


class Outer(nn.Module):
    """A network holding a compiled network of its own under ``inner``."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(8, 8)
        self.inner = torch.compile(Net())


class SeqHolder(nn.Module):
    """The stack itself is compiled: ``seq`` is an OptimizedModule around a Sequential."""

    def __init__(self):
        super().__init__()
        self.seq = torch.compile(nn.Sequential(*(Block() for _ in range(8))))


class CompiledLayers(nn.Module):
    """Each layer of the stack is compiled on its own."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(torch.compile(Block()) for _ in range(4))


def dense_net(sizes=(784, 256, 256, 256, 10)):
    """The shape of the Lightning-Hydra template's dense MNIST model: Linear, BatchNorm1d,
    ReLU repeated, then a last Linear, all children of one Sequential under ``model``."""
    net = nn.Module()
    layers: list[nn.Module] = []
    for width_in, width_out in itertools.pairwise(sizes[:-1]):
        layers += [nn.Linear(width_in, width_out), nn.BatchNorm1d(width_out), nn.ReLU()]
    layers.append(nn.Linear(sizes[-2], sizes[-1]))
    net.model = nn.Sequential(*layers)
    return net


def on_meta(make: Callable[[], nn.Module]) -> nn.Module:
    with torch.device("meta"):
        return make()


# --------------------------------------------------------------------------------------------
# Explicit paths through compiled wrappers
# --------------------------------------------------------------------------------------------

# (id, model factory, offload.layers as the user writes it, the real path of the stack,
#  the uncompiled twin and its path: the plan must offload the same layers and bytes)
COMPILED_PATHS = [
    ("compiled-submodule", lambda: Holder(Net()), "net.blocks", "net._orig_mod.blocks"),
    ("compiled-root", lambda: torch.compile(Net()), "blocks", "_orig_mod.blocks"),
    (
        "nested-compiled",
        lambda: Holder(Outer()),
        "net.inner.blocks",
        "net._orig_mod.inner._orig_mod.blocks",
    ),
    ("compiled-stack", SeqHolder, "seq", "seq._orig_mod"),
]


@pytest.mark.parametrize(
    ("make", "entry", "real"),
    [case[1:] for case in COMPILED_PATHS],
    ids=[case[0] for case in COMPILED_PATHS],
)
def test_explicit_path_resolves_through_compiled_wrappers(make, entry, real):
    model = on_meta(make)
    plan = plan_quietly(model, prefetch(layers=entry))
    stack = model.get_submodule(real)
    assert plan.layers == (real,)
    assert plan.stacks[0].path == real
    assert plan.stacks[0].num_layers == 8
    assert plan.stacks[0].offloaded_layers == (1, 3, 5, 7)
    # Names are the model's own (named_parameters() of the compiled model), in its order.
    expected = tuple(
        name
        for name, _ in model.named_parameters()
        if name.startswith(tuple(f"{real}.{i}." for i in (1, 3, 5, 7)))
    )
    assert len(expected) == 4 * 4
    assert plan.offloaded_params == expected
    assert plan.offloaded_bytes == 4 * nbytes(stack[0])
    assert plan.device_bytes_saved == 3 * nbytes(stack[0])
    assert all(p.stack == real for p in plan.params)
    assert any(f"{entry!r} resolves to {real!r}" in note for note in plan.notes), plan.notes
    assert not any("stays on the device" in note for note in plan.notes)
    # The real path works too, without the note; auto-detection finds the same stack.
    named = plan_quietly(model, prefetch(layers=real))
    assert named.params == plan.params
    assert not any("resolves to" in note for note in named.notes)
    detected = plan_quietly(model, prefetch())
    assert detected.layers == (real,)
    assert detected.params == plan.params


def test_compiled_layers_are_counted_by_the_class_they_wrap():
    model = on_meta(CompiledLayers)
    plan = plan_quietly(model, prefetch())
    chosen = plan.candidates[0]
    assert (chosen.layer_class, chosen.same_class, chosen.num_children) == ("Block", 4, 4)
    assert plan.offloaded_params[0] == "blocks.1._orig_mod.fc.weight"
    assert "4/4 Block" in plan.summary()


def test_apply_offload_on_a_compiled_model_uses_the_real_names():
    torch.manual_seed(0)
    model = Holder(Net())
    handle = apply_offload(model, prefetch(layers="net.blocks"))
    try:
        assert handle.plan.offloaded_params[0] == "net._orig_mod.blocks.1.fc.weight"
        assert handle.stats.offloaded_bytes == 4 * nbytes(model.net.blocks[0])
    finally:
        handle.remove()


# --------------------------------------------------------------------------------------------
# layers entries that select nothing
# --------------------------------------------------------------------------------------------


class WithExtras(nn.Module):
    """A compiled network beside a list of parameter-free layers and a list whose weights
    are all registered a second time elsewhere."""

    def __init__(self):
        super().__init__()
        self.net = torch.compile(Net())
        self.acts = nn.ModuleList(nn.ReLU() for _ in range(4))
        self.tied = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))
        self.mirror = nn.ModuleList([self.tied[1], self.tied[0]])


# (id, offload.layers, fragments the error must contain)
NOTHING_SELECTED = [
    (
        "typo-under-compiled",
        "net.block",
        [
            "offload.layers: 'net.block' does not exist in WithExtras",
            "net (Net) has no submodule 'block'",
            "its children: blocks (ModuleList), head (Linear)",
            "closest paths: net.blocks",
            "module lists found: net.blocks (8 x Block)",
        ],
    ),
    (
        "missing-at-root",
        "layers",
        [
            "'layers' does not exist",
            "<root> (WithExtras) has no submodule 'layers'",
            "its children: net (Net), acts (ModuleList), tied (ModuleList), mirror (ModuleList)",
        ],
    ),
    (
        "compiled-module-not-a-list",
        "net",
        ["'net' is a Net, not an nn.ModuleList", "module lists inside it: net.blocks (8 x Block)"],
    ),
    (
        "one-layer-of-a-list",
        "net.blocks.2",
        ["'net.blocks.2' is a Block, not an nn.", "it is one layer of 'net.blocks'"],
    ),
    (
        "leaf-module",
        "net.head",
        ["'net.head' is a Linear, not an nn.", "it has no children", "module lists found:"],
    ),
    (
        "no-parameters",
        "acts",
        ["'acts' (4 x ReLU) selects nothing to offload: its layers hold no parameters"],
    ),
    (
        "all-shared",
        "tied",
        [
            "'tied' (2 x Linear) selects nothing to offload",
            "registered outside its own layer",
            "tied.0.weight is registered as tied.0.weight, mirror.1.weight",
        ],
    ),
    (
        "same-list-twice",
        ["net.blocks", "net._orig_mod.blocks"],
        ["'net._orig_mod.blocks' and 'net.blocks' name the same module list"],
    ),
]


@pytest.mark.parametrize(
    ("entry", "fragments"),
    [case[1:] for case in NOTHING_SELECTED],
    ids=[case[0] for case in NOTHING_SELECTED],
)
def test_a_layers_entry_selecting_nothing_is_an_error_saying_what_is_there(entry, fragments):
    model = on_meta(WithExtras)
    with pytest.raises(LayerStackError) as caught:
        plan_offload(model, prefetch(layers=entry))
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [("net.block", "closest paths: net.blocks"), ("acts", "selects nothing"), ("tied", "selects")],
)
def test_apply_offload_refuses_such_an_entry_before_touching_the_model(entry, fragment):
    model = WithExtras()
    before = [(name, p, p.data_ptr()) for name, p in model.named_parameters()]
    with pytest.raises(LayerStackError, match=f"{re.escape(repr(entry))}.*{fragment}"):
        apply_offload(model, prefetch(layers=entry))
    after = [(name, p, p.data_ptr()) for name, p in model.named_parameters()]
    assert [(n, id(p), ptr) for n, p, ptr in after] == [(n, id(p), ptr) for n, p, ptr in before]
    assert all(p.device.type == "cpu" for _, p, _ in after)
    # No offload is left registered on the model: a valid plan applies.
    apply_offload(model, prefetch(layers="net.blocks")).remove()


# --------------------------------------------------------------------------------------------
# Mixed stacks and small savings
# --------------------------------------------------------------------------------------------

MIXED = "is mixed"
LOW = "below the 5% under which hydra-offload warns"


def lm_with_big_vocab():
    """A homogeneous stack that holds under 5% of the model: the embeddings dominate."""
    return DecoderLM(vocab_size=4096, hidden_size=8, num_heads=2, intermediate_size=16,
                     num_layers=4)  # fmt: skip


def mixed_blocks():
    """A mixed list whose offloaded layers save plenty: Blocks with a Linear among them."""
    model = nn.Module()
    model.layers = nn.ModuleList([Block(), Block(), Block(), nn.Linear(8, 8), Block(), Block()])
    return model


def repeated_block():
    """A stack that holds one Block at two positions: still four layers of one class."""
    model = nn.Module()
    first = Block()
    model.layers = nn.ModuleList([first, Block(), first, Block()])
    return model


# (id, model factory, offload.layers, expected warnings, the candidate's "k/n Class" or None)
WARNING_CASES = [
    ("dense-net", dense_net, None, [MIXED, LOW], "4/10 Linear"),
    ("compiled-dense-net", lambda: Holder(dense_net()), None, [MIXED, LOW], "4/10 Linear"),
    ("dense-net-named", dense_net, "model", [LOW], None),
    ("mixed-saving-enough", mixed_blocks, None, [MIXED], "5/6 Block"),
    ("homogeneous-small-share", lm_with_big_vocab, None, [LOW], "4/4 DecoderBlock"),
    ("repeated-module", repeated_block, None, [], "4/4 Block"),
    ("homogeneous", lambda: DecoderLM(num_layers=8, vocab_size=32), None, [], "8/8 DecoderBlock"),
]


@pytest.mark.parametrize(
    ("make", "layers", "expected", "share"),
    [case[1:] for case in WARNING_CASES],
    ids=[case[0] for case in WARNING_CASES],
)
def test_mixed_and_low_saving_plans_warn_and_say_so(make, layers, expected, share):
    model = on_meta(make)
    plan, messages = plan_warnings(model, prefetch(layers=layers))
    assert [kind for kind in (MIXED, LOW) if any(kind in m for m in messages)] == expected
    assert len(messages) == len(expected), messages
    for message in messages:
        assert message in plan.notes
        assert " ".join(message.split()[:8]) in " ".join(plan.summary(width=300).split())
    summary = plan.summary(width=200)
    if share is None:
        assert plan.candidates == ()
    else:
        assert share in summary
        assert [c.class_share for c in plan.candidates if c.chosen] == [share]


def test_the_dense_net_messages_name_the_classes_layers_and_figures():
    model = on_meta(dense_net)
    plan, (mixed, low) = plan_warnings(model, prefetch())
    assert plan.stacks[0].offloaded_layers == (1, 3, 7, 9)
    assert mixed == (
        "offload.layers: the auto-detected layer stack 'model' is mixed: 4 of its 10 children "
        "are Linear, the others 3 BatchNorm1d, 3 ReLU; layers are offloaded by position, so "
        "this offloads 2 BatchNorm1d, 2 Linear (layers 1, 3, 7, 9). Set offload.layers to the "
        "path of the model's repeated blocks, or to 'model' to keep this stack without this "
        "warning"
    )
    saved, total = plan.device_bytes_saved, plan.total_param_bytes
    assert saved < MIN_SAVED_FRACTION * total
    assert low.startswith(
        f"the plan saves {saved:,} B of device memory, {100 * saved / total:.1f}% of the "
        f"model's {total:,} parameter bytes, below the 5% under which hydra-offload warns "
        "(hydra_offload.plan.MIN_SAVED_FRACTION); the device buffer pool "
        f"({plan.pool_bytes:,} B"
    )


def test_the_warnings_point_at_the_caller():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan_offload(on_meta(dense_net), prefetch())
    plan_warnings = [w for w in caught if w.category is OffloadPlanWarning]
    assert len(plan_warnings) == 2
    assert all(w.filename == __file__ for w in plan_warnings)


@pytest.mark.parametrize(
    ("group", "k", "step"),
    [(2, 1, 1), (2, 1, 2), (2, 1, 4), (4, 1, 1), (8, 1, 1), (8, 2, 2), (1, 1, 1), (1, 1, 8)],
)
def test_the_low_saving_warning_fires_exactly_below_the_threshold(group, k, step):
    model = on_meta(lambda: DecoderLM(num_layers=8, vocab_size=512, hidden_size=8,
                                      num_heads=2, intermediate_size=16))  # fmt: skip
    plan, messages = plan_warnings(model, prefetch(group=group, k=k, step=step))
    low = plan.device_bytes_saved < MIN_SAVED_FRACTION * plan.total_param_bytes
    assert any(LOW in m for m in messages) is low
    assert any(LOW in note for note in plan.notes) is low
    assert "8/8 DecoderBlock" in plan.summary()


def test_several_candidates_say_most_parameter_bytes_one_says_it_was_the_only_one():
    model = on_meta(dense_net)
    model.extra = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    plan, _ = plan_warnings(model, prefetch())
    decided = {c.path: c for c in plan.candidates}
    assert decided["model"].reason == "most parameter bytes"
    assert "chosen: most parameter bytes" in plan.summary(width=200)

    plan, _ = plan_warnings(on_meta(dense_net), prefetch())
    assert [c.reason for c in plan.candidates] == ["the only candidate"]
    summary = plan.summary(width=200)
    assert "chosen: the only candidate" in summary
    assert "most parameter bytes" not in summary


def test_a_module_list_without_parameters_is_not_a_candidate_stack():
    model = on_meta(Net)
    model.acts = nn.ModuleList(nn.ReLU() for _ in range(16))
    plan = plan_quietly(model, prefetch())
    decided = {c.path: c for c in plan.candidates}
    assert plan.layers == ("blocks",)
    assert decided["acts"].reason == "no parameters"
    assert decided["blocks"].reason == "the only candidate"
