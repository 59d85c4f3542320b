"""Measuring how long the compute stream waits for copies, with timing events.

Every wait is bracketed by two timing events recorded on the waiting stream. Pairs are read
once the device has passed them (``query()``, which never blocks), in the order they were
recorded, and then reused; a pair the device has not reached yet simply stays pending, so no
wait is ever left out, however far the device lags behind (which is exactly when copies are
the bottleneck). :meth:`WaitTimer.read` waits for the pending pairs, off the forward path, so
the figure it returns is complete.

Example (the simulated device of the tests: a copy that takes 5 ms, waited for at once):
    >>> import torch
    >>> from hydra_offload.runtime.simulated import SimulatedDevice
    >>> from hydra_offload.runtime.device import runtime_for
    >>> with SimulatedDevice(min_delay_ms=5, max_delay_ms=5, check=False):
    ...     runtime = runtime_for(torch.device("cpu"))
    ...     timer, side = WaitTimer(runtime), runtime.new_stream()
    ...     host = runtime.host_storage([((4,), (1,), torch.float32)]).tensors[0]
    ...     runtime.copy(side, torch.empty(4), host)
    ...     timer.wait(runtime.current_stream(), side.record_event())
    ...     timer.read() >= 4.5
    True
"""

from __future__ import annotations

from collections import deque
from typing import Any

__all__ = ["WaitTimer"]


class WaitTimer:
    """Accumulates, in milliseconds, the time a stream spends in ``wait_event`` calls.

    Args:
        runtime: the device runtime; its :meth:`timing_event` makes the events. Where it
            has none (the CPU), waits are not timed and :meth:`read` gives ``None``.
    """

    def __init__(self, runtime: Any) -> None:
        self._runtime = runtime
        self.timed = runtime.timing_event() is not None
        self._pending: deque[tuple[Any, Any]] = deque()
        self._spare: list[tuple[Any, Any]] = []
        self._total_ms = 0.0

    def wait(self, stream: Any, event: Any) -> None:
        """``stream.wait_event(event)``, timed."""
        pair = self._pair() if self.timed else None
        if pair is not None:
            pair[0].record(stream)
        stream.wait_event(event)
        if pair is not None:
            pair[1].record(stream)
            self._pending.append(pair)

    def _pair(self) -> tuple[Any, Any]:
        self._harvest(block=False)
        if self._spare:
            return self._spare.pop()
        return self._runtime.timing_event(), self._runtime.timing_event()

    def _harvest(self, *, block: bool) -> None:
        # One stream records the pairs, so the device passes them in this order.
        while self._pending:
            start, end = self._pending[0]
            if block:
                end.synchronize()
            elif not end.query():
                return
            self._total_ms += start.elapsed_time(end)
            self._spare.append(self._pending.popleft())

    @property
    def pending(self) -> int:
        """Waits recorded that the device has not been seen to pass yet."""
        return len(self._pending)

    def read(self) -> float | None:
        """The total time waited so far, every recorded wait included (waits on the host
        for the pending ones); ``None`` where waits are not timed."""
        if not self.timed:
            return None
        self._harvest(block=True)
        return self._total_ms
