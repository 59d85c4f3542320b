"""Host storage for offloaded weights: one exact-size buffer, page-locked for CUDA.

PyTorch's caching host allocator (``pin_memory=True``) rounds every block up to a power of
two, so 4.5 GiB of weights would pin 8 GiB. Instead, :class:`HostStorage` allocates exactly the
bytes needed with the ordinary CPU allocator and, when the compute device is CUDA, registers
that range with the CUDA runtime (``cudaHostRegister``, portable and mapped). Registered
memory is page-locked, so ``non_blocking`` copies from it are truly asynchronous, and mapped,
so kernels can read it directly through a zero-copy device view (:meth:`device_views`).

With a CPU compute device nothing is registered: the buffer is simply a separate CPU tensor.

Example:
    >>> import torch
    >>> host = HostStorage([((2, 3), (3, 1), torch.float32), ((4,), (1,), torch.bfloat16)])
    >>> [tuple(t.shape) for t in host.tensors], host.nbytes
    ([(2, 3), (4,)], 72)
    >>> host.free()
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["HostStorage", "storage_span"]

ALIGNMENT = 64
"""Every tensor starts on a multiple of this many bytes (a cache line; fits any dtype)."""

_REGISTER_PORTABLE_MAPPED = 0x01 | 0x02  # cudaHostRegisterPortable | cudaHostRegisterMapped

Layout = tuple[tuple[int, ...], tuple[int, ...], torch.dtype]


def storage_span(shape: Sequence[int], stride: Sequence[int]) -> int:
    """Elements of storage a tensor of this shape and stride reaches (0 when empty)."""
    if any(size == 0 for size in shape):
        return 0
    return 1 + sum((size - 1) * step for size, step in zip(shape, stride, strict=True))


def _align(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


class HostStorage:
    """Exact-size host memory holding one tensor per layout, strides preserved.

    Args:
        layouts: ``(shape, stride, dtype)`` of each tensor to hold.
        pin_for: a CUDA device to page-lock (register) the buffer for; ``None`` keeps it as
            ordinary memory (the CPU compute path).

    Raises:
        RuntimeError: the memory cannot be allocated or registered; nothing stays allocated.
    """

    def __init__(self, layouts: Sequence[Layout], *, pin_for: torch.device | None = None):
        offsets, end = [], 0
        for shape, stride, dtype in layouts:
            offsets.append(_align(end))
            end = offsets[-1] + storage_span(shape, stride) * dtype.itemsize
        self.nbytes = end
        """Bytes allocated: the tensors' bytes plus alignment padding between them."""
        self.pinned_bytes = 0
        """Bytes registered with the CUDA runtime (0 on the CPU path)."""
        self._buffer: torch.Tensor | None = torch.empty(self.nbytes, dtype=torch.uint8)
        self._layouts = list(layouts)
        self._offsets = offsets
        if pin_for is not None and pin_for.type == "cuda" and self.nbytes:
            self._register()
        self.tensors: list[torch.Tensor] = [
            self._view(self._buffer, offset, layout)
            for offset, layout in zip(offsets, self._layouts, strict=True)
        ]

    @staticmethod
    def _view(buffer: torch.Tensor, offset: int, layout: Layout) -> torch.Tensor:
        shape, stride, dtype = layout
        view = torch.empty(0, dtype=dtype, device=buffer.device)
        return view.set_(buffer.untyped_storage(), offset // dtype.itemsize, shape, stride)

    def _register(self) -> None:
        assert self._buffer is not None
        cudart = torch.cuda.cudart()
        err = cudart.cudaHostRegister(
            self._buffer.data_ptr(), self.nbytes, _REGISTER_PORTABLE_MAPPED
        )
        if int(err) != 0:
            self._buffer = None
            raise RuntimeError(
                f"could not page-lock {self.nbytes:,} bytes of host memory for offloaded "
                f"weights (cudaHostRegister error {int(err)}); check the memlock limit "
                "(ulimit -l) and free host memory"
            )
        self.pinned_bytes = self.nbytes
        # Unregister even if free() is never called; the finalizer keeps the buffer alive
        # until then so the range is still valid when it is unregistered.
        self._unregister = weakref.finalize(self, _unregister, self._buffer)

    def device_views(self, device: torch.device) -> list[torch.Tensor]:
        """Zero-copy CUDA tensors over the registered host memory, one per layout.

        Kernels reading them fetch the bytes over the interconnect; writing the host tensors
        changes what the kernels read. Built in pure PyTorch through
        ``__cuda_array_interface__``: with unified virtual addressing, registered host memory
        has the same address on the device.
        """
        if self.pinned_bytes == 0 or self._buffer is None:
            raise RuntimeError("zero-copy views need host memory registered for CUDA")
        mapped = torch.as_tensor(_MappedBytes(self._buffer), device=device)
        if mapped.device != device or mapped.data_ptr() != self._buffer.data_ptr():
            raise RuntimeError(
                f"the device view of host memory is not zero-copy on {device} "
                f"(got a tensor on {mapped.device} at another address)"
            )
        return [
            self._view(mapped, offset, layout)
            for offset, layout in zip(self._offsets, self._layouts, strict=True)
        ]

    def free(self) -> None:
        """Unregister and release the memory; the tensors must no longer be used."""
        if self.pinned_bytes:
            self._unregister()
            self.pinned_bytes = 0
        self._buffer = None
        self.tensors = []


def _unregister(buffer: torch.Tensor) -> None:
    torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr())


class _MappedBytes:
    """The host buffer presented to PyTorch as CUDA memory (``__cuda_array_interface__``).

    The device tensor made from it holds a reference to this object, and through it to the
    host buffer, for as long as the tensor lives.
    """

    def __init__(self, buffer: torch.Tensor) -> None:
        self._buffer = buffer
        self.__cuda_array_interface__: dict[str, Any] = {
            "shape": (buffer.numel(),),
            "typestr": "|u1",
            "data": (buffer.data_ptr(), False),
            "version": 3,
        }
