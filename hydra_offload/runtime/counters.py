"""Counters the backends update on the forward path: plain integers, no device sync."""

from __future__ import annotations

__all__ = ["Counters"]


class Counters:
    """What happened since the offload was applied."""

    __slots__ = ("forwards", "h2d_bytes", "loads", "stalls")

    def __init__(self) -> None:
        self.forwards = 0
        """Forward calls of the offloaded model (its root module)."""
        self.h2d_bytes = 0
        """Bytes copied from host storage to the device."""
        self.loads = 0
        """Layer (prefetch) or module (UVA copy mode) loads issued."""
        self.stalls = 0
        """Prefetch: a layer ran while its slots held other weights and loaded on demand."""
