"""Streams, events, copies and host memory for one compute device.

Every device-side step of the backends goes through a :class:`DeviceRuntime`: which stream a
copy runs on, what it waits for, where host memory comes from. Three implementations:

- the accelerator runtime (CUDA and other ``torch.accelerator`` devices): real streams and
  events; copies are queued and return at once;
- the CPU runtime (compute device = CPU): copies complete before the call returns, streams and
  events are stand-ins that do nothing, so the same backend code runs on a machine without an
  accelerator;
- the simulated device for tests (:mod:`hydra_offload.runtime.simulated`): copies on side
  streams complete later, on other threads, and missing waits or host/device mix-ups fail.

:func:`runtime_for` picks one for a device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextvars import ContextVar
from typing import Any

import torch

from hydra_offload.runtime.host import HostStorage, Layout
from hydra_offload.runtime.shared import NodeGroup

__all__ = ["DeviceRuntime", "NullEvent", "NullStream", "runtime_for"]


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


class DeviceRuntime:
    """The compute device, its streams and events, copies between it and host memory.

    Args:
        device: the device layers compute on. ``cpu`` gives the synchronous stand-ins.

    Example:
        >>> rt = DeviceRuntime(torch.device("cpu"))
        >>> rt.is_accelerator, type(rt.new_stream()).__name__
        (False, 'NullStream')
        >>> host = rt.host_storage([((2,), (1,), torch.float32)])
        >>> dst = torch.empty(2)
        >>> rt.copy(rt.new_stream(), dst, host.tensors[0].fill_(3))
        >>> dst.tolist()
        [3.0, 3.0]
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.is_accelerator = device.type != "cpu"
        self.is_cuda = device.type == "cuda"
        self._null = NullStream()

    @property
    def pin_for(self) -> torch.device | None:
        """The device host memory is page-locked for (CUDA), or ``None``."""
        return self.device if self.is_cuda else None

    def host_storage(
        self,
        layouts: Sequence[Layout],
        *,
        shared: Sequence[bool] | None = None,
        node: NodeGroup | None = None,
    ) -> HostStorage:
        """Exact-size host memory for these layouts, page-locked for the device on CUDA;
        those marked ``shared`` in memory the processes of ``node`` share (see
        :class:`HostStorage`), after :meth:`publish`."""
        return HostStorage(layouts, pin_for=self.pin_for, shared=shared, node=node)

    def release(self, tensors: Sequence[torch.Tensor]) -> None:
        """Called just before the memory of ``tensors`` is given up (host storage freed, the
        pool released): no copy or kernel may still read or write it, which the caller
        ensures by synchronizing first. Nothing to do here; the simulated device checks it."""
        return None

    def hand_over(self, tensors: Sequence[torch.Tensor]) -> None:
        """Called just before other processes of the node may write the host memory of
        ``tensors`` (shared weights another process steps): no copy of this process may
        still read it, which the caller ensures by synchronizing first. Nothing to do here;
        the simulated device checks it."""
        return None

    def publish(self, storage: HostStorage, problem: str | None = None) -> None:
        """Share ``storage``'s shared memory with the node's processes
        (:meth:`HostStorage.publish`, a collective)."""
        storage.publish(problem)

    def new_stream(self) -> Any:
        """A new side stream (the copy stream), or a :class:`NullStream` on CPU."""
        if not self.is_accelerator:
            return NullStream()
        return torch.Stream(device=self.device)

    def current_stream(self) -> Any:
        """The stream compute is issued on right now."""
        if not self.is_accelerator:
            return self._null  # called in every layer's hooks: no allocation
        return torch.accelerator.current_stream(self.device)

    def copy(self, stream: Any, dst: torch.Tensor, src: torch.Tensor) -> None:
        """``dst.copy_(src)``, queued on ``stream`` (asynchronous with respect to the host
        where the memory allows it: page-locked host memory on CUDA).

        A device tensor read on a side stream is marked as in use there, so the allocator
        does not hand its memory out again before the copy is done, even if it is released
        at once.
        """
        if not self.is_accelerator:
            dst.copy_(src)
            return
        with stream:
            dst.copy_(src, non_blocking=True)
        if src.device.type == self.device.type and stream != self.current_stream():
            src.record_stream(stream)

    def wait_work(self, stream: Any, work: Any) -> None:
        """Make ``stream`` wait for a ``torch.distributed`` collective's ``work`` (``None``:
        nothing to wait for): on the device where the backend allows it (NCCL), so the host
        goes on; on the CPU the host waits.

        Example:
            >>> DeviceRuntime(torch.device("cpu")).wait_work(NullStream(), None)
        """
        if work is None:
            return
        if not self.is_accelerator:
            work.wait()
            return
        with stream:
            work.wait()

    def to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        """A copy of ``tensor`` in ordinary host memory, complete when this returns."""
        return tensor.to("cpu", copy=True)

    def to_device(
        self, tensor: torch.Tensor, device: torch.device, *, copy: bool = False
    ) -> torch.Tensor:
        """``tensor`` on ``device`` (itself if it is there already, unless ``copy``)."""
        return tensor.to(device, copy=copy)

    def in_host_memory(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` lives in host memory."""
        return tensor.device.type == "cpu"

    def forget_cached_casts(self) -> None:
        """Drop the casts ``torch.autocast`` keeps for its whole region when its cache is on.

        The cache keeps the lower-precision copy of every trainable leaf weight it cast, on
        the device, until the outermost autocast region ends (even under ``no_grad``): for
        offloaded weights that is a device copy of each, which would undo the offload. Called
        after each offloaded layer's forward; weights that are not offloaded are cast again
        when next used, as with ``cache_enabled=False`` (what Lightning uses).
        """
        if torch.is_autocast_cache_enabled() and torch.is_autocast_enabled(self.device.type):
            torch.clear_autocast_cache()

    def timing_event(self) -> Any:
        """A new event that can measure elapsed time, or ``None`` where none exists."""
        if not self.is_accelerator:
            return None
        return torch.Event(self.device, enable_timing=True)

    def synchronize(self) -> None:
        """Wait on the host for all work on the device (never called in a forward)."""
        if self.is_accelerator:
            torch.accelerator.synchronize(self.device)

    def memory_allocated(self) -> int | None:
        """Bytes held by the device allocator, or ``None`` where it is not measured."""
        if not self.is_accelerator:
            return None
        return int(torch.accelerator.memory_allocated(self.device))


RuntimeFactory = Callable[[torch.device], "DeviceRuntime | None"]

_FACTORY: ContextVar[RuntimeFactory | None] = ContextVar("hydra_offload_runtime", default=None)


def runtime_for(device: torch.device) -> DeviceRuntime:
    """The runtime for ``device``: the real one, unless a simulated device
    (:class:`~hydra_offload.runtime.simulated.SimulatedDevice`) is active for it."""
    factory = _FACTORY.get()
    if factory is not None:
        runtime = factory(device)
        if runtime is not None:
            return runtime
    return DeviceRuntime(device)
