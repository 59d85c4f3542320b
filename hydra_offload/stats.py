"""What an applied offload costs and does: :class:`OffloadStats`, read from
:attr:`hydra_offload.OffloadHandle.stats`.

Example:
    >>> import torch
    >>> from hydra_offload import apply_offload
    >>> with apply_offload(torch.nn.Linear(4, 4), {"uva": {"cpu_offload_gb": 1}}) as handle:
    ...     stats = handle.stats
    >>> stats.backend, stats.offloaded_bytes
    ('uva', 80)
"""

from __future__ import annotations

from dataclasses import dataclass

from hydra_offload.config import ResolvedBackend

__all__ = ["OffloadStats"]


@dataclass(frozen=True)
class OffloadStats:
    """A snapshot of what an offload costs and does.

    Attributes:
        backend: the backend in use.
        offloaded_bytes: parameter bytes kept in host memory.
        device_bytes_saved: device memory freed: measured from the device allocator when the
            offloaded parameters lived on the compute device (``measured``), else the plan's
            figure (offloaded bytes minus the pool).
        measured: whether ``device_bytes_saved`` comes from the allocator.
        host_bytes: bytes of host memory allocated: offloaded weights, the host gradients of
            trainable offloaded weights and their staging buffers (tensors plus alignment
            padding).
        host_bytes_pinned: of those, bytes page-locked with the CUDA runtime (0 on CPU).
        pool_bytes: bytes of the prefetch device buffer pool.
        forwards: forward calls since the offload was applied, counted on the innermost
            module that contains every offloaded parameter (eager calls; a
            ``torch.compile``'d model's calls are not counted).
        h2d_bytes: bytes copied from host storage to the device in total.
        h2d_bytes_per_forward: ``h2d_bytes / forwards`` (``None`` before the first forward).
        loads: copies issued (prefetch: layer loads; UVA copy mode: module fetches).
        stalls: prefetch loads made on demand because a layer ran while its slots held other
            weights (0 when layers run in the planned order).
        wait_ms: time the compute stream waited for copies, measured with CUDA events
            (prefetch on CUDA); ``None`` where it is not measured.
        host_bytes_shared: of ``host_bytes``, the bytes in memory this node's data-parallel
            processes share: one copy of the frozen offloaded weights per node (0 when each
            process keeps its own).
        shared_by: how many processes of this node share them (1: not shared).
    """

    backend: ResolvedBackend
    offloaded_bytes: int
    device_bytes_saved: int
    measured: bool
    host_bytes: int
    host_bytes_pinned: int
    pool_bytes: int
    forwards: int
    h2d_bytes: int
    h2d_bytes_per_forward: float | None
    loads: int
    stalls: int
    wait_ms: float | None
    host_bytes_shared: int = 0
    shared_by: int = 1
