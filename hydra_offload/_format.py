"""Plain-text formatting of sizes and index lists, shared by the plan's text and the renderers."""

from __future__ import annotations

__all__ = ["format_bytes", "format_indices"]


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
