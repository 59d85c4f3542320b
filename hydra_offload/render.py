"""Rich renderings of plans and statistics: the tables ``run.py`` prints.

The outermost layer of the package: it reads plans (:mod:`hydra_offload.plan`) and statistics
(:mod:`hydra_offload.stats`); nothing in the core imports it.

Example:
    >>> import torch
    >>> from rich.console import Console
    >>> from hydra_offload import plan_offload
    >>> from hydra_offload.render import render_plan
    >>> Console(width=60).print(render_plan(plan_offload(torch.nn.Linear(4, 4), {})))
    Offload plan: none  (config ...
    ┌───────────────────────┬─────────────────────────┐
    │ backend               │ none                    │
    ...
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from hydra_offload._format import format_bytes, format_indices

if TYPE_CHECKING:
    from hydra_offload.plan import OffloadPlan
    from hydra_offload.stats import OffloadStats

__all__ = ["format_bytes", "format_indices", "render_plan", "render_stats"]


def render_plan(plan: OffloadPlan) -> RenderableType:
    """The plan as rich renderables: a summary table, the candidates, the notes (the same
    text as :meth:`~hydra_offload.plan.OffloadPlan.summary`, from
    :meth:`~hydra_offload.plan.OffloadPlan.describe`)."""
    description = plan.describe()
    table = Table(title=description.title, show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value")
    for what, value in description.rows:
        table.add_row(what, value)
    parts: list[RenderableType] = [table]
    if description.candidates:
        candidates = Table(title=description.CANDIDATES_TITLE, title_justify="left")
        for column in description.CANDIDATE_COLUMNS:
            candidates.add_column(column)
        for row in description.candidates:
            candidates.add_row(*row)
        parts.append(candidates)
    parts.extend(Text(f"note: {note}") for note in description.notes)
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
