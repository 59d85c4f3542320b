"""Host storage for offloaded weights: one exact-size buffer, page-locked for CUDA.

PyTorch's caching host allocator (``pin_memory=True``) rounds every block up to a power of
two, so 4.5 GiB of weights would pin 8 GiB. Instead, :class:`HostStorage` allocates exactly the
bytes needed with the ordinary CPU allocator and, when the compute device is CUDA, registers
that range with the CUDA runtime (``cudaHostRegister``, portable and mapped). Registered
memory is page-locked, so ``non_blocking`` copies from it are truly asynchronous, and mapped,
so kernels can read it directly through a zero-copy device view (:meth:`device_views`).

The buffer is always allocated on the CPU, whatever the ambient device (``with
torch.device(...)``, ``torch.set_default_device``), and every tensor in it starts on a
multiple of :data:`ALIGNMENT` bytes. The registration is made under a device guard of the
compute device, so no other device gets a CUDA context.

Tensors of different dtypes get separate buffers (``torch.save`` refuses tensors of different
dtypes that view one storage, and a state dict holds these tensors).

Lifetime: each buffer and its registration belong to one owner object, held by the storage and
by every zero-copy device view made from it. When the last of them goes (:meth:`HostStorage.free`
drops the storage's hold), the devices that may read the memory are synchronized, the range
is unregistered, and the memory is released. A device view kept after ``free()`` (a
``state_dict()`` tensor, a gradient) therefore still reads valid, registered memory.

With a CPU compute device nothing is registered: the buffer is simply a separate CPU tensor.

Shared by a node's processes (``shared=``, ``node=``; see :mod:`hydra_offload.runtime.shared`):
the buffers of the tensors marked shared are segments the node's leader creates and fills and
the other processes map, after :meth:`HostStorage.publish`; every process registers its own
mapping. Until then a follower's shared tensors are ``None`` (:meth:`HostStorage.view`).

Example:
    >>> import torch
    >>> host = HostStorage([((2, 3), (3, 1), torch.float32), ((4,), (1,), torch.bfloat16)])
    >>> [tuple(t.shape) for t in host.tensors], host.nbytes
    ([(2, 3), (4,)], 1024)
    >>> all(t.data_ptr() % ALIGNMENT == 0 for t in host.tensors)
    True
    >>> host.free()
"""

from __future__ import annotations

import os
import warnings
import weakref
from collections.abc import Sequence
from typing import Any

import torch

from hydra_offload.errors import OffloadError
from hydra_offload.runtime import cudart
from hydra_offload.runtime.shared import NodeGroup, SharedSegment, exchange

__all__ = ["ALIGNMENT", "HostStorage", "proc_bytes", "storage_span"]

ALIGNMENT = 512
"""Every tensor starts on a multiple of this many bytes: the alignment of PyTorch's CUDA
caching allocator, so kernels that choose by operand alignment (cuBLASLt) choose as they
would for device memory."""

_REGISTER_PORTABLE_MAPPED = 0x01 | 0x02  # cudaHostRegisterPortable | cudaHostRegisterMapped

Layout = tuple[tuple[int, ...], tuple[int, ...], torch.dtype]


def proc_bytes(path: str, field: str) -> int | None:
    """A ``kB`` figure of a Linux ``/proc`` file, in bytes; ``None`` where it cannot be read.

    Example:
        >>> total = proc_bytes("/proc/meminfo", "MemTotal")  # None off Linux
        >>> total is None or total > 0
        True
    """
    try:
        with open(path) as lines:
            for line in lines:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


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
        shared: per layout, whether it lives in memory the node's processes share (with
            ``node``); ``None``: none does.
        node: the processes of this node (:func:`~hydra_offload.runtime.shared.join_node`);
            ``None``: nothing is shared.

    Raises:
        RuntimeError: the memory cannot be allocated or registered; nothing stays allocated.
    """

    def __init__(
        self,
        layouts: Sequence[Layout],
        *,
        pin_for: torch.device | None = None,
        shared: Sequence[bool] | None = None,
        node: NodeGroup | None = None,
    ):
        self._layouts = list(layouts)
        self._pin_for = pin_for
        self._node = node
        self.nbytes = 0
        """Bytes of the buffers' aligned ranges (what is registered): the tensors' bytes plus
        the padding that starts each on a multiple of ``ALIGNMENT`` and ends each range on
        one. Each private allocation is ``ALIGNMENT`` bytes larger than its range, to start
        it on an aligned address (shared segments start on a page)."""
        self.shared_bytes = 0
        """Of :attr:`nbytes`, the bytes in memory the node's processes share (one copy per
        node)."""
        self.pinned_bytes = 0
        """Bytes registered with the CUDA runtime (0 on the CPU path, and after :meth:`free`)."""
        marks = list(shared) if shared is not None and node is not None else []
        # One buffer per dtype (and sharing): torch.save refuses tensors of different dtypes
        # that view one storage, and a state dict (a checkpoint) holds these tensors.
        groups: dict[tuple[torch.dtype, bool], list[int]] = {}
        for index, (_, _, dtype) in enumerate(self._layouts):
            groups.setdefault((dtype, bool(marks and marks[index])), []).append(index)
        self._blocks: list[_Part] = []
        self._views: list[torch.Tensor | None] = [None] * len(self._layouts)
        for (_, is_shared), indices in groups.items():
            offsets, sizes, end = [], [], 0
            for index in indices:
                shape, stride, dtype = self._layouts[index]
                offsets.append(_align(end))
                sizes.append(storage_span(shape, stride) * dtype.itemsize)
                end = offsets[-1] + sizes[-1]
            # An empty buffer (empty tensors only) has nothing to share.
            part = _Part(None, indices, offsets, _align(end), is_shared and end > 0)
            is_shared = part.shared
            self._blocks.append(part)
            self.nbytes += part.nbytes
            if is_shared:
                self.shared_bytes += part.nbytes
                assert node is not None
                if not node.leader:
                    continue  # mapped from the leader's segment in publish()
                part.block = _HostBlock(part.nbytes, segment=SharedSegment.create(part.nbytes))
            else:
                part.block = _HostBlock(part.nbytes)
                self._register(part)
            _zero_gaps(part.block, offsets, sizes)
            self._make_views(part)

    def _register(self, part: _Part) -> None:
        block = part.block
        assert block is not None
        pin_for = self._pin_for
        if pin_for is not None and pin_for.type == "cuda" and block.nbytes:
            # On failure, the buffers (and the registrations made) go with this frame.
            block.register(pin_for)
            self.pinned_bytes += block.nbytes

    def _make_views(self, part: _Part) -> None:
        block = part.block
        assert block is not None
        for index, offset in zip(part.indices, part.offsets, strict=True):
            self._views[index] = self._view(
                block.buffer, block.offset + offset, self._layouts[index]
            )

    @property
    def tensors(self) -> list[torch.Tensor]:
        """One tensor per layout, in order (shared ones once :meth:`publish` has run)."""
        if any(v is None for v in self._views) and self._blocks:
            raise RuntimeError("shared host storage is used before publish()")
        return [v for v in self._views if v is not None]

    def view(self, index: int) -> torch.Tensor | None:
        """The tensor of layout ``index``, or ``None``: a shared one on a process that is not
        the node's leader, before :meth:`publish`."""
        return self._views[index]

    def publish(self, problem: str | None = None) -> None:
        """Share the shared segments with the node's other processes: a collective of the
        whole process group, after the leader has filled them. The other processes map
        them; once every process of the node has, the leader closes its descriptors; each
        process then page-locks its own mapping (CUDA). Does nothing without a node.

        Args:
            problem: why this process cannot go on (filling failed): every process then
                frees its storage and raises.

        Raises:
            OffloadError: a process had a problem, or could not map the segments; raised on
                every process alike (the storage is freed).
        """
        node = self._node
        if node is None:
            if problem is not None:
                raise OffloadError(problem)
            return
        shared = [p for p in self._blocks if p.shared]
        segments = [p.block.segment for p in shared if p.block is not None]
        offer = [(s.pid, s.fd, s.buffer.numel()) for s in segments if s is not None]
        try:
            sent = exchange(node, offer if node.leader else None, problem)
        except BaseException:
            self.free()
            raise
        mapped: str | None = None
        if not node.leader:
            try:
                for part, (pid, fd, nbytes) in zip(shared, sent[0], strict=True):
                    part.block = _HostBlock(nbytes, segment=SharedSegment.attach(pid, fd, nbytes))
                    self._make_views(part)
            except OffloadError as err:
                mapped = str(err)  # the others learn it in the next exchange
        try:
            # Every process of the node has mapped the segments (or says why not): the
            # leader's descriptors are no longer needed.
            exchange(node, None, mapped)
            for part in shared:
                self._register(part)
        except BaseException:
            self.free()
            raise
        finally:
            for segment in segments:
                if segment is not None:
                    segment.close()

    @staticmethod
    def _view(buffer: torch.Tensor, offset: int, layout: Layout) -> torch.Tensor:
        # The aligned start is a multiple of ALIGNMENT and the allocation starts on the CPU
        # allocator's alignment (64 bytes), so the offset is whole elements of any dtype.
        shape, stride, dtype = layout
        view = torch.empty(0, dtype=dtype, device=buffer.device)
        return view.set_(buffer.untyped_storage(), offset // dtype.itemsize, shape, stride)

    def device_views(self, device: torch.device) -> list[torch.Tensor]:
        """Zero-copy CUDA tensors over the registered host memory, one per layout.

        Kernels reading them fetch the bytes over the interconnect; writing the host tensors
        changes what the kernels read. Built in pure PyTorch through
        ``__cuda_array_interface__``, at the device address ``cudaPointerGetAttributes``
        reports for each range (with unified virtual addressing, the host address). The views
        keep the memory registered and allocated for as long as they live, even after
        :meth:`free`.

        Raises:
            RuntimeError: the memory is not registered host memory mapped for ``device``.
        """
        if device.type != "cuda":
            raise RuntimeError(f"zero-copy views of host memory need a CUDA device, not {device}")
        blocks = [p.block for p in self._blocks if p.block is not None]
        registered = [b for b in blocks if b.nbytes]
        if not registered or any(b.registration is None for b in registered):
            raise RuntimeError("zero-copy views need host memory registered for CUDA")
        views: list[torch.Tensor | None] = [None] * len(self._layouts)
        for part in self._blocks:
            block = part.block
            assert block is not None
            if not block.nbytes:  # only empty tensors: nothing to map
                for layout_index in part.indices:
                    shape, stride, dtype = self._layouts[layout_index]
                    views[layout_index] = torch.empty_strided(
                        shape, stride, dtype=dtype, device=device
                    )
                continue
            registration = block.registration
            assert registration is not None
            runtime = registration.runtime
            index = device.index if device.index is not None else runtime.current_device()
            with runtime.device_guard(index):
                first = _mapped_address(runtime, block.ptr, index)
                last = _mapped_address(runtime, block.ptr + block.nbytes - 1, index)
            if last - first != block.nbytes - 1:
                raise RuntimeError(
                    f"host memory at {block.ptr:#x} is not mapped as one range on cuda:{index}"
                )
            registration.readers.add(index)
            mapped = _device_tensor(_MappedBytes(block, first), torch.device("cuda", index))
            for layout_index, offset in zip(part.indices, part.offsets, strict=True):
                views[layout_index] = self._view(mapped, offset, self._layouts[layout_index])
        return [v for v in views if v is not None]

    def free(self) -> None:
        """Give up this storage's hold on the memory; its tensors must no longer be used.

        Without device views left, the memory is unregistered (after synchronizing the
        devices that may read it) and released at once; otherwise when the last view goes.
        Shared memory goes when the last process of the node lets go of it.
        """
        for part in self._blocks:
            if part.block is not None and part.block.segment is not None:
                part.block.segment.close()
        self._blocks = []
        self.pinned_bytes = 0
        self.shared_bytes = 0
        self._views = []


class _Part:
    """One buffer of a :class:`HostStorage`: the tensors of one dtype (shared or not)."""

    __slots__ = ("block", "indices", "nbytes", "offsets", "shared")

    def __init__(
        self,
        block: _HostBlock | None,
        indices: list[int],
        offsets: list[int],
        nbytes: int,
        shared: bool,
    ) -> None:
        self.block = block
        """The buffer (``None``: a shared one not mapped here yet)."""
        self.indices = indices
        """Positions of its tensors among the storage's layouts."""
        self.offsets = offsets
        """Each tensor's byte offset in the block's aligned range."""
        self.nbytes = nbytes
        self.shared = shared


def _zero_gaps(block: _HostBlock, offsets: Sequence[int], sizes: Sequence[int]) -> None:
    """Zero the bytes no tensor covers (alignment slack and padding), so that what is saved
    with a tensor's storage (``torch.save`` writes all of it) is deterministic."""
    covered = sorted(
        (block.offset + offset, block.offset + offset + size)
        for offset, size in zip(offsets, sizes, strict=True)
    )
    position = 0
    for start, stop in [*covered, (block.buffer.numel(), block.buffer.numel())]:
        if start > position:
            block.buffer[position:start].zero_()
        position = max(position, stop)


class _HostBlock:
    """The host buffer of one :class:`HostStorage` and, when page-locked, its registration.

    Held by the storage and by every device view (through :class:`_MappedBytes`); nothing it
    holds refers back to it, so it goes, and with it the registration, with the last holder.
    """

    def __init__(self, nbytes: int, *, segment: SharedSegment | None = None) -> None:
        self.segment = segment
        """The shared segment the buffer maps (``None``: private memory)."""
        if segment is not None:  # page-aligned, exactly nbytes
            self.buffer = segment.buffer
            self.offset = 0
        else:
            # The CPU allocator aligns to 64 bytes only: allocate a little more, start
            # aligned. Both the allocation and the aligned range (nbytes) are whole numbers
            # of ALIGNMENT blocks, so each storage is a whole number of elements of any
            # dtype: torch.save writes, and torch.load checks, the whole storage a tensor
            # views.
            size = nbytes + ALIGNMENT if nbytes else 0
            self.buffer = torch.empty(size, dtype=torch.uint8, device="cpu")
            self.offset = -self.buffer.data_ptr() % ALIGNMENT if nbytes else 0
        """Bytes from the allocation's start to the aligned range."""
        self.ptr = self.buffer.data_ptr() + self.offset
        """Host address of the aligned range (what is registered)."""
        self.nbytes = nbytes
        self.registration: _Registration | None = None

    def register(self, device: torch.device) -> None:
        """Page-lock the aligned range for ``device`` (portable and mapped).

        Raises:
            RuntimeError: ``cudaHostRegister`` failed (the runtime's last error is cleared).
        """
        runtime = cudart.get_runtime()
        index = device.index if device.index is not None else runtime.current_device()
        with runtime.device_guard(index):
            err = runtime.host_register(self.ptr, self.nbytes, _REGISTER_PORTABLE_MAPPED)
            if err != 0:
                # A failed runtime call stays the thread's last error; the next kernel launch
                # check would raise it as its own.
                runtime.get_last_error()
                raise RuntimeError(
                    f"could not page-lock {self.nbytes:,} bytes of host memory for offloaded "
                    f"weights on cuda:{index}: cudaHostRegister failed with "
                    f"'{runtime.error_string(err)}' (error {err}); check the memlock limit "
                    "(ulimit -l) and free host memory"
                )
        registration = _Registration(runtime, index, self.ptr, self.nbytes)
        self.registration = registration
        # The finalizer holds the registration and the buffer, never this block: the buffer
        # is released only after the range is unregistered.
        finalizer = weakref.finalize(self, registration.release, self.buffer)
        finalizer.atexit = False  # at exit the driver releases everything itself


class _Registration:
    """One ``cudaHostRegister`` range, and the devices whose kernels may read it."""

    def __init__(self, runtime: cudart.CudaRuntime, device: int, ptr: int, nbytes: int) -> None:
        self.runtime = runtime
        self.device = device
        self.ptr = ptr
        self.nbytes = nbytes
        self.readers = {device}
        """Devices to synchronize before unregistering: the one registered for, and every
        device zero-copy views were made for."""
        self._pid = os.getpid()

    def release(self, buffer: torch.Tensor) -> None:
        """Synchronize the readers, then unregister; ``buffer`` is released after.

        Runs as a finalizer: failures are reported as a :class:`RuntimeWarning`, never raised.
        """
        if os.getpid() != self._pid:
            return  # a forked child: the registration belongs to the parent's CUDA context
        problems = []
        for index in sorted(self.readers):
            try:
                self.runtime.synchronize(index)
            except Exception as err:
                problems.append(f"synchronizing cuda:{index} failed ({err})")
        try:
            with self.runtime.device_guard(self.device):
                err = self.runtime.host_unregister(self.ptr)
                if err != 0:
                    self.runtime.get_last_error()
                    problems.append(
                        f"cudaHostUnregister failed with '{self.runtime.error_string(err)}' "
                        f"(error {err})"
                    )
        except Exception as exc:
            problems.append(f"cudaHostUnregister raised {exc!r}")
        if problems:
            warnings.warn(
                f"releasing {self.nbytes:,} bytes of page-locked host memory at "
                f"{self.ptr:#x} (cuda:{self.device}): " + "; ".join(problems),
                RuntimeWarning,
                stacklevel=2,
            )


def _mapped_address(runtime: cudart.CudaRuntime, ptr: int, index: int) -> int:
    """The device address of registered host memory at ``ptr`` on the current device."""
    err, attributes = runtime.pointer_attributes(ptr)
    if err != 0:
        runtime.get_last_error()
        raise RuntimeError(
            f"cudaPointerGetAttributes failed on host memory at {ptr:#x} with "
            f"'{runtime.error_string(err)}' (error {err})"
        )
    if attributes.type != cudart.MEMORY_HOST:
        raise RuntimeError(
            f"host memory at {ptr:#x} is not registered with the CUDA runtime "
            f"(memory type {attributes.type})"
        )
    if not attributes.device_pointer:
        raise RuntimeError(f"registered host memory at {ptr:#x} is not mapped for cuda:{index}")
    return attributes.device_pointer


def _device_tensor(owner: _MappedBytes, device: torch.device) -> torch.Tensor:
    """A CUDA tensor over ``owner``'s ``__cuda_array_interface__``; its storage keeps
    ``owner`` alive."""
    return torch.as_tensor(owner, device=device)


class _MappedBytes:
    """The registered range presented to PyTorch as CUDA memory (``__cuda_array_interface__``).

    The device tensor made from it holds a reference to this object, and through it to the
    block (registration and buffer), for as long as the tensor's storage lives.
    """

    def __init__(self, block: _HostBlock, device_pointer: int) -> None:
        self._block = block
        self.__cuda_array_interface__: dict[str, Any] = {
            "shape": (block.nbytes,),
            "typestr": "|u1",
            "data": (device_pointer, False),
            "version": 3,
        }
