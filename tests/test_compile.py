"""torch.compile over a model with prefetch offloading: same outputs, no graph breaks, the
prefetch steps really run on every call, Inductor reads each layer's weights only between its
two steps, and CUDA graphs leave the steps out (see :mod:`hydra_offload.runtime.ops`).

The tests marked ``cuda`` are skipped on machines without a CUDA device.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from typing import NamedTuple

import pytest
import torch
import torch._inductor.compile_fx
import torch._inductor.config
import torch._inductor.scheduler
from torch._dynamo.utils import counters
from torch._inductor.utils import is_cudagraph_unsafe_op, run_and_get_code

import hydra_offload.runtime.ops  # noqa: F401 (defines the torch.ops.hydra_offload operators)
from hydra_offload import apply_offload
from hydra_offload.models import DecoderLM

PREFETCH = {"prefetch": {"offload_group_size": 2}}
CUDA_PREFETCH = {"prefetch": {"offload_group_size": 2, "offload_num_in_group": 1}}
OPS = torch.ops.hydra_offload
STEPS = [OPS.layer_begin, OPS.layer_end]
TWINS = [OPS.layer_begin_inductor, OPS.layer_end_inductor]


def small_model() -> DecoderLM:
    torch.manual_seed(0)
    model = DecoderLM(num_layers=4, hidden_size=64, intermediate_size=128, vocab_size=128)
    return model.eval()


def cuda_model() -> DecoderLM:
    torch.manual_seed(0)
    model = DecoderLM(vocab_size=1024, hidden_size=1024, num_layers=8, num_heads=8,
                      intermediate_size=2816)  # fmt: skip
    return model.cuda().eval()


def cuda_inputs() -> torch.Tensor:
    return torch.randint(0, 1024, (2, 64), device="cuda")


@pytest.fixture
def no_compile_caches():
    """Compile for real: the tests that look inside Inductor need it to run, not a cache."""
    with torch.compiler.config.patch(force_disable_caches=True):
        yield


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
        state = {k: -v for k, v in model.state_dict().items()}  # other weights, same scale
        model.load_state_dict(state)
        got = compiled(ids)
    fresh = small_model()
    fresh.load_state_dict(state)
    assert torch.equal(got, fresh(ids))


# -- CUDA graphs (mode="reduce-overhead") -----------------------------------------------------


@pytest.mark.parametrize("op", STEPS + TWINS, ids=str)
def test_prefetch_steps_are_tagged_unsafe_for_cuda_graphs(op):
    assert torch.Tag.cudagraph_unsafe in op.default.tags


@pytest.mark.parametrize("partition", [True, False], ids=["graph_partition", "no_partition"])
@pytest.mark.usefixtures("no_compile_caches")
@torch.no_grad()
def test_inductor_keeps_prefetch_steps_out_of_cuda_graphs(partition, monkeypatch):
    """On CPU Inductor records no CUDA graph, but the checks that read the tag still run:
    with graph partitions (the default), the one that splits the graph around an operator;
    without, the one that turns CUDA graphs off for the whole graph."""
    first_unsafe = []
    find_first = torch._inductor.compile_fx.get_first_incompatible_cudagraph_node

    def record_first(gm):
        node = find_first(gm)
        first_unsafe.append(node)
        return node

    unsafe_kernels: dict[str, bool] = {}
    should_partition = torch._inductor.scheduler.Scheduler.should_partition

    def record_partition(self, node, *args, **kwargs):  # torch 2.10 passes should_log=
        op = getattr(node.node, "op_overload", None)
        if op is not None:
            unsafe_kernels[str(op)] = is_cudagraph_unsafe_op(node.node)
        return should_partition(self, node, *args, **kwargs)

    monkeypatch.setattr(
        torch._inductor.compile_fx, "get_first_incompatible_cudagraph_node", record_first
    )
    monkeypatch.setattr(torch._inductor.scheduler.Scheduler, "should_partition", record_partition)
    model, ids = small_model(), torch.randint(0, 128, (2, 8))
    expected = model(ids)
    settings = torch._inductor.config.patch(graph_partition=partition)
    with apply_offload(model, PREFETCH) as handle, settings:
        compiled = torch.compile(model, mode="reduce-overhead")
        offloaded_layers = len(handle.plan.stacks[0].offloaded_layers)
        for calls in range(1, 4):
            torch.testing.assert_close(compiled(ids), expected)
            assert handle.stats.loads == calls * offloaded_layers
    if partition:
        twins = {str(op.default) for op in TWINS}
        assert {k: v for k, v in unsafe_kernels.items() if k in twins} == dict.fromkeys(twins, True)
        assert not any(v for k, v in unsafe_kernels.items() if k not in twins)
    else:
        assert [node.target for node in first_unsafe] == [OPS.layer_begin.default]


@pytest.mark.cuda
@torch.no_grad()
def test_reduce_overhead_copies_and_waits_at_every_call():
    model, ids = cuda_model(), cuda_inputs()
    expected = model(ids)
    state = {k: -v for k, v in model.state_dict().items()}  # other weights, same scale
    with apply_offload(model, CUDA_PREFETCH) as handle:
        compiled = torch.compile(model, mode="reduce-overhead")
        offloaded_layers = len(handle.plan.stacks[0].offloaded_layers)
        for calls in range(1, 6):  # warm-up, recording, then replays
            got = compiled(ids).clone()  # the next replay overwrites the output
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
            assert handle.stats.loads == calls * offloaded_layers
        assert handle.stats.stalls == 0
        # Replays read what the copies bring, not what the slots held when recorded.
        model.load_state_dict(state)
        for _ in range(3):
            got = compiled(ids).clone()
    fresh = cuda_model()
    fresh.load_state_dict(state)
    torch.testing.assert_close(got, fresh(ids), rtol=1e-4, atol=1e-4)


# -- Order of the weights' reads in Inductor's code --------------------------------------------

_STEP_CALL = re.compile(
    r"torch\.ops\.hydra_offload\.(layer_begin|layer_end)_inductor\.default"
    r"\((?P<activation>\w+), \[(?P<weights>[^\]]*)\], (?P<ring>\d+), (?P<position>\d+)\)"
)
_NOT_A_READ = ("assert_size_stride(", "assert_alignment(", "del ", "args.clear()")


def check_reads_between_steps(code: str, layers: int, weights: list[int]) -> None:
    """In Inductor's generated wrapper: every line that touches an offloaded layer's weights
    comes after that layer's ``layer_begin`` and before its ``layer_end``; each weight is read
    there; none is cloned or copied. ``weights``: how many each offloaded layer has."""
    start = code.index("def call(")
    indent = start - code.rfind("\n", 0, start) - 1  # a method in torch 2.13, not in 2.11
    lines = []
    for line in code[start:].splitlines()[1:]:
        if line.strip() and len(line) - len(line.lstrip()) <= indent:
            break  # the end of ``call`` (a benchmark harness follows)
        lines.append(line.strip())
    steps: dict[tuple[str, int], tuple[int, list[str]]] = {}
    for number, line in enumerate(lines):
        if match := _STEP_CALL.search(line):
            names = re.findall(r"\b\w+\b", match["weights"])
            steps[(match[1], int(match["position"]))] = (number, names)
    assert len(steps) == 2 * layers, steps.keys()
    for position in range(layers):
        begin, names = steps[("layer_begin", position)]
        end, end_names = steps[("layer_end", position)]
        assert names == end_names
        assert len(names) == weights[position]
        assert begin < end
        read = set()
        for number, line in enumerate(lines):
            if number in (begin, end) or line.startswith("#") or line.endswith("= args"):
                continue
            touched = [n for n in names if re.search(rf"\b{n}\b", line)]
            if not touched or line.startswith(_NOT_A_READ):
                continue
            assert begin < number < end, f"{touched} read outside its layer's steps: {line}"
            assert "clone" not in line, line
            assert "copy_" not in line.replace("_to_copy", ""), line
            read.update(touched)
        assert read == set(names), f"weights never read between the steps: {set(names) - read}"


class _Step(NamedTuple):
    """A prefetch step as Inductor's scheduler holds it (a fallback kernel of a twin)."""

    node: str
    weights: frozenset[str]
    """The buffer names of the layer's weights, as the step reads them."""
    written: frozenset[str]
    """Their names after the step, which declares them written: a later read of the
    weights is a read of these, and depends on the step."""


class _Node(NamedTuple):
    name: str
    reads: frozenset[str]
    ancestors: frozenset[str]


class SchedulerNodes:
    """Inductor's scheduler nodes before fusion, once their dependencies are computed (a
    ``_pre_fusion_custom_pass`` that changes nothing): what each reads, what it comes after,
    and the prefetch steps among them."""

    def __init__(self) -> None:
        self.nodes: list[_Node] = []
        self.steps: dict[tuple[str, int], _Step] = {}

    def __call__(self, nodes: list) -> list:
        for node in nodes:
            self.nodes.append(
                _Node(
                    node.get_name(),
                    frozenset(dep.name for dep in node.read_writes.reads),
                    frozenset(node.ancestors),
                )
            )
            match = _TWIN_NAME.fullmatch(str(getattr(node.node, "op_overload", "")))
            if match is None:
                continue
            kernel = node.node
            weights = {buf.get_name() for buf in kernel.inputs[1:]}
            renamed = {
                out.get_name()
                for out in kernel.mutation_outputs
                if set(out.get_mutation_names()) & weights
            }
            key = (match[1], kernel.constant_args[1])
            assert key not in self.steps, key  # one ring
            self.steps[key] = _Step(node.get_name(), frozenset(weights), frozenset(renamed))
        return nodes

    def check_reads_between_steps(self, layers: int, *, casts: bool) -> None:
        """Every node that reads an offloaded layer's weights reads what that layer's
        ``layer_begin`` wrote, and comes after it and before its ``layer_end`` in the
        dependency graph Inductor schedules by (not only in the order it happens to emit):
        a read with nothing but a weight as input (a cast under autocast) included.
        ``casts``: such reads exist."""
        assert {position for _, position in self.steps} == set(range(layers))
        for position in range(layers):
            begin = self.steps[("layer_begin", position)]
            end = self.steps[("layer_end", position)]
            end_ancestors = next(n.ancestors for n in self.nodes if n.name == end.node)
            weights = begin.weights | begin.written | end.weights | end.written
            readers = [
                n for n in self.nodes if n.reads & weights and n.name not in (begin.node, end.node)
            ]
            read = {name for n in readers for name in n.reads & begin.written}
            assert read == begin.written, f"weights never read in layer {position}"
            for node in readers:
                assert node.reads & weights <= begin.written, f"{node.name} reads {node.reads}"
                assert begin.node in node.ancestors, f"{node.name} may run before the layer"
                assert node.name in end_ancestors, f"{node.name} may run after the layer"
            weight_only = [n for n in readers if n.reads <= weights]
            assert bool(weight_only) == casts, [n.name for n in weight_only]


_TWIN_NAME = re.compile(r"hydra_offload\.(layer_begin|layer_end)_inductor\.default")


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
@pytest.mark.usefixtures("no_compile_caches")
@torch.no_grad()
def test_inductor_reads_each_layers_weights_between_its_steps(autocast):
    model, ids = small_model(), torch.randint(0, 128, (2, 8))

    def context() -> contextlib.AbstractContextManager:
        return torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()

    with context():
        expected = torch.compile(model)(ids)
    torch._dynamo.reset()
    with apply_offload(model, PREFETCH) as handle, context():
        compiled = torch.compile(model)
        weights = [len(layer.params) for layer in handle._installed.rings[0].layers]
        # CPU Inductor keeps program order, so the generated code alone would not show a
        # read the scheduler is free to hoist: its dependency graph is checked too.
        scheduled = SchedulerNodes()
        with torch._inductor.config.patch(_pre_fusion_custom_pass=scheduled):
            got, (code, *_) = run_and_get_code(compiled, ids)
        assert torch.equal(got, expected)
        assert handle.stats.loads == len(weights)
        for calls in range(2, 5):
            assert torch.equal(compiled(ids), expected)
            assert handle.stats.loads == calls * len(weights)
        assert handle.stats.stalls == 0
    check_reads_between_steps(code, len(weights), weights)
    scheduled.check_reads_between_steps(len(weights), casts=autocast)
    assert dict(counters["graph_break"]) == {}


_FRESH_PROCESS = """
import sys
import torch
from hydra_offload import apply_offload
from hydra_offload.models import DecoderLM
assert "torch._inductor.lowering" not in sys.modules
from torch._inductor.utils import run_and_get_code
model = DecoderLM(num_layers=4, hidden_size=64, intermediate_size=128, vocab_size=128).eval()
with torch.no_grad(), apply_offload(model, {"prefetch": {"offload_group_size": 2}}):
    _, codes = run_and_get_code(torch.compile(model), torch.zeros(2, 8, dtype=torch.long))
print(all(f"{step}_inductor.default(" in codes[0] for step in ("layer_begin", "layer_end")))
"""


def test_inductor_lowers_to_the_twins_when_first_imported_by_the_compile():
    """The lowering is registered lazily (see :func:`ops._lower_to_twins`): in a fresh
    interpreter, where nothing imported Inductor's lowering before ``torch.compile``, the
    generated code still calls the twins."""
    env = dict(os.environ, TORCHINDUCTOR_FORCE_DISABLE_CACHES="1")
    done = subprocess.run(
        [sys.executable, "-c", _FRESH_PROCESS], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "True"


@pytest.mark.cuda
@pytest.mark.usefixtures("no_compile_caches")
@torch.no_grad()
def test_inductor_under_bf16_autocast_matches_eager_on_cuda():
    model, ids = cuda_model(), cuda_inputs()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        expected = model(ids)
        with apply_offload(model, CUDA_PREFETCH) as handle:
            compiled = torch.compile(model)
            weights = [len(layer.params) for layer in handle._installed.rings[0].layers]
            got, (code, *_) = run_and_get_code(compiled, ids)
            torch.testing.assert_close(got, expected, rtol=2e-2, atol=4e-2)
            assert handle.stats.loads == len(weights)
            for calls in range(2, 5):
                torch.testing.assert_close(compiled(ids), expected, rtol=2e-2, atol=4e-2)
                assert handle.stats.loads == calls * len(weights)
            assert handle.stats.stalls == 0
    check_reads_between_steps(code, len(weights), weights)
