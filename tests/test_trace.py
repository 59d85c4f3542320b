"""The timeline of a forward (:meth:`OffloadHandle.trace`, :mod:`hydra_offload.runtime.trace`)
and its picture, ``offload_timeline.png`` (:func:`hydra_offload.pictures.timeline_figure`;
docs/spec.md §8.6)."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from hydra_offload import apply_offload
from hydra_offload.models import DecoderLM
from hydra_offload.pictures import (
    BACKWARD_COLOR,
    STALL_COLOR,
    TIMELINE_PICTURE,
    layer_cells,
    save_timeline_picture,
    timeline_figure,
)
from hydra_offload.runtime.simulated import SimulatedDevice
from hydra_offload.runtime.trace import CLOCKS, StepTrace, TraceSpan

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"
SIZES = {"hidden_size": 32, "num_heads": 4, "intermediate_size": 64, "vocab_size": 64}


def decoder(num_layers: int = 6) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = DecoderLM(num_layers=num_layers, **SIZES).eval()
    return model, torch.randint(0, 64, (2, 8))


def check_ordered(trace: StepTrace) -> None:
    for span in trace.spans:
        assert 0 <= span.start_ms <= span.end_ms
    compute = trace.lane("compute")
    for before, after in itertools.pairwise(compute):
        assert before.end_ms <= after.start_ms


def test_a_cpu_trace_has_one_compute_span_per_offloaded_layer_and_a_copy_per_load():
    model, ids = decoder()
    with apply_offload(model, {"prefetch": {"offload_group_size": 2}}) as handle, torch.no_grad():
        model(ids)  # warm
        loads = handle.stats.loads
        with handle.trace() as trace:
            model(ids)
        loads = handle.stats.loads - loads
    assert trace.clock == CLOCKS["cpu"] == "wall clock (CPU: copies are synchronous)"
    compute = trace.lane("compute")
    assert [s.label for s in compute] == ["layers.1", "layers.3", "layers.5"]
    assert [s.position for s in compute] == [0, 1, 2]
    copies = trace.lane("copy")
    assert len(copies) == loads == 3
    assert trace.stalls == []
    check_ordered(trace)
    # On the CPU copies are synchronous: each ends before the next compute starts.
    for copy in copies:
        later = [s for s in compute if s.start_ms >= copy.end_ms]
        earlier = [s for s in compute if s.end_ms <= copy.start_ms]
        assert len(later) + len(earlier) == len(compute)


def test_without_a_trace_nothing_is_recorded_and_traces_do_not_nest():
    model, ids = decoder(4)
    with apply_offload(model, {"prefetch": {"offload_group_size": 2}}) as handle:
        assert all(ring.trace is None for ring in handle._installed.rings)
        with handle.trace() as trace:
            with pytest.raises(RuntimeError, match="do not nest"), handle.trace():
                pass
            with torch.no_grad():
                model(ids)
        assert all(ring.trace is None for ring in handle._installed.rings)
        assert trace.spans
    removed = handle.trace()
    with removed as empty:
        pass
    assert empty.spans == []


def test_other_backends_give_an_empty_trace():
    model, ids = decoder(2)
    uva = {"uva": {"cpu_offload_gb": 1}}
    with apply_offload(model, uva) as handle, torch.no_grad(), handle.trace() as trace:
        model(ids)
    assert trace.spans == []
    assert trace.clock == CLOCKS["cpu"]


def test_on_the_simulated_device_a_copy_ends_before_the_compute_that_waits_for_it():
    model, ids = decoder()
    config = {"prefetch": {"offload_group_size": 2}}
    simulated = SimulatedDevice(min_delay_ms=3, max_delay_ms=3)
    with simulated, apply_offload(model, config) as handle, torch.no_grad():
        model(ids)
        with handle.trace() as trace:
            model(ids)
    assert trace.clock == CLOCKS["simulated"] == "simulated device clock"
    check_ordered(trace)
    compute = trace.lane("compute")
    assert [s.layer for s in compute] == [1, 3, 5]
    for span in compute:
        # The copy that filled the layer's slots before it computed.
        loads = [c for c in trace.lane("copy") if c.position == span.position]
        waited = [c for c in loads if c.start_ms <= span.start_ms]
        if waited:
            assert waited[-1].end_ms <= span.start_ms
    copies = trace.lane("copy")
    assert copies
    assert all(c.duration_ms >= 2.5 for c in copies)  # the simulated delay


def test_a_load_on_demand_is_recorded_as_a_stall():
    model, ids = decoder(4)
    with apply_offload(model, {"prefetch": {"offload_group_size": 2}}) as handle, torch.no_grad():
        model(ids)
        hidden = model.embed_tokens(ids)
        stalls = handle.stats.stalls
        with handle.trace() as trace:
            model.layers[3](hidden)  # the slot holds layer 1: layer 3 loads on demand
        assert handle.stats.stalls == stalls + 1
    (stall,) = trace.stalls
    assert (stall.lane, stall.label) == ("copy", "layers.3")
    (compute,) = trace.lane("compute")
    assert compute.label == "layers.3"
    assert stall.end_ms <= compute.start_ms
    figure = timeline_figure(trace)
    (bar,) = layer_cells(figure, gid="stall")
    assert bar.get_facecolor() == layer_cells(figure, STALL_COLOR, "stall")[0].get_facecolor()
    assert len(layer_cells(figure, gid="compute")) == 1
    # After layer 3, the ring prefetched layer 1 into the slot again: a plain copy.
    assert len(layer_cells(figure, gid="copy")) == 1
    assert len(layer_cells(figure, gid="stall")) == 1


def test_the_figure_has_a_bar_per_span_on_its_lane_and_names_the_clock(tmp_path):
    model, ids = decoder()
    with apply_offload(model, {"prefetch": {"offload_group_size": 2}}) as handle, torch.no_grad():
        model(ids)
        with handle.trace() as trace:
            model(ids)
    figure = timeline_figure(trace)
    compute, copies = layer_cells(figure, gid="compute"), layer_cells(figure, gid="copy")
    assert len(compute) == 3
    assert len(copies) == len(trace.lane("copy"))
    assert {c.get_y() for c in compute} != {c.get_y() for c in copies}  # two lanes
    assert [c.get_x() for c in compute] == [s.start_ms for s in trace.lane("compute")]
    title = figure.axes[0].get_title(loc="left")
    assert title == "Offload timeline: one forward  (wall clock (CPU: copies are synchronous))"
    assert figure.axes[0].get_xlabel() == "time (ms)"
    path = save_timeline_picture(trace, tmp_path / TIMELINE_PICTURE)
    assert path.read_bytes().startswith(PNG)


def test_run_py_writes_the_timeline_next_to_the_plan_picture(tmp_path):
    args = ["offload=prefetch", "offload.prefetch.offload_group_size=2", "data.samples=8",
            "data.seq_len=32", "model.num_layers=4"]  # fmt: skip
    result = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *args, f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path,
        env={**os.environ, "COLUMNS": "160"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    picture = tmp_path / "run" / TIMELINE_PICTURE
    assert f"timeline picture: {picture}" in result.stdout
    assert picture.read_bytes().startswith(PNG)
    assert (tmp_path / "run" / "offload_plan.png").exists()


# ------------------------------------------------------------------------- a training step


def traced_training_step(model: nn.Module, ids: torch.Tensor) -> StepTrace:
    with apply_offload(model, {"prefetch": {"offload_group_size": 2}}, training=True) as handle:
        model(ids).sum().backward()  # warm
        with handle.trace() as trace:
            model(ids).sum().backward()
    return trace


@pytest.mark.parametrize("checkpointed", [False, True], ids=["plain", "checkpointed"])
def test_a_training_step_has_each_layer_s_forward_then_its_backward_in_reverse(
    run_on, checkpointed
):
    torch.manual_seed(0)
    model = DecoderLM(num_layers=6, gradient_checkpointing=checkpointed, **SIZES).train()
    trace = traced_training_step(model, torch.randint(0, 64, (2, 8)))
    forward, backward = trace.lane("compute", "forward"), trace.lane("compute", "backward")
    # A recomputation inside a layer's backward is part of that backward, not a forward.
    assert [s.layer for s in forward] == [1, 3, 5]
    assert [s.layer for s in backward] == [5, 3, 1]
    assert forward[-1].end_ms <= backward[0].start_ms
    check_ordered(trace)
    # Backward loads layers 3 and 1 again (their slots went to the layers after them); each
    # load ends before the backward that waits for it starts.
    for span in backward[1:]:
        (load,) = [c for c in trace.lane("copy") if c.layer == span.layer
                   and backward[0].start_ms <= c.start_ms]  # fmt: skip
        assert load.end_ms <= span.start_ms
    assert trace.stalls == []
    figure = timeline_figure(trace)
    assert len(layer_cells(figure, gid="compute")) == 3
    assert len(layer_cells(figure, gid="backward")) == 3
    assert len(layer_cells(figure, BACKWARD_COLOR, "backward")) == 3
    title = figure.axes[0].get_title(loc="left")
    assert title.startswith("Offload timeline: one training step  (")


def test_a_bar_too_short_to_see_is_drawn_wide_enough_to_show():
    spans = [TraceSpan("compute", "compute", "layers", 0, 1, 0.0, 10.0),
             TraceSpan("copy", "copy", "layers", 1, 3, 4.0, 4.001)]  # fmt: skip
    figure = timeline_figure(spans)
    (compute,) = layer_cells(figure, gid="compute")
    (copy,) = layer_cells(figure, gid="copy")
    assert compute.get_width() == 10.0  # drawn as long as it took
    assert copy.get_x() == 4.0
    assert copy.get_width() == pytest.approx(0.03)  # 0.3% of the 10 ms axis
