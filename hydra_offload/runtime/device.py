"""Streams and events for one compute device, or stand-ins that do nothing on CPU."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["DeviceRuntime", "NullEvent", "NullStream"]


class NullEvent:
    """An event that has always happened: CPU work is synchronous."""

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        return None


_DONE = NullEvent()


class NullStream:
    """A stream on which every operation has completed by the time the call returns.

    On CPU each copy finishes before the next line runs, so ordering holds by construction;
    recording and waiting are no-ops and the same backend code runs unchanged.
    """

    def record_event(self, event: Any = None) -> NullEvent:
        return _DONE

    def wait_event(self, event: Any) -> None:
        return None

    def wait_stream(self, stream: Any) -> None:
        return None

    def synchronize(self) -> None:
        return None

    def __enter__(self) -> NullStream:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


class DeviceRuntime:
    """The compute device, its streams and events.

    Args:
        device: the device layers compute on. ``cpu`` gives the synchronous stand-ins.

    Example:
        >>> rt = DeviceRuntime(torch.device("cpu"))
        >>> rt.is_accelerator, type(rt.new_stream()).__name__
        (False, 'NullStream')
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.is_accelerator = device.type != "cpu"
        self.is_cuda = device.type == "cuda"
        self._null = NullStream()

    def new_stream(self) -> Any:
        """A new side stream (the copy stream), or a :class:`NullStream` on CPU."""
        if not self.is_accelerator:
            return NullStream()
        return torch.Stream(device=self.device)

    def current_stream(self) -> Any:
        """The stream compute is issued on right now (changes under ``with stream:``)."""
        if not self.is_accelerator:
            return self._null  # called in every layer's hooks: no allocation
        return torch.accelerator.current_stream(self.device)

    def synchronize(self) -> None:
        """Wait on the host for all work on the device (never called in a forward)."""
        if self.is_accelerator:
            torch.accelerator.synchronize(self.device)

    def memory_allocated(self) -> int | None:
        """Bytes held by the device allocator, or ``None`` where it is not measured."""
        if not self.is_accelerator:
            return None
        return int(torch.accelerator.memory_allocated(self.device))
