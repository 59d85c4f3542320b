"""Measuring how long the compute stream waits for copies, with device events.

Each waiting point owns two timing events that are recorded again on every pass. A pair is
read only once the device has passed it (``query()``, which never blocks); a pair that is
still pending when its point comes round again is skipped rather than waited for, so the
forward path never synchronizes with the host.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["WaitTimer"]


class WaitTimer:
    """Accumulates, in milliseconds, the time streams spend in ``wait_event`` calls."""

    def __init__(self, device: torch.device, points: int) -> None:
        self._pairs = [
            (torch.Event(device, enable_timing=True), torch.Event(device, enable_timing=True))
            for _ in range(points)
        ]
        self._pending = [False] * points
        self.total_ms = 0.0

    def _harvest(self, point: int) -> None:
        start, end = self._pairs[point]
        if self._pending[point] and end.query():
            self.total_ms += start.elapsed_time(end)
        self._pending[point] = False

    def wait(self, point: int, stream: Any, event: Any) -> None:
        """``stream.wait_event(event)``, timed."""
        self._harvest(point)
        start, end = self._pairs[point]
        start.record(stream)
        stream.wait_event(event)
        end.record(stream)
        self._pending[point] = True

    def read(self) -> float:
        """Total measured wait so far, including pairs the device has completed since."""
        for point in range(len(self._pairs)):
            if self._pending[point] and self._pairs[point][1].query():
                self._harvest(point)
        return self.total_ms
