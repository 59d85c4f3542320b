"""Recording the timeline of a step: when each offloaded layer computed (its forward and, in
training, its backward), when its weights were copied in, and which copies were loads on
demand (stalls).

A :class:`StepTrace` is what :meth:`hydra_offload.offload.OffloadHandle.trace` yields. While
it is active, the prefetch backend's ring marks each event on the stream it belongs to: a
copy's start and end on the copy stream (after the waits that order it, around its copies), a
layer's compute start on the compute stream once its weights are ready (after its forward
pre-hook made the stream wait for them) and its end in its forward hook; in a backward pass,
a layer's backward from when the gradient reaches its output (once its weights are ready
again) to when the gradient of its input is complete. Where the runtime
has timing events (an accelerator, the simulated device), a mark is one, recorded on its
stream, so it measures when the device got there; on the CPU it is the host's clock
(``time.perf_counter()``), and copies are synchronous there, so a copy span is the time the
copy took. When the trace ends, the runtime is synchronized and every mark is resolved to
milliseconds from the earliest one: :attr:`StepTrace.spans`. The ring checks one attribute per
hook when no trace is active, so not tracing costs nothing.

Example (a training step on the CPU: two offloaded layers, one slot; backward walks them in
reverse and loads layer 1 again for its backward):
    >>> import torch
    >>> from hydra_offload import apply_offload
    >>> from hydra_offload.models import DecoderLM
    >>> model = DecoderLM(num_layers=4)
    >>> ids = torch.randint(0, 1024, (2, 16))
    >>> with apply_offload(model, {"prefetch": {"offload_group_size": 2}}) as handle:
    ...     with handle.trace() as trace:
    ...         model(ids).logsumexp(-1).mean().backward()
    >>> trace.clock
    'wall clock (CPU: copies are synchronous)'
    >>> [f"{s.phase} {s.label}" for s in trace.lane("compute")]
    ['forward layers.1', 'forward layers.3', 'backward layers.3', 'backward layers.1']
    >>> [s.label for s in trace.lane("copy")]
    ['layers.3', 'layers.1']
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["CLOCKS", "StackTrace", "StepTrace", "TraceSpan"]

CLOCKS = {
    "device": "device timing events",
    "cpu": "wall clock (CPU: copies are synchronous)",
    "simulated": "simulated device clock",
}
"""How a trace's times were measured, by the kind of runtime: :attr:`StepTrace.clock`."""

Lane = Literal["compute", "copy"]
Kind = Literal["compute", "copy", "stall"]
Phase = Literal["forward", "backward"]


@dataclass(frozen=True)
class TraceSpan:
    """One bar of the timeline.

    ``lane``: ``"compute"`` (a layer's forward or backward) or ``"copy"`` (the load of its
    weights into its slots); ``kind``: ``"compute"``, ``"copy"`` (a prefetch) or ``"stall"``
    (a load on demand: the layer's slots held something else when it was called);
    ``phase``: whether a compute span is the layer's ``"forward"`` or its ``"backward"``
    (a copy's is ``"forward"``).
    """

    lane: Lane
    kind: Kind
    stack: str
    """The layer stack's path in the model (``""``: the model itself)."""
    position: int
    """The layer's position among the stack's offloaded layers."""
    layer: int
    """The layer's index in its stack."""
    start_ms: float
    end_ms: float
    phase: Phase = "forward"

    @property
    def label(self) -> str:
        """The layer's name in the model: ``layers.3``."""
        return f"{self.stack}.{self.layer}" if self.stack else str(self.layer)

    @property
    def duration_ms(self) -> float:
        return self.end_ms - self.start_ms


class StepTrace:
    """The timeline of what ran while the trace was active (see the module docstring).

    Args:
        runtime: the offload's :class:`~hydra_offload.runtime.device.DeviceRuntime`;
            ``None``: nothing is recorded (an empty trace on the host's clock).

    :attr:`spans` fills in when the trace ends (:meth:`finish`); until then it is empty.

    Example (by hand, on the CPU; the prefetch backend calls these for you):
        >>> import torch
        >>> from hydra_offload.runtime.device import DeviceRuntime
        >>> runtime = DeviceRuntime(torch.device("cpu"))
        >>> trace = StepTrace(runtime)
        >>> stack = trace.stack("layers", [1, 3])
        >>> stream = runtime.new_stream()
        >>> start = stack.mark(stream)
        >>> stack.copied(0, start, stack.mark(stream), stall=True)
        >>> stack.begin(0)
        >>> stack.end(0)
        >>> [(s.lane, s.kind, s.label) for s in trace.finish().spans]
        [('copy', 'stall', 'layers.1'), ('compute', 'compute', 'layers.1')]
    """

    def __init__(self, runtime: Any = None) -> None:
        self._runtime = runtime
        self._timed = runtime is not None and runtime.timing_event() is not None
        self.clock = _clock_of(runtime)
        """How the times were measured: one of :data:`CLOCKS`' values."""
        self.spans: list[TraceSpan] = []
        """The spans, in the order they were recorded, times in ms from the earliest mark."""
        self._raw: list[tuple[Lane, Kind, str, int, int, Any, Any, Phase]] = []
        self._origin: Any = None
        self._finished = False
        if runtime is not None:
            self._origin = self.mark(runtime.current_stream())

    def mark(self, stream: Any) -> Any:
        """A point in time on ``stream``: a timing event recorded there, or the host's clock."""
        if self._timed:
            event = self._runtime.timing_event()
            event.record(stream)
            return event
        return time.perf_counter()

    def stack(self, path: str, layers: Sequence[int]) -> StackTrace:
        """The recorder one layer stack's ring writes into (``layers``: each offloaded
        position's index in the stack)."""
        return StackTrace(self, path, tuple(layers))

    def _add(self, lane: Lane, kind: Kind, stack: str, position: int, layer: int,
             start: Any, end: Any, phase: Phase = "forward") -> None:  # fmt: skip
        self._raw.append((lane, kind, stack, position, layer, start, end, phase))

    def finish(self) -> StepTrace:
        """Wait for the device to pass every mark and resolve them into :attr:`spans`
        (called when the trace's ``with`` block ends; again: nothing more happens)."""
        if self._finished:
            return self
        self._finished = True
        if self._runtime is None:
            return self
        if self._timed:
            self._runtime.synchronize()
            origin = self._origin

            def ms(mark: Any) -> float:
                return float(origin.elapsed_time(mark))
        else:
            origin_s = self._origin

            def ms(mark: Any) -> float:
                return (mark - origin_s) * 1e3

        raw = [(lane, kind, stack, pos, layer, ms(s), ms(e), phase)
               for lane, kind, stack, pos, layer, s, e, phase in self._raw]  # fmt: skip
        # A copy may start on its stream before the compute stream reaches the trace's first
        # mark: count from the earliest mark.
        shift = min([0.0, *(r[5] for r in raw)])
        self.spans = [
            TraceSpan(lane, kind, stack, pos, layer, s - shift, max(e, s) - shift, phase)
            for lane, kind, stack, pos, layer, s, e, phase in raw
        ]
        self._raw = []
        return self

    def lane(self, lane: Lane, phase: Phase | None = None) -> list[TraceSpan]:
        """The spans of one lane (``"compute"`` or ``"copy"``), in the order they started;
        with ``phase``, only the forward's or the backward's."""
        return sorted(
            (s for s in self.spans if s.lane == lane and phase in (None, s.phase)),
            key=lambda s: s.start_ms,
        )

    @property
    def stalls(self) -> list[TraceSpan]:
        """The loads on demand."""
        return [s for s in self.spans if s.kind == "stall"]

    @property
    def total_ms(self) -> float:
        """From the first mark to the last span's end."""
        return max((s.end_ms for s in self.spans), default=0.0)

    def __repr__(self) -> str:
        return f"StepTrace({len(self.spans)} spans, {self.total_ms:.3f} ms, {self.clock})"


class StackTrace:
    """What one ring (one layer stack) records into a :class:`StepTrace`."""

    __slots__ = ("_open", "layers", "path", "trace")

    def __init__(self, trace: StepTrace, path: str, layers: tuple[int, ...]) -> None:
        self.trace = trace
        self.path = path
        self.layers = layers
        self._open: dict[int, Any] = {}

    def mark(self, stream: Any) -> Any:
        return self.trace.mark(stream)

    def copied(self, position: int, start: Any, end: Any, *, stall: bool) -> None:
        """The copy of the layer at ``position`` ran from ``start`` to ``end`` (marks on the
        copy stream); ``stall``: a load on demand."""
        kind: Kind = "stall" if stall else "copy"
        self.trace._add("copy", kind, self.path, position, self.layers[position], start, end)

    def begin(self, position: int, phase: Phase = "forward") -> None:
        """The layer's weights are ready and its compute (its forward, or its backward)
        starts now (on the compute stream)."""
        runtime = self.trace._runtime
        self._open[position] = (self.trace.mark(runtime.current_stream()), phase)

    def end(self, position: int) -> None:
        """The layer's compute ends now; nothing if its start was not recorded."""
        opened = self._open.pop(position, None)
        if opened is None:
            return
        start, phase = opened
        end = self.trace.mark(self.trace._runtime.current_stream())
        self.trace._add("compute", "compute", self.path, position, self.layers[position],
                        start, end, phase)  # fmt: skip


def _clock_of(runtime: Any) -> str:
    from hydra_offload.runtime.simulated import SimulatedRuntime

    if isinstance(runtime, SimulatedRuntime):
        return CLOCKS["simulated"]
    if runtime is not None and runtime.timing_event() is not None:
        return CLOCKS["device"]
    return CLOCKS["cpu"]
