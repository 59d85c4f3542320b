"""Pictures of plans: ``offload_plan.png``, which ``run.py``'s job and the Lightning callback
write into the Hydra job's output directory and log to the Trainer's loggers; and of a traced
step: ``offload_timeline.png`` (:func:`timeline_figure`), which the callback writes and logs
beside it under the prefetch backend.

An outer layer, beside :mod:`hydra_offload.render`: it reads plans (:mod:`hydra_offload.plan`)
and their ring schedules (:mod:`hydra_offload.schedule`); nothing in the core imports it.
matplotlib is imported inside the functions, and the figures are drawn on their own Agg canvas,
not through :mod:`matplotlib.pyplot`: making a picture changes no global state of matplotlib
(its backend, its open figures) in the process that asks for it.

What :func:`plan_figure` draws, from the plan alone (so a plan made on a ``meta`` model has
its picture too):

- **prefetch**: per layer stack, one cell per layer in stack order (orange: in host memory;
  grey-blue: on the device), wrapped into rows of ``layers_per_row``; under each offloaded
  layer a stripe in the colour of the device slots its copy goes to, and under the stack one
  box per slot group of the ring (:func:`~hydra_offload.schedule.schedules_of`) with its bytes
  and the layers that take turns in it; the stack's line names the parameters offloaded in
  each offloaded layer (all of them, or those ``offload_params`` selects).
- **uva**: the model's parameter bytes as one bar: the offloaded parameters, in
  ``named_parameters()`` order and grouped by module (``layers.3``, ``embed_tokens``), then
  what stays on the device, with the ``cpu_offload_gb`` budget marked.
- **none**: the same bar, all on the device, saying that nothing is offloaded.

The title has the backend and the config hash; the header line the bytes in host memory, of
the device buffer pool, and saved on the device.

Example:
    >>> import torch
    >>> from hydra_offload import plan_offload
    >>> from hydra_offload.models import DecoderLM
    >>> from hydra_offload.pictures import HOST_COLOR, layer_cells, plan_figure
    >>> with torch.device("meta"):
    ...     model = DecoderLM(num_layers=8)
    >>> plan = plan_offload(model, {"prefetch": {"offload_group_size": 4}})
    >>> figure = plan_figure(plan)
    >>> len(layer_cells(figure)), len(layer_cells(figure, HOST_COLOR))
    (8, 2)
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra_offload._format import format_bytes, format_indices
from hydra_offload.schedule import schedules_of

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    from hydra_offload.plan import OffloadPlan, PlannedParam, StackPlan
    from hydra_offload.runtime.trace import StepTrace, TraceSpan
    from hydra_offload.schedule import RingSchedule

__all__ = [
    "BACKWARD_COLOR",
    "COMPUTE_COLOR",
    "DEVICE_COLOR",
    "HOST_COLOR",
    "PLAN_PICTURE",
    "SLOT_COLORS",
    "STALL_COLOR",
    "TIMELINE_PICTURE",
    "figure_pixels",
    "layer_cells",
    "plan_figure",
    "save_plan_picture",
    "save_timeline_picture",
    "timeline_figure",
]

PLAN_PICTURE = "offload_plan.png"
"""The plan's picture, written next to ``offload_plan.txt`` in the Hydra job's output
directory."""

TIMELINE_PICTURE = "offload_timeline.png"
"""The timeline of one traced step under the prefetch backend, written next to
:data:`PLAN_PICTURE`."""

HOST_COLOR = "#f28e2b"
"""Fill of what lives in host memory (offloaded layers and parameters)."""
DEVICE_COLOR = "#b8c7d6"
"""Fill of what stays on the device."""
STALL_COLOR = "#d62728"
"""Fill of a load on demand (a stall) in the timeline."""
COMPUTE_COLOR = "#4e79a7"
"""Fill of a layer's forward in the timeline."""
BACKWARD_COLOR = "#76b7b2"
"""Fill of a layer's backward in the timeline."""
COPY_COLOR = HOST_COLOR
SLOT_COLORS = ("#4e79a7", "#59a14f", "#b07aa1", "#e15759", "#76b7b2", "#9c755f", "#edc948")
"""Colours of a ring's slot groups, in slot order (repeating past the last)."""

_WIDTH_IN = 12.0  # figure width, inches
_UNIT_IN = 0.34  # one row unit, inches
_MIN_COLUMNS = 12  # a small stack still gets narrow cells, not a few wide ones
_BAR_COLUMNS = 40  # the width of UVA's and none's bar, in the same units
_NAMES_SHOWN = 6  # parameter names listed per stack before "and N more"


def plan_figure(plan: OffloadPlan, *, layers_per_row: int = 40) -> Figure:
    """A matplotlib figure of ``plan`` (see the module docstring for what it shows).

    Args:
        plan: any plan, of any backend; made on a real or a ``meta`` model.
        layers_per_row: a stack of more layers wraps into rows of this many cells (an
            80-layer model: two rows of 40).

    Returns:
        A :class:`matplotlib.figure.Figure` on an Agg canvas, not registered with
        :mod:`matplotlib.pyplot` (nothing to close). Its cells carry a ``gid``:
        ``"layer"`` for a layer, ``"slot-stripe"`` and ``"slot"`` for the ring's slots,
        ``"params"`` for the bar's parts (UVA, none); :func:`layer_cells` lists them.

    Example:
        >>> import torch
        >>> from hydra_offload import plan_offload
        >>> from hydra_offload.pictures import plan_figure
        >>> plan = plan_offload(torch.nn.Linear(4, 4), {"uva": {"cpu_offload_gb": 1}})
        >>> plan_figure(plan).axes[0].get_title(loc="left")
        'Offload plan: uva  (config ...)'
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if layers_per_row < 1:
        raise ValueError(f"layers_per_row must be >= 1, got {layers_per_row}")
    blocks = _blocks(plan, layers_per_row)
    widest = max((min(stack.num_layers, layers_per_row) for stack in plan.stacks), default=0)
    columns = max(_MIN_COLUMNS, widest) if plan.stacks else _BAR_COLUMNS
    height = sum(block.height for block in blocks) + 1.6  # the legend's rows
    top_in, bottom_in = 0.45, 0.1  # the title above the axes, a margin below
    figure_in = height * _UNIT_IN + top_in + bottom_in
    figure = Figure(figsize=(_WIDTH_IN, figure_in))
    FigureCanvasAgg(figure)
    ax = figure.add_axes((0.008, bottom_in / figure_in, 0.984, height * _UNIT_IN / figure_in))
    ax.set_xlim(0, columns)
    ax.set_ylim(height, 0)
    ax.axis("off")
    ax.set_title(f"Offload plan: {plan.backend}  (config {plan.config_hash[:12]})",
                 loc="left", fontsize=12, fontweight="bold")  # fmt: skip
    ax.text(0, 0.2, _bytes_line(plan), fontsize=9, va="top")
    y = 1.2
    for block in blocks:
        block.draw(ax, y, columns)
        y += block.height
    _legend(ax, plan, y, height)
    return figure


def save_plan_picture(
    plan: OffloadPlan, path: str | Path, *, dpi: int = 110, layers_per_row: int = 40
) -> Path:
    """Write :func:`plan_figure` of ``plan`` to ``path`` (PNG, or the format its suffix names).

    Example:
        >>> import tempfile, torch
        >>> from pathlib import Path
        >>> from hydra_offload import plan_offload
        >>> from hydra_offload.pictures import PLAN_PICTURE, save_plan_picture
        >>> plan = plan_offload(torch.nn.Linear(4, 4), {"uva": {"cpu_offload_gb": 1}})
        >>> path = save_plan_picture(plan, Path(tempfile.mkdtemp()) / PLAN_PICTURE)
        >>> path.read_bytes()[:4]
        b'\\x89PNG'
    """
    path = Path(path)
    plan_figure(plan, layers_per_row=layers_per_row).savefig(path, dpi=dpi)
    return path


def figure_pixels(figure: Figure, dpi: int = 100) -> np.ndarray:
    """The figure drawn as an RGB array of shape ``(height, width, 3)``, ``uint8``: what
    image loggers that take arrays (W&B's ``log_image``) accept."""
    import numpy as np

    figure.set_dpi(dpi)
    figure.canvas.draw()
    return np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()  # type: ignore[attr-defined]


def layer_cells(figure: Figure, color: str | None = None, gid: str = "layer") -> list[Rectangle]:
    """The figure's cells of one kind (``gid``: ``"layer"``, ``"slot-stripe"``, ``"slot"``,
    ``"params"``), in drawing order; with ``color``, only those filled with it."""
    from matplotlib.colors import to_rgba

    cells = [p for ax in figure.axes for p in ax.patches if p.get_gid() == gid]
    if color is None:
        return cells  # type: ignore[return-value]
    wanted = to_rgba(color)
    return [p for p in cells if p.get_facecolor() == wanted]  # type: ignore[misc]


# --------------------------------------------------------------------------------------------


def _short(n: int) -> str:
    """``1.50 MiB``: the readable part of :func:`format_bytes`."""
    return format_bytes(n).split(" (")[0]


def _bytes_line(plan: OffloadPlan) -> str:
    total = plan.total_param_bytes
    share = f" ({100 * plan.device_bytes_saved / total:.1f}%)" if total else ""
    parts = [f"in host memory {_short(plan.offloaded_bytes)}"]
    if plan.backend == "prefetch":
        parts.append(f"device buffer pool {_short(plan.pool_bytes)}")
    parts.append(f"device saved {_short(plan.device_bytes_saved)}{share}")
    parts.append(f"model parameters {_short(total)}")
    if plan.backend == "uva" and plan.budget_bytes is not None:
        parts.append(f"budget (cpu_offload_gb) {_short(plan.budget_bytes)}")
    return "  ·  ".join(parts)


def _rect(ax: Axes, x: float, y: float, w: float, h: float, color: str, gid: str) -> None:
    from matplotlib.patches import Rectangle

    ax.add_patch(Rectangle((x, y), w, h, facecolor=color, edgecolor="white", linewidth=0.8,
                           gid=gid))  # fmt: skip


@dataclass
class _StackBlock:
    """One layer stack of a prefetch plan: its line, its layer cells, its slot boxes."""

    stack: StackPlan
    schedule: RingSchedule
    params: list[PlannedParam]
    per_row: int
    slot_rows: int
    slots_per_row: int

    @property
    def layer_rows(self) -> int:
        return max(1, -(-self.stack.num_layers // self.per_row))

    @property
    def height(self) -> float:
        slots = 1.6 * self.slot_rows + 0.4 if self.slot_rows else 0.6
        return 1.45 + 1.25 * self.layer_rows + slots + 0.5

    def draw(self, ax: Axes, y: float, columns: int) -> None:
        stack, schedule = self.stack, self.schedule
        label = stack.path or "<root>"
        title, figures = self._title(label)
        ax.text(0, y + 0.4, title, fontsize=9, va="center", fontweight="bold")
        ax.text(0, y + 0.9, figures, fontsize=8, va="center")
        names = list(dict.fromkeys(p.local_name or p.name for p in self.params))
        if names:
            shown = ", ".join(names[:_NAMES_SHOWN])
            more = f" and {len(names) - _NAMES_SHOWN} more" if len(names) > _NAMES_SHOWN else ""
            ax.text(0, y + 1.35, f"in host memory, of each offloaded layer: {shown}{more}",
                    fontsize=7.5, va="center", color="#444444")  # fmt: skip
        top = y + 1.75
        offloaded = set(stack.offloaded_layers)
        fontsize = 7 if self.per_row <= 40 else 5.5
        for index in range(stack.num_layers):
            row, col = divmod(index, self.per_row)
            cy = top + 1.25 * row
            host = index in offloaded
            _rect(ax, col, cy, 1, 0.8, HOST_COLOR if host else DEVICE_COLOR, "layer")
            ax.text(col + 0.5, cy + 0.4, str(index), ha="center", va="center",
                    fontsize=fontsize, color="black")  # fmt: skip
            if host:
                groups = schedule.groups[schedule.position[index]]
                for k, gid in enumerate(groups):
                    w = 1 / len(groups)
                    _rect(ax, col + k * w, cy + 0.82, w, 0.22, _slot_color(gid), "slot-stripe")
        if not schedule.num_groups:
            if not offloaded:
                ax.text(0, top + 1.25 * self.layer_rows - 0.1, "no layer of this stack is "
                        "offloaded", fontsize=8, va="top", color="#444444")  # fmt: skip
            return
        sizes = self._group_bytes(schedule)
        slot_top = top + 1.25 * self.layer_rows + 0.35
        ax.text(0, slot_top, "device buffer pool: the ring's slots (copies of offloaded layers "
                "take turns in them)", fontsize=8, va="top")  # fmt: skip
        width = columns / self.slots_per_row
        for gid, users in enumerate(schedule.group_users):
            row, col = divmod(gid, self.slots_per_row)
            bx, by = col * width, slot_top + 0.45 + 1.6 * row
            _rect(ax, bx + 0.05, by, width - 0.1, 1.3, _slot_color(gid), "slot")
            layers = tuple(schedule.layers[pos] for pos in users)
            first = f"  ·  holds layer {layers[0]} first" if users[0] in schedule.preload else ""
            ax.text(bx + 0.25, by + 0.35, f"slot {gid}: {_short(sizes[gid])}{first}",
                    fontsize=8, va="center", color="white", fontweight="bold")  # fmt: skip
            ax.text(bx + 0.25, by + 0.9, f"layers {format_indices(layers, limit=5)}",
                    fontsize=7, va="center", color="white")  # fmt: skip

    def _title(self, label: str) -> tuple[str, str]:
        stack = self.stack
        title = (
            f"layer stack {label!r}: {len(stack.offloaded_layers)} of {stack.num_layers} layers "
            f"offloaded ({format_indices(stack.offloaded_layers, limit=10)})"
        )
        figures = (
            f"in host memory {_short(stack.offloaded_bytes)}  ·  "
            f"device buffer pool {_short(stack.pool_bytes)}  ·  "
            f"device saved {_short(stack.offloaded_bytes - stack.pool_bytes)}"
        )
        return title, figures

    def _group_bytes(self, schedule: RingSchedule) -> list[int]:
        """Bytes of each slot group: the slots it merges, each the size of its parameters."""
        users: dict[tuple[Any, ...], list[int]] = {}
        size: dict[tuple[Any, ...], int] = {}
        for p in self.params:
            sid = (p.slot_key, p.slot)
            position = schedule.position[p.layer]
            order = users.setdefault(sid, [])
            if not order or order[-1] != position:
                order.append(position)
            size[sid] = p.nbytes
        totals = [0] * schedule.num_groups
        for sid, order in users.items():
            totals[schedule.group_users.index(tuple(order))] += size[sid]
        return totals


@dataclass
class _BarBlock:
    """UVA and none: the model's parameter bytes as one bar, the offloaded ones first."""

    plan: OffloadPlan

    height: float = 3.9

    def draw(self, ax: Axes, y: float, columns: int) -> None:
        plan, total = self.plan, max(self.plan.total_param_bytes, 1)
        if plan.backend == "none":
            line = "nothing is offloaded: every parameter stays on the device"
        else:
            line = (
                f"{len(plan.params):,} parameters in host memory, read in place by the device "
                "(in named_parameters() order, up to cpu_offload_gb)"
            )
        ax.text(0, y + 0.45, line, fontsize=9, va="center", fontweight="bold")
        top, scale, x = y + 1.4, columns / total, 0.0
        groups = _module_groups(plan.params)
        for name, nbytes in groups:
            w = nbytes * scale
            _rect(ax, x, top, w, 1.1, HOST_COLOR, "params")
            if w >= 0.2 * len(name) + 0.4:  # room for the name (a character: ~0.2 columns)
                ax.text(x + w / 2, top + 0.55, name, ha="center", va="center", fontsize=6.5)
            x += w
        rest = plan.total_param_bytes - plan.offloaded_bytes
        if rest > 0:
            _rect(ax, x, top, columns - x, 1.1, DEVICE_COLOR, "params")
            if columns - x >= 3:
                ax.text((x + columns) / 2, top + 0.55, f"on the device: {_short(rest)}",
                        ha="center", va="center", fontsize=8)  # fmt: skip
        if plan.params:
            ax.text(0, top + 1.5, f"in host memory: {_short(plan.offloaded_bytes)} in "
                    f"{_describe_groups(groups)}", fontsize=7.5, va="top",
                    color="#444444")  # fmt: skip
        budget = plan.budget_bytes
        if budget is not None and 0 < budget <= plan.total_param_bytes:
            bx = budget * scale
            ax.plot([bx, bx], [top - 0.25, top + 1.35], color="black", linestyle="--",
                    linewidth=1.2)  # fmt: skip
            ax.text(bx, top - 0.3, f"budget {_short(budget)}", ha="center", va="bottom",
                    fontsize=7.5)  # fmt: skip


def _blocks(plan: OffloadPlan, layers_per_row: int) -> list[Any]:
    if plan.backend != "prefetch":
        return [_BarBlock(plan)]
    schedules = schedules_of(plan)
    blocks: list[Any] = []
    for stack, schedule in zip(plan.stacks, schedules, strict=True):
        params = [p for p in plan.params if p.stack == stack.path]
        groups = schedule.num_groups
        slots_per_row = min(4, max(groups, 2))
        block = _StackBlock(
            stack=stack,
            schedule=schedule,
            params=params,
            per_row=layers_per_row,
            slot_rows=-(-groups // slots_per_row) if groups else 0,
            slots_per_row=slots_per_row,
        )
        blocks.append(block)
    return blocks


_INDEXED = re.compile(r"^(.*?\.\d+)(?:\.|$)")


def _module_groups(params: Sequence[PlannedParam]) -> list[tuple[str, int]]:
    """Consecutive parameters grouped by module: the name up to its first index segment
    (``layers.3``), else its first segment (``embed_tokens``); with their bytes."""
    groups: list[tuple[str, int]] = []
    for p in params:
        match = _INDEXED.match(p.name)
        key = match.group(1) if match else p.name.split(".")[0]
        if groups and groups[-1][0] == key:
            groups[-1] = (key, groups[-1][1] + p.nbytes)
        else:
            groups.append((key, p.nbytes))
    return groups


def _describe_groups(groups: Sequence[tuple[str, int]]) -> str:
    """``layers.0-3, embed_tokens``: indexed modules of one list collapse into runs."""
    runs: dict[str, list[int]] = {}
    order: list[str] = []
    for name, _ in groups:
        base, _, index = name.rpartition(".")
        if base and index.isdigit():
            if base not in runs:
                runs[base] = []
                order.append(base)
            runs[base].append(int(index))
        elif name not in order:
            order.append(name)
    parts = [
        f"{name}.{format_indices(tuple(runs[name]), limit=8)}" if name in runs else name
        for name in order
    ]
    return ", ".join(parts)


def _slot_color(index: int) -> str:
    return SLOT_COLORS[index % len(SLOT_COLORS)]


def _legend(ax: Axes, plan: OffloadPlan, y: float, height: float) -> None:
    from matplotlib.patches import Patch

    handles = [
        Patch(facecolor=HOST_COLOR, label="in host memory"),
        Patch(facecolor=DEVICE_COLOR, label="on the device"),
    ]
    if plan.backend == "prefetch" and plan.pool:
        handles.append(Patch(facecolor=SLOT_COLORS[0], label="device slot (stripe: where the "
                             "layer's copy goes)"))  # fmt: skip
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(0, 1 - y / height),
              ncol=len(handles), fontsize=8, frameon=False)  # fmt: skip


# -------------------------------------------------------------------------------- timeline


def timeline_figure(
    trace: StepTrace | Sequence[TraceSpan], *, clock: str | None = None, title: str | None = None
) -> Figure:
    """A matplotlib figure of a traced step (:meth:`OffloadHandle.trace()
    <hydra_offload.offload.OffloadHandle.trace>`): two lanes over a time axis in ms, the
    compute lane (one bar per offloaded layer's forward, from the moment its weights were
    ready, and in a training step one per layer's backward, in another colour) above the copy
    lane (one bar per load of a layer's weights into its slots); each bar is labelled with its
    layer where it has room. Loads on demand (stalls) are red, with a red triangle over the
    compute lane where they end. A bar shorter than 0.3% of the time axis is drawn that wide,
    so that it shows.

    Args:
        trace: a :class:`~hydra_offload.runtime.trace.StepTrace`, or its spans.
        clock: how the times were measured (default: the trace's ``clock``), in the title.
        title: the title's first part (default ``"Offload timeline: one forward"``, or
            ``"Offload timeline: one training step"`` when the trace has a backward).

    Returns:
        A figure on its own Agg canvas (as :func:`plan_figure`); its bars carry the ``gid``
        ``"compute"`` (a forward), ``"backward"``, ``"copy"`` or ``"stall"`` (count them with
        :func:`layer_cells`).

    Example:
        >>> from hydra_offload.runtime.trace import TraceSpan
        >>> spans = [TraceSpan("copy", "copy", "layers", 0, 1, 0.0, 2.0),
        ...          TraceSpan("compute", "compute", "layers", 0, 1, 2.0, 3.0),
        ...          TraceSpan("copy", "stall", "layers", 1, 3, 3.0, 5.0),
        ...          TraceSpan("compute", "compute", "layers", 1, 3, 5.0, 6.0)]
        >>> figure = timeline_figure(spans, clock="simulated device clock")
        >>> [len(layer_cells(figure, gid=g)) for g in ("compute", "copy", "stall")]
        [2, 1, 1]
        >>> figure.axes[0].get_title(loc="left")
        'Offload timeline: one forward  (simulated device clock)'
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch, Rectangle

    spans = list(trace if isinstance(trace, Sequence) else trace.spans)
    if clock is None:
        clock = getattr(trace, "clock", None)
    backward = [s for s in spans if s.lane == "compute" and s.phase == "backward"]
    heading = title or (
        "Offload timeline: one training step" if backward else "Offload timeline: one forward"
    )
    figure = Figure(figsize=(_WIDTH_IN, 3.4))
    FigureCanvasAgg(figure)
    ax = figure.add_axes((0.08, 0.3, 0.9, 0.58))
    end = max((s.end_ms for s in spans), default=0.0)
    width = end if end > 0 else 1.0
    ax.set_xlim(-0.01 * width, 1.01 * width)
    ax.set_ylim(-0.1, 2.5)
    ax.set_yticks([0.5, 1.75], ["copy", "compute"])
    ax.set_xlabel("time (ms)")
    ax.set_title(f"{heading}  ({clock})" if clock else heading, loc="left", fontsize=12,
                 fontweight="bold")  # fmt: skip
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    lanes = {"compute": 1.25, "copy": 0.0}
    colors = {"compute": COMPUTE_COLOR, "backward": BACKWARD_COLOR, "copy": COPY_COLOR,
              "stall": STALL_COLOR}  # fmt: skip
    per_ms = _WIDTH_IN * 0.9 * 72 / width  # points per ms, for whether a label fits
    for span in spans:
        y = lanes[span.lane]
        w = max(span.duration_ms, 0.003 * width)  # a bar too short to see is drawn 3 px wide
        gid = "backward" if span.lane == "compute" and span.phase == "backward" else span.kind
        ax.add_patch(Rectangle((span.start_ms, y), w, 1.0, facecolor=colors[gid],
                               edgecolor="white", linewidth=0.8, gid=gid,
                               hatch="//" if span.kind == "stall" else None))  # fmt: skip
        if w * per_ms >= 5.5 * len(span.label) + 4:
            ax.text(span.start_ms + w / 2, y + 0.5, span.label, ha="center", va="center",
                    fontsize=7, color="white", clip_on=True)  # fmt: skip
    stalls = [s for s in spans if s.kind == "stall"]
    if stalls:
        ax.plot([s.end_ms for s in stalls], [2.35] * len(stalls), linestyle="none",
                marker="v", color=STALL_COLOR, markersize=8, gid="stall-marker")  # fmt: skip
    forwards = [s for s in spans if s.lane == "compute" and s.phase == "forward"]
    copies = [s for s in spans if s.lane == "copy"]
    summary = (
        f"{len(forwards)} layer forwards, "
        + (f"{len(backward)} layer backwards, " if backward else "")
        + f"{len(copies)} copies ({len(stalls)} on demand), {end:.3f} ms"
    )
    ax.text(0, -0.3, summary, transform=ax.transAxes, fontsize=8, va="top",
            color="#444444")  # fmt: skip
    handles = [Patch(facecolor=COMPUTE_COLOR, label="layer forward (weights ready)")]
    if backward:
        handles.append(Patch(facecolor=BACKWARD_COLOR, label="layer backward"))
    handles += [
        Patch(facecolor=COPY_COLOR, label="copy of its weights (prefetch)"),
        Patch(facecolor=STALL_COLOR, hatch="//", label="load on demand (stall)"),
    ]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(0, -0.4), ncol=len(handles),
              fontsize=8, frameon=False, borderaxespad=0, handletextpad=0.5)  # fmt: skip
    return figure


def save_timeline_picture(
    trace: StepTrace | Sequence[TraceSpan],
    path: str | Path,
    *,
    dpi: int = 110,
    clock: str | None = None,
    title: str | None = None,
) -> Path:
    """Write :func:`timeline_figure` of ``trace`` to ``path`` (PNG, or what its suffix names).

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from hydra_offload.runtime.trace import StepTrace
        >>> path = save_timeline_picture(StepTrace(), Path(tempfile.mkdtemp()) / TIMELINE_PICTURE)
        >>> path.read_bytes()[:4]
        b'\\x89PNG'
    """
    path = Path(path)
    timeline_figure(trace, clock=clock, title=title).savefig(path, dpi=dpi)
    return path
