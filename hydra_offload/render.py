"""Rich renderings of plans: the tables ``run.py`` and the Lightning callback show."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from hydra_offload.offload import OffloadStats
    from hydra_offload.plan import OffloadPlan

__all__ = ["format_bytes", "format_indices", "render_plan", "render_stats"]


def format_bytes(n: int) -> str:
    """``1.50 GiB (1,610,612,736 B)``: a readable size and the exact count."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            readable = f"{n:,} B" if unit == "B" else f"{size:.2f} {unit} ({n:,} B)"
            return readable
        size /= 1024
    raise AssertionError("unreachable")


def format_indices(indices: tuple[int, ...], limit: int = 16) -> str:
    """``0-3, 6, 7, 14, 15``: runs of three or more collapse; long lists are cut."""
    if not indices:
        return "none"
    parts: list[str] = []
    start = prev = indices[0]
    for i in (*indices[1:], None):
        if i is not None and i == prev + 1:
            prev = i
            continue
        if prev - start >= 2:
            parts.append(f"{start}-{prev}")
        else:
            parts.extend(str(x) for x in range(start, prev + 1))
        if i is not None:
            start = prev = i
    if len(parts) > limit:
        parts = [*parts[:limit], f"... ({len(indices)} layers)"]
    return ", ".join(parts)


def _share(part: int, whole: int) -> str:
    return f" = {100 * part / whole:.1f}% of the model" if whole else ""


def render_plan(plan: OffloadPlan) -> RenderableType:
    """The plan as rich renderables: a summary table, the candidates, the notes."""
    table = Table(
        title=f"Offload plan: {plan.backend}  (config {plan.config_hash[:12]})",
        show_header=False,
        title_justify="left",
    )
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row("backend", plan.backend)
    if plan.backend == "uva" and plan.budget_bytes is not None:
        table.add_row("budget (cpu_offload_gb)", format_bytes(plan.budget_bytes))
    for stack in plan.stacks:
        label = stack.path or "<root>"
        table.add_row(
            f"layer stack {label!r}",
            f"{len(stack.offloaded_layers)} of {stack.num_layers} layers offloaded: "
            f"{format_indices(stack.offloaded_layers)}",
        )
    table.add_row("parameters offloaded", f"{len(plan.params):,}")
    table.add_row(
        "bytes in host memory",
        format_bytes(plan.offloaded_bytes) + _share(plan.offloaded_bytes, plan.total_param_bytes),
    )
    if plan.backend == "prefetch":
        table.add_row("device buffer pool", format_bytes(plan.pool_bytes))
    table.add_row(
        "device bytes saved",
        format_bytes(plan.device_bytes_saved)
        + _share(plan.device_bytes_saved, plan.total_param_bytes),
    )
    table.add_row("model parameter bytes", format_bytes(plan.total_param_bytes))
    parts: list[RenderableType] = [table]
    if plan.candidates:
        candidates = Table(title="Layer stack auto-detection", title_justify="left")
        for column in ("module list", "layer class", "parameter bytes", "decision"):
            candidates.add_column(column)
        for c in plan.candidates:
            candidates.add_row(
                c.display_path,
                c.class_share,
                f"{c.param_bytes:,}",
                ("chosen: " if c.chosen else "rejected: ") + c.reason,
            )
        parts.append(candidates)
    for note in plan.notes:
        parts.append(Text(f"note: {note}"))
    return Group(*parts)


def render_stats(stats: OffloadStats) -> RenderableType:
    """The live figures of an applied offload as a two-column table."""
    table = Table(title=f"Offload stats: {stats.backend}", show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value")
    saved = format_bytes(stats.device_bytes_saved)
    table.add_row("device bytes saved", saved + (" (measured)" if stats.measured else " (plan)"))
    table.add_row("bytes offloaded", format_bytes(stats.offloaded_bytes))
    table.add_row("host bytes allocated", format_bytes(stats.host_bytes))
    table.add_row("host bytes page-locked", format_bytes(stats.host_bytes_pinned))
    table.add_row("device buffer pool", format_bytes(stats.pool_bytes))
    table.add_row("forwards", f"{stats.forwards:,}")
    per_forward = stats.h2d_bytes_per_forward
    table.add_row(
        "H2D bytes per forward", "-" if per_forward is None else format_bytes(int(per_forward))
    )
    table.add_row("prefetch stalls", f"{stats.stalls:,}")
    waited = "not measured" if stats.wait_ms is None else f"{stats.wait_ms:.3f} ms"
    table.add_row("compute waited for copies", waited)
    return table
