"""Measuring the machine and a model: copy bandwidth, step times, host-to-device bytes, RSS.

The benchmark suite (``benchmarks/offload_bench.py``) and the ``suggest`` helper of the main
job are built on these. Every figure comes from the device itself: CUDA events or
``torch.accelerator.synchronize()`` around the timed work, never estimates.

Example:
    >>> import torch
    >>> result = copy_bandwidth(torch.device("cpu"), sizes=(1 << 20,), repeats=2)
    >>> result.kind, result.gb_per_s > 0
    ('host memory copy', True)
    >>> with CopyCounter(torch.device("cpu")) as copies:
    ...     _ = torch.ones(4).to(torch.float64)
    >>> copies.bytes
    16
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hydra_offload.runtime.host import HostStorage, proc_bytes

__all__ = [
    "BandwidthResult",
    "CopyCounter",
    "copy_bandwidth",
    "rss_bytes",
    "synchronize",
    "time_calls",
]

MIB = 1 << 20
DEFAULT_SIZES = (16 * MIB, 64 * MIB, 256 * MIB, 1024 * MIB)
"""Copy sizes for the bandwidth measurement: large enough that the fixed cost per copy
(microseconds) is below 1% from 64 MiB up."""


def synchronize(device: torch.device) -> None:
    """Wait until the device has finished all queued work (nothing to wait for on CPU)."""
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def time_calls(
    fn: Callable[[], Any], device: torch.device, *, warmup: int = 2, repeats: int = 10
) -> list[float]:
    """Seconds each of ``repeats`` calls of ``fn`` took, after ``warmup`` untimed calls.

    The device is synchronized before and after each call, so each figure is the whole
    call, device work included.
    """
    if warmup < 0 or repeats < 1:
        raise ValueError(f"warmup must be >= 0 and repeats >= 1, got {warmup} and {repeats}")
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


@dataclass(frozen=True)
class BandwidthResult:
    """Measured copy bandwidth from host memory to ``device``.

    Attributes:
        device: the destination device.
        kind: ``"pinned host-to-device"`` (an accelerator: page-locked source, async copy)
            or ``"host memory copy"`` (CPU: there is no interconnect, a memcpy is what an
            offload costs).
        by_size: bytes per copy -> GB/s (10^9 bytes per second), median of the repeats.
    """

    device: str
    kind: str
    by_size: dict[int, float] = field(default_factory=dict)

    @property
    def gb_per_s(self) -> float:
        """The figure to plan with: the best median over the sizes (large copies reach it)."""
        return max(self.by_size.values())

    @property
    def bytes_per_s(self) -> float:
        return self.gb_per_s * 1e9


def copy_bandwidth(
    device: torch.device, *, sizes: Sequence[int] = DEFAULT_SIZES, repeats: int = 5
) -> BandwidthResult:
    """Host-to-``device`` copy bandwidth at several sizes.

    On CUDA the source is the kind of memory the offload copies from: a
    :class:`~hydra_offload.runtime.host.HostStorage` page-locked for ``device``, released after
    each size (nothing is left in PyTorch's caching host allocator). On another accelerator it
    is ``pin_memory`` memory. Each copy is timed with events on ``device``'s current stream,
    the stream the copy runs on, as the prefetch copy stream does it. On the CPU it is a copy
    between two ordinary host tensors.

    Raises:
        ValueError: a size is not positive or ``repeats < 1``.
        RuntimeError: the source memory cannot be allocated or page-locked.
    """
    if repeats < 1 or not sizes or any(s <= 0 for s in sizes):
        raise ValueError(f"sizes must be positive and repeats >= 1, got {sizes} and {repeats}")
    accelerator = device.type != "cpu"
    by_size: dict[int, float] = {}
    for size in sizes:
        storage = None
        if device.type == "cuda":
            storage = HostStorage([((size,), (1,), torch.uint8)], pin_for=device)
            src = storage.tensors[0]
        else:
            src = torch.empty(size, dtype=torch.uint8, device="cpu", pin_memory=accelerator)
        dst: torch.Tensor | None = None
        try:
            src.fill_(1)  # touch every page: first-touch faults are not copy time
            dst = torch.empty(size, dtype=torch.uint8, device=device)
            if accelerator:
                seconds = _timed_copies(dst, src, device, repeats)
            else:
                seconds = []
                dst.copy_(src)  # warm-up
                for _ in range(repeats):
                    begin = time.perf_counter()
                    dst.copy_(src)
                    seconds.append(time.perf_counter() - begin)
            by_size[size] = size / statistics.median(seconds) / 1e9
        finally:
            del src, dst
            if storage is not None:
                storage.free()  # waits for the device, unregisters, releases
    kind = "pinned host-to-device" if accelerator else "host memory copy"
    return BandwidthResult(str(device), kind, by_size)


def _timed_copies(
    dst: torch.Tensor, src: torch.Tensor, device: torch.device, repeats: int
) -> list[float]:
    """Seconds of each of ``repeats`` asynchronous copies ``src`` -> ``dst``, measured with
    events on ``device``'s current stream (the copy's stream), whatever the current device."""
    seconds = []
    with torch.accelerator.device_index(device.index):
        stream = torch.accelerator.current_stream(device)
        dst.copy_(src, non_blocking=True)  # warm-up
        for _ in range(repeats):
            start = torch.Event(device, enable_timing=True)
            end = torch.Event(device, enable_timing=True)
            start.record(stream)
            dst.copy_(src, non_blocking=True)
            end.record(stream)
            end.synchronize()
            seconds.append(start.elapsed_time(end) / 1e3)
    return seconds


class CopyCounter(TorchDispatchMode):
    """Counts the bytes copied from host memory onto ``device`` while it is active.

    Every ``copy_`` and ``to``/``_to_copy`` whose source is in CPU memory and whose result
    lives on ``device`` is counted, whoever issues it (a backend's hooks, another library's,
    the model itself). With ``device`` the CPU, every CPU copy counts: there is no
    interconnect, so compare against the same count without offloading.

    Each operator passes through Python while active: count in a separate, untimed pass.
    """

    _COPIES: ClassVar[set[Any]] = {torch.ops.aten.copy_.default, torch.ops.aten._to_copy.default}

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.bytes = 0
        self.copies = 0

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        if func in self._COPIES:
            src = args[1] if func is torch.ops.aten.copy_.default else args[0]
            if (
                isinstance(src, torch.Tensor)
                and isinstance(out, torch.Tensor)
                and src.device.type == "cpu"
                and _same_device(out.device, self.device)
            ):
                self.bytes += src.numel() * src.element_size()
                self.copies += 1
        return out


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    return a.index is None or b.index is None or a.index == b.index


def rss_bytes() -> int | None:
    """Resident set size of this process (Linux ``/proc/self/status``), or None."""
    return proc_bytes("/proc/self/status", "VmRSS")
