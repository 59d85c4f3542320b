"""The static device buffer pool of the prefetch backend, and what each slot holds.

Every offloaded parameter's ``.data`` points at one slot for the whole life of the offload,
so the device addresses never change (which CUDA graphs and compiled code rely on). A slot is
shared by the layers that take turns in it; it records which layer's weights it holds
(``owner``), the event after which those weights are there (``ready``), and the event after
which compute has finished reading them (``free``). A layer may compute only when every one
of its slots is owned by it: that check is what makes wrong weights impossible, whatever the
order layers run in.

A slot holds one tensor per part of the parameters that take turns in it (one for a plain
tensor; a quantized weight's values and its quantization state, for instance).

Example:
    >>> import torch
    >>> pool = BufferPool([([((4, 4), (4, 1), torch.float32)], 2)], torch.device("cpu"))
    >>> len(pool.slots[0]), pool.nbytes, pool.slots[0][1].owner is None
    (2, 128, True)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["BufferPool", "Slot"]


class Slot:
    """Device tensors of the pool (one per part of a parameter) and the bookkeeping that
    guards them."""

    __slots__ = ("free", "owner", "ready", "tensors", "used")

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        self.tensors = list(tensors)
        self.owner: object | None = None
        """The layer whose weights the slot holds (or is being filled with); None: nobody's."""
        self.ready: Any = None
        """Event recorded on the copy stream after the last copy into the slot."""
        self.free: Any = None
        """Event recorded on the compute stream after the last compute that read the slot."""
        self.used = False
        """Whether the owner has computed with the slot since it was filled (so the slot may
        be refilled for the next layer without making anyone stall)."""


Layout = tuple[tuple[int, ...], tuple[int, ...], torch.dtype]


class BufferPool:
    """Device tensors allocated once: ``count`` slots per ``(layouts, count)`` entry, each
    slot one tensor per ``(shape, stride, dtype)`` in ``layouts``.

    Raises:
        torch.OutOfMemoryError: the device cannot hold the pool; nothing stays allocated.
    """

    def __init__(
        self, entries: Sequence[tuple[Sequence[Layout], int]], device: torch.device
    ) -> None:
        self.slots: list[list[Slot]] = [
            [
                Slot(
                    [
                        torch.empty_strided(shape, stride, dtype=dtype, device=device)
                        for shape, stride, dtype in layouts
                    ]
                )
                for _ in range(count)
            ]
            for layouts, count in entries
        ]

    @property
    def nbytes(self) -> int:
        """Bytes of device memory the pool's tensors reach."""
        return sum(
            tensor.untyped_storage().nbytes()
            for entry in self.slots
            for slot in entry
            for tensor in slot.tensors
        )

    def release(self) -> None:
        """Drop the pool's tensors (their memory returns to the allocator)."""
        self.slots = []
