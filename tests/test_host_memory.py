"""Host storage: CPU buffers whatever the ambient device, 512-byte alignment, lifetime of the
registration (device views keep it; no reference cycles), CUDA runtime errors cleared and
reported, and a bandwidth measurement that leaves no pinned memory behind.

The CUDA-only logic is tested on the CPU against ``RecordingRuntime``: a stand-in for the
few CUDA runtime calls host storage makes, installed through ``cudart.set_runtime``. It keeps
the runtime's semantics that matter here (registered ranges, the per-thread last error, the
current device) and records every call, so the order and arguments of *our* calls can be
checked. The tests marked ``cuda`` check the same on a real device.

The last section checks ``apply_offload``'s up-front host-memory check against a stand-in
for ``MemAvailable``.
"""

from __future__ import annotations

import contextlib
import doctest
import gc
import io
import os
import subprocess
import sys
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from hydra_offload import OffloadError, OffloadHandle, apply_offload, offload
from hydra_offload.models import DecoderLM
from hydra_offload.plan import plan_offload
from hydra_offload.runtime import cudart
from hydra_offload.runtime import host as host_module
from hydra_offload.runtime.cudart import MEMORY_HOST, MEMORY_UNREGISTERED, PointerAttributes
from hydra_offload.runtime.host import ALIGNMENT, HostStorage
from hydra_offload.tuning.measure import copy_bandwidth

ODD_LAYOUTS = [
    ((3, 5), (5, 1), torch.float32),
    ((7,), (1,), torch.int8),
    ((2, 3), (1, 2), torch.float16),  # transposed strides
    ((0, 4), (4, 1), torch.float64),  # empty
    ((1,), (1,), torch.bfloat16),
    ((5, 3, 2), (6, 2, 1), torch.complex64),
    ((11,), (3,), torch.int16),  # strided: the span covers gaps
]


def address(t: torch.Tensor) -> int:
    """Where the tensor starts (``data_ptr()`` is 0 for an empty tensor)."""
    return t.untyped_storage().data_ptr() + t.storage_offset() * t.element_size()


def layouts_bytes(layouts):
    return [host_module.storage_span(shape, stride) * dtype.itemsize
            for shape, stride, dtype in layouts]  # fmt: skip


@pytest.fixture
def no_gc() -> Iterator[None]:
    """Only reference counting releases memory: a reference cycle would keep it."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


# --------------------------------------------------------------------------------------------
# The buffer is host memory, whatever the ambient device
# --------------------------------------------------------------------------------------------


def fill_distinct(tensors: list[torch.Tensor]) -> None:
    """Tensor ``i`` all ``i + 1`` (a function: no loop variable keeps a tensor alive)."""
    for i, t in enumerate(tensors):
        t.fill_(i + 1)


def check_usable_cpu_storage(storage: HostStorage) -> None:
    assert all(t.device == torch.device("cpu") for t in storage.tensors)
    fill_distinct(storage.tensors)
    for i, t in enumerate(storage.tensors):
        assert torch.all(t == i + 1), i


def test_host_storage_is_on_the_cpu_inside_a_device_context():
    with torch.device("meta"):
        storage = HostStorage(ODD_LAYOUTS)
        check_usable_cpu_storage(storage)
    storage.free()


def test_host_storage_is_on_the_cpu_under_another_default_device():
    before = torch.get_default_device()
    torch.set_default_device("meta")
    try:
        assert torch.empty(1).is_meta  # the ambient default the storage must ignore
        storage = HostStorage(ODD_LAYOUTS)
        check_usable_cpu_storage(storage)
        storage.free()
    finally:
        torch.set_default_device(None if before == torch.device("cpu") else before)
    assert torch.empty(1).device == torch.device("cpu")


def test_copy_bandwidth_on_the_cpu_inside_a_device_context():
    with torch.device("meta"):
        result = copy_bandwidth(torch.device("cpu"), sizes=(1 << 16,), repeats=1)
    assert result.kind == "host memory copy"
    assert result.gb_per_s > 0


# --------------------------------------------------------------------------------------------
# Alignment: 512 bytes, as PyTorch's CUDA caching allocator
# --------------------------------------------------------------------------------------------


def test_alignment_is_the_cuda_caching_allocators():
    assert ALIGNMENT == 512


@pytest.mark.parametrize("rotate", range(len(ODD_LAYOUTS)))
def test_every_tensor_starts_on_a_multiple_of_512_bytes(rotate):
    layouts = ODD_LAYOUTS[rotate:] + ODD_LAYOUTS[:rotate]
    # Several storages, so that allocations land at several addresses.
    built = [(layouts[: k + 1], HostStorage(layouts[: k + 1])) for k in range(len(layouts))]
    for held, storage in built:
        sizes = layouts_bytes(held)
        # One buffer per dtype; within it, tensors in order, aligned, not overlapping.
        ends: dict[int, tuple[int, int]] = {}  # buffer -> (its aligned start, end so far)
        for t, (shape, stride, dtype), size in zip(storage.tensors, held, sizes, strict=True):
            assert (tuple(t.shape), t.stride(), t.dtype) == (shape, stride, dtype)
            buffer = t.untyped_storage().data_ptr()
            start, end = ends.get(buffer, (address(t), 0))
            assert start % ALIGNMENT == 0
            offset = address(t) - start
            assert offset % ALIGNMENT == 0
            assert offset >= end  # no overlap
            ends[buffer] = (start, offset + size)
        assert len(ends) == len({dtype for _, _, dtype in held})
        # The aligned ranges, one per dtype.
        assert storage.nbytes == sum(-(-end // ALIGNMENT) * ALIGNMENT for _, end in ends.values())


def assert_each_saves_and_loads_back(tensors: list[torch.Tensor]) -> None:
    # torch.save writes the whole storage a tensor views; torch.load checks that its size is
    # a whole number of the tensor's elements.
    for t in tensors:
        buffer = io.BytesIO()
        torch.save(t, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer)
        assert loaded.device == t.device
        assert torch.equal(loaded, t)


def test_a_saved_host_tensor_loads_back():
    storage = HostStorage([((3,), (1,), torch.float32), ((7,), (1,), torch.int8)])
    fill_distinct(storage.tensors)
    assert_each_saves_and_loads_back(storage.tensors)
    storage.free()


def test_bytes_no_tensor_covers_are_zero():
    storage = HostStorage(ODD_LAYOUTS)
    fill_distinct(storage.tensors)
    memory = storage.tensors[0].untyped_storage()
    raw = torch.empty(0, dtype=torch.uint8).set_(memory)
    covered = torch.zeros(memory.nbytes(), dtype=torch.bool)
    for t, size in zip(storage.tensors, layouts_bytes(ODD_LAYOUTS), strict=True):
        begin = address(t) - memory.data_ptr()
        covered[begin : begin + size] = True
    assert covered.any()
    assert torch.all(raw[~covered] == 0)
    storage.free()


def test_empty_storage():
    storage = HostStorage([((0,), (1,), torch.float32)])
    assert storage.nbytes == 0
    assert storage.tensors[0].numel() == 0
    storage.free()


# --------------------------------------------------------------------------------------------
# Lifetime on the CPU path: no reference cycles
# --------------------------------------------------------------------------------------------


def test_free_releases_the_buffer_at_once(no_gc):
    storage = HostStorage(ODD_LAYOUTS)
    memory = weakref.ref(storage.tensors[0].untyped_storage())
    assert memory() is not None
    storage.free()
    assert memory() is None
    assert storage.tensors == []
    assert storage.pinned_bytes == 0


def test_a_dropped_storage_releases_the_buffer(no_gc):
    storage = HostStorage(ODD_LAYOUTS)
    memory = weakref.ref(storage.tensors[0].untyped_storage())
    owner = weakref.ref(storage)
    del storage
    assert owner() is None
    assert memory() is None


def test_a_host_tensor_kept_after_free_keeps_its_memory(no_gc):
    storage = HostStorage(ODD_LAYOUTS)
    kept = storage.tensors[0]
    kept.fill_(3)
    memory = weakref.ref(kept.untyped_storage())
    storage.free()
    assert memory() is not None
    assert torch.all(kept == 3)
    del kept
    assert memory() is None


# --------------------------------------------------------------------------------------------
# The CUDA logic, against a recording stand-in of the CUDA runtime
# --------------------------------------------------------------------------------------------


class RecordingRuntime:
    """The few CUDA runtime calls host storage makes, with their semantics kept: registered
    ranges, a per-thread last error that a failed call sets, a current device.

    ``device_offset`` is added to host addresses to form device addresses (0: unified
    addressing). ``calls`` records ``(name, ..., current device)`` tuples.
    """

    def __init__(self, *, current: int = 0, device_offset: int = 0) -> None:
        self.current = current
        self.device_offset = device_offset
        self.calls: list[tuple[Any, ...]] = []
        self.registered: dict[int, tuple[int, int]] = {}  # ptr -> (nbytes, device)
        self.last_error = 0
        self.register_error = 0
        self.unregister_error = 0
        self.attributes_error = 0
        self.attributes_override: PointerAttributes | None = None
        self.synchronize_raises: Exception | None = None

    def _fail(self, code: int) -> int:
        self.last_error = code
        return code

    def current_device(self) -> int:
        return self.current

    @contextlib.contextmanager
    def device_guard(self, index: int) -> Iterator[None]:
        previous, self.current = self.current, index
        self.calls.append(("guard", index))
        try:
            yield
        finally:
            self.current = previous
            self.calls.append(("unguard", previous))

    def host_register(self, ptr: int, nbytes: int, flags: int) -> int:
        self.calls.append(("register", ptr, nbytes, flags, self.current))
        if self.register_error:
            return self._fail(self.register_error)
        if any(p < ptr + nbytes and ptr < p + n for p, (n, _) in self.registered.items()):
            return self._fail(712)  # cudaErrorHostMemoryAlreadyRegistered
        self.registered[ptr] = (nbytes, self.current)
        return 0

    def host_unregister(self, ptr: int) -> int:
        self.calls.append(("unregister", ptr, self.current))
        if self.unregister_error:
            return self._fail(self.unregister_error)
        if self.registered.pop(ptr, None) is None:
            return self._fail(713)  # cudaErrorHostMemoryNotRegistered
        return 0

    def get_last_error(self) -> int:
        self.calls.append(("get_last_error",))
        error, self.last_error = self.last_error, 0
        return error

    def error_string(self, code: int) -> str:
        return f"fake error {code}"

    def pointer_attributes(self, ptr: int) -> tuple[int, PointerAttributes]:
        self.calls.append(("attributes", ptr, self.current))
        if self.attributes_error:
            return self._fail(self.attributes_error), PointerAttributes(0, 0, 0, 0)
        if self.attributes_override is not None:
            return 0, self.attributes_override
        for start, (n, device) in self.registered.items():
            if start <= ptr < start + n:
                return 0, PointerAttributes(MEMORY_HOST, device, ptr + self.device_offset, ptr)
        return 0, PointerAttributes(MEMORY_UNREGISTERED, -2, 0, 0)

    def synchronize(self, index: int) -> None:
        self.calls.append(("synchronize", index))
        if self.synchronize_raises is not None:
            raise self.synchronize_raises

    def names(self) -> list[str]:
        return [call[0] for call in self.calls]

    def of(self, name: str) -> list[tuple[Any, ...]]:
        return [call for call in self.calls if call[0] == name]


class _HostArray:
    """Host memory at ``ptr`` through ``__array_interface__``, keeping ``owner`` alive."""

    def __init__(self, owner: Any, ptr: int, nbytes: int) -> None:
        self.owner = owner
        self.__array_interface__ = {
            "shape": (nbytes,), "typestr": "|u1", "data": (ptr, False), "version": 3,
        }  # fmt: skip


@pytest.fixture
def fake_cuda(monkeypatch) -> Iterator[RecordingRuntime]:
    """A recording runtime, and device tensors stood in by CPU tensors over the same host
    memory which, like ``torch.as_tensor`` on ``__cuda_array_interface__``, keep the
    interface object alive for as long as their storage lives."""
    np = pytest.importorskip("numpy")
    runtime = RecordingRuntime()

    def device_tensor(owner: Any, device: torch.device) -> torch.Tensor:
        interface = owner.__cuda_array_interface__
        address = interface["data"][0]
        runtime.calls.append(("as_tensor", address, interface["shape"], device))
        host = _HostArray(owner, address - runtime.device_offset, interface["shape"][0])
        return torch.from_numpy(np.asarray(host))

    monkeypatch.setattr(host_module, "_device_tensor", device_tensor)
    previous = cudart.set_runtime(runtime)
    try:
        yield runtime
    finally:
        cudart.set_runtime(previous)


# One dtype: one buffer, one registration (several dtypes: one each, see below).
ONE_DTYPE = [
    ((3, 5), (5, 1), torch.float32),
    ((7,), (1,), torch.float32),
    ((2, 3), (1, 2), torch.float32),  # transposed strides
    ((11,), (3,), torch.float32),  # strided: the span covers gaps
]


def pinned(layouts=ONE_DTYPE, device: str = "cuda:1") -> HostStorage:
    return HostStorage(layouts, pin_for=torch.device(device))


def test_registration_is_made_under_a_guard_of_the_compute_device(fake_cuda):
    storage = pinned(device="cuda:1")
    start = storage.tensors[0].data_ptr()
    assert fake_cuda.names() == ["guard", "register", "unguard"]
    assert fake_cuda.of("register") == [("register", start, storage.nbytes, 0x3, 1)]
    assert fake_cuda.current == 0  # the current device is unchanged
    assert start % ALIGNMENT == 0
    assert storage.pinned_bytes == storage.nbytes
    storage.free()


def test_a_device_without_index_registers_for_the_current_device(fake_cuda):
    fake_cuda.current = 2
    storage = pinned(device="cuda")
    assert fake_cuda.of("register")[0][-1] == 2
    storage.free()
    assert fake_cuda.of("synchronize") == [("synchronize", 2)]


def test_a_cpu_storage_never_touches_the_cuda_runtime(fake_cuda):
    storage = HostStorage(ODD_LAYOUTS)
    storage.free()
    HostStorage(ODD_LAYOUTS, pin_for=torch.device("cpu")).free()
    assert fake_cuda.calls == []


def test_a_failed_registration_clears_the_last_error_and_names_the_failure(fake_cuda):
    fake_cuda.register_error = 2
    with pytest.raises(RuntimeError, match=r"cudaHostRegister failed with 'fake error 2'"):
        pinned()
    assert fake_cuda.names() == ["guard", "register", "get_last_error", "unguard"]
    assert fake_cuda.last_error == 0
    assert fake_cuda.of("unregister") == []


def test_registering_an_already_registered_range_fails_cleanly(fake_cuda):
    storage = pinned()
    start = storage.tensors[0].data_ptr()
    (part,) = storage._blocks  # one dtype: one buffer
    block = part.block
    with pytest.raises(RuntimeError, match="fake error 712"):
        block.register(torch.device("cuda:1"))
    assert fake_cuda.last_error == 0
    del block, part
    storage.free()
    assert fake_cuda.of("unregister") == [("unregister", start, 1)]


def test_free_without_views_synchronizes_then_unregisters_at_once(fake_cuda, no_gc):
    storage = pinned()
    start = storage.tensors[0].data_ptr()
    memory = weakref.ref(storage.tensors[0].untyped_storage())
    fake_cuda.calls.clear()
    storage.free()
    assert storage.pinned_bytes == 0
    assert fake_cuda.calls == [
        ("synchronize", 1), ("guard", 1), ("unregister", start, 1), ("unguard", 0),
    ]  # fmt: skip
    assert fake_cuda.registered == {}
    assert memory() is None  # released right after unregistering, without the collector


def test_a_dropped_pinned_storage_is_unregistered(fake_cuda, no_gc):
    storage = pinned()
    del storage
    assert len(fake_cuda.of("unregister")) == 1
    assert fake_cuda.registered == {}


def test_views_are_checked_and_made_at_the_reported_device_address(fake_cuda):
    fake_cuda.device_offset = 1 << 40  # not unified: the device address differs
    storage = pinned(device="cuda:1")
    start, end = storage.tensors[0].data_ptr(), storage.tensors[0].data_ptr() + storage.nbytes
    fake_cuda.calls.clear()
    views = storage.device_views(torch.device("cuda:1"))
    assert fake_cuda.calls[:4] == [
        ("guard", 1), ("attributes", start, 1), ("attributes", end - 1, 1), ("unguard", 0),
    ]  # fmt: skip
    assert fake_cuda.of("as_tensor") == [
        ("as_tensor", start + (1 << 40), (storage.nbytes,), torch.device("cuda:1"))
    ]
    for view, t in zip(views, storage.tensors, strict=True):
        assert (view.shape, view.stride(), view.dtype) == (t.shape, t.stride(), t.dtype)
    del views
    storage.free()


def test_views_read_and_write_the_host_memory(fake_cuda):
    storage = pinned()
    fill_distinct(storage.tensors)
    views = storage.device_views(torch.device("cuda:1"))
    for i, view in enumerate(views):
        assert torch.all(view == i + 1)
    views[0].fill_(-1)
    assert torch.all(storage.tensors[0] == -1)
    del views
    storage.free()


def test_a_saved_device_view_loads_back(fake_cuda):
    storage = pinned(layouts=[((3,), (1,), torch.float32), ((7,), (1,), torch.int8)])
    fill_distinct(storage.tensors)
    assert_each_saves_and_loads_back(storage.device_views(torch.device("cuda:1")))
    storage.free()


def test_views_keep_the_registration_until_the_last_one_goes(fake_cuda, no_gc):
    storage = pinned(device="cuda:1")
    start = storage.tensors[0].data_ptr()
    fill_distinct(storage.tensors)
    views = storage.device_views(torch.device("cuda:1"))
    kept = views[-1]  # e.g. a state_dict() tensor taken while offloaded
    memory = weakref.ref(storage.tensors[0].untyped_storage())
    expected = kept.clone()
    del views
    fake_cuda.calls.clear()
    storage.free()
    assert storage.pinned_bytes == 0
    assert storage.tensors == []
    assert fake_cuda.calls == []  # still reachable: nothing synchronized or unregistered
    assert fake_cuda.registered
    assert memory() is not None
    assert torch.equal(kept, expected)  # and it still reads the right bytes
    del kept
    assert fake_cuda.calls == [
        ("synchronize", 1), ("guard", 1), ("unregister", start, 1), ("unguard", 0),
    ]  # fmt: skip
    assert fake_cuda.registered == {}
    assert memory() is None


def test_every_device_views_were_made_for_is_synchronized(fake_cuda, no_gc):
    storage = pinned(device="cuda:1")
    views_0 = storage.device_views(torch.device("cuda:0"))
    views_3 = storage.device_views(torch.device("cuda:3"))
    assert [c for c in fake_cuda.calls if c[0] == "attributes"][-1][-1] == 3
    storage.free()
    del views_0
    assert fake_cuda.of("unregister") == []
    fake_cuda.calls.clear()
    del views_3
    names = fake_cuda.names()
    assert names.index("unregister") > max(i for i, n in enumerate(names) if n == "synchronize")
    assert sorted(fake_cuda.of("synchronize")) == [
        ("synchronize", 0), ("synchronize", 1), ("synchronize", 3),
    ]  # fmt: skip
    assert len(fake_cuda.of("unregister")) == 1


def test_a_failed_unregistration_is_reported_and_its_error_cleared(fake_cuda, no_gc):
    storage = pinned()
    memory = weakref.ref(storage.tensors[0].untyped_storage())
    fake_cuda.unregister_error = 713
    with pytest.warns(RuntimeWarning, match=r"cudaHostUnregister failed with 'fake error 713'"):
        storage.free()
    assert fake_cuda.names()[-3:] == ["unregister", "get_last_error", "unguard"]
    assert fake_cuda.last_error == 0
    assert memory() is None


def test_a_failed_synchronize_is_reported_and_unregistration_still_happens(fake_cuda, no_gc):
    storage = pinned()
    fake_cuda.synchronize_raises = RuntimeError("device lost")
    with pytest.warns(RuntimeWarning, match="synchronizing cuda:1 failed.*device lost"):
        storage.free()
    assert len(fake_cuda.of("unregister")) == 1
    assert fake_cuda.registered == {}


def test_views_of_unregistered_memory_are_refused(fake_cuda):
    storage = pinned()
    fake_cuda.registered.clear()  # unregistered behind the storage's back
    with pytest.raises(RuntimeError, match="not registered with the CUDA runtime"):
        storage.device_views(torch.device("cuda:1"))
    assert fake_cuda.of("as_tensor") == []
    with pytest.warns(RuntimeWarning, match="fake error 713"):
        storage.free()


def test_views_of_memory_not_mapped_for_the_device_are_refused(fake_cuda):
    storage = pinned()
    fake_cuda.attributes_override = PointerAttributes(MEMORY_HOST, 1, 0, 1234)
    with pytest.raises(RuntimeError, match="not mapped for cuda:1"):
        storage.device_views(torch.device("cuda:1"))
    storage.free()


def test_views_of_memory_not_mapped_as_one_range_are_refused(fake_cuda):
    storage = pinned()
    fake_cuda.attributes_override = PointerAttributes(MEMORY_HOST, 1, 4096, 4096)
    with pytest.raises(RuntimeError, match="not mapped as one range"):
        storage.device_views(torch.device("cuda:1"))
    storage.free()


def test_a_failed_pointer_query_clears_the_last_error_and_names_it(fake_cuda):
    storage = pinned()
    fake_cuda.attributes_error = 1
    with pytest.raises(RuntimeError, match=r"cudaPointerGetAttributes failed .*'fake error 1'"):
        storage.device_views(torch.device("cuda:1"))
    assert fake_cuda.last_error == 0
    assert fake_cuda.names()[-3:] == ["attributes", "get_last_error", "unguard"]
    storage.free()


def test_no_views_without_a_registration(fake_cuda):
    with pytest.raises(RuntimeError, match="registered for CUDA"):
        HostStorage(ODD_LAYOUTS).device_views(torch.device("cuda:0"))
    storage = pinned()
    storage.free()
    with pytest.raises(RuntimeError, match="registered for CUDA"):
        storage.device_views(torch.device("cuda:1"))
    storage = pinned()
    with pytest.raises(RuntimeError, match="need a CUDA device"):
        storage.device_views(torch.device("cpu"))
    storage.free()


# --------------------------------------------------------------------------------------------
# The runtime binding: lazy, and nothing on a machine without CUDA
# --------------------------------------------------------------------------------------------


def test_the_cudart_module_examples_run():
    result = doctest.testmod(cudart, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.attempted > 0
    assert result.failed == 0


def test_the_loaded_runtime_is_found_in_the_process_maps():
    maps = "\n".join([
        "55d0-55e0 r--p 0 08:01 7 /usr/bin/python3.11",
        "7f00-7f10 r-xp 0 08:01 1 /env/nvidia/cu13/lib/libcudart.so.13",
        "7f10-7f20 r--p 0 08:01 1 /env/nvidia/cu13/lib/libcudart.so.13",
        "7f30-7f40 r-xp 0 08:01 4 /env/torch/lib/libcudart-9335f6a2.so.12",
        "7f50-7f60 r-xp 0 08:01 5 /gone/libcudart.so.12 (deleted)",
        "7f70-7f80 rw-p 0 00:00 0 ",
        "7f90-7fa0 r-xp 0 08:01 6 /env/lib/libcudart_static_helper.so",
    ])  # fmt: skip
    assert cudart.cudart_candidates(maps, cuda_version="13.0") == [
        "/env/nvidia/cu13/lib/libcudart.so.13",
        "/env/torch/lib/libcudart-9335f6a2.so.12",
    ]
    assert cudart.cudart_candidates(maps, cuda_version="12.8") == [
        "/env/torch/lib/libcudart-9335f6a2.so.12",
        "/env/nvidia/cu13/lib/libcudart.so.13",
    ]
    assert cudart.cudart_candidates("", cuda_version=None) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_without_cuda_the_runtime_is_refused_and_nothing_is_kept():
    previous = cudart.set_runtime(None)
    try:
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            cudart.get_runtime()
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            HostStorage(ODD_LAYOUTS, pin_for=torch.device("cuda"))
        assert cudart.set_runtime(None) is None
    finally:
        cudart.set_runtime(previous)


# --------------------------------------------------------------------------------------------
# On a real CUDA device
# --------------------------------------------------------------------------------------------


def real_runtime() -> cudart.CudaRuntime:
    runtime = cudart.get_runtime()
    assert isinstance(runtime, cudart.LoadedCudart)
    return runtime


@pytest.mark.cuda
def test_cuda_the_runtime_torch_loaded_is_bound():
    runtime = real_runtime()
    assert isinstance(runtime, cudart.LoadedCudart)
    assert runtime.library is not None, "libcudart not found among the loaded libraries"
    device_memory = torch.empty(1024, device="cuda")
    err, attributes = runtime.pointer_attributes(device_memory.data_ptr())
    assert err == 0
    assert attributes.type == cudart.MEMORY_DEVICE
    assert attributes.device == device_memory.device.index
    # A failed call sets the last error of this thread in this very runtime; reading clears it.
    host = torch.empty(1024, dtype=torch.uint8)
    err = runtime.host_unregister(host.data_ptr())  # never registered
    assert err != 0
    assert runtime.get_last_error() == err
    assert runtime.get_last_error() == 0
    assert runtime.error_string(err)


@pytest.mark.cuda
def test_cuda_a_failed_registration_raises_and_the_next_kernel_launch_works():
    real = real_runtime()

    class RegisteredFirst:
        """The real runtime, except that the range is registered once already, so the
        storage's own cudaHostRegister genuinely fails (already registered)."""

        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def host_register(self, ptr: int, nbytes: int, flags: int) -> int:
            assert real.host_register(ptr, nbytes, flags) == 0
            err = real.host_register(ptr, nbytes, flags)  # fails; sets the last error
            assert real.host_unregister(ptr) == 0  # undo ours; the last error stays set
            return err

    previous = cudart.set_runtime(RegisteredFirst())  # type: ignore[arg-type]
    try:
        with pytest.raises(RuntimeError, match="cudaHostRegister failed"):
            HostStorage(ODD_LAYOUTS, pin_for=torch.device("cuda"))
    finally:
        cudart.set_runtime(previous)
    assert real.get_last_error() == 0
    result = torch.ones(1, device="cuda") + 1  # the launch check reads the last error
    torch.cuda.synchronize()
    assert result.item() == 2


@pytest.mark.cuda
def test_cuda_pinned_tensors_are_aligned_page_locked_and_viewed_in_place():
    storage = HostStorage(ODD_LAYOUTS, pin_for=torch.device("cuda"))
    assert storage.pinned_bytes == storage.nbytes
    for i, t in enumerate(storage.tensors):
        t.fill_(i + 1)
        assert t.data_ptr() % ALIGNMENT == 0
        assert t.is_pinned() or t.numel() == 0
    views = storage.device_views(torch.device("cuda"))
    for i, (view, t) in enumerate(zip(views, storage.tensors, strict=True)):
        assert view.is_cuda
        assert view.data_ptr() == t.data_ptr()  # unified addressing
        assert torch.equal(view.cpu(), t)
        if view.numel():
            assert torch.all(view * 1 == i + 1).item()  # a kernel reads host memory
    assert_each_saves_and_loads_back(views)  # e.g. a checkpoint written while offloaded
    del view, views
    storage.free()
    assert (torch.ones(1, device="cuda") + 1).item() == 2


@pytest.mark.cuda
def test_cuda_views_outliving_free_read_the_right_bytes():
    runtime = real_runtime()
    storage = HostStorage(ODD_LAYOUTS, pin_for=torch.device("cuda"))
    for i, t in enumerate(storage.tensors):
        t.copy_(torch.arange(t.numel()).reshape(t.shape).to(t.dtype) + i)
    expected = [t.clone() for t in storage.tensors]
    views = storage.device_views(torch.device("cuda"))
    start = storage.tensors[0].data_ptr()
    storage.free()
    assert storage.pinned_bytes == 0
    assert runtime.pointer_attributes(start)[1].type == MEMORY_HOST  # still registered
    for view, want in zip(views, expected, strict=True):
        assert torch.equal((view * 1).cpu(), want)  # read by a kernel
    torch.cuda.synchronize()
    del view
    del views
    assert runtime.pointer_attributes(start)[1].type == MEMORY_UNREGISTERED
    assert (torch.ones(1, device="cuda") + 1).item() == 2


@pytest.mark.cuda
def test_cuda_views_of_unregistered_memory_are_refused():
    runtime = real_runtime()
    storage = HostStorage(ODD_LAYOUTS, pin_for=torch.device("cuda"))
    start = storage.tensors[0].data_ptr()
    assert int(torch.cuda.cudart().cudaHostUnregister(start)) == 0  # behind the storage's back
    with pytest.raises(RuntimeError, match="not registered with the CUDA runtime"):
        storage.device_views(torch.device("cuda"))
    with pytest.warns(RuntimeWarning, match="cudaHostUnregister failed"):
        storage.free()
    assert runtime.get_last_error() == 0
    assert (torch.ones(1, device="cuda") + 1).item() == 2


@pytest.mark.cuda
def test_cuda_registration_for_another_device_keeps_the_current_device():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    runtime = real_runtime()
    torch.cuda.set_device(0)
    storage = HostStorage(ODD_LAYOUTS, pin_for=torch.device("cuda:1"))
    assert torch.cuda.current_device() == 0
    _, attributes = runtime.pointer_attributes(storage.tensors[0].data_ptr())
    assert attributes.type == MEMORY_HOST
    assert attributes.device == 1  # registered while device 1 was current
    storage.tensors[0].fill_(7)
    views = storage.device_views(torch.device("cuda:1"))
    assert views[0].device == torch.device("cuda:1")
    assert torch.all(views[0] * 1 == 7).item()
    assert torch.cuda.current_device() == 0
    del views
    storage.free()
    assert torch.cuda.current_device() == 0


def cached_pinned_bytes() -> int:
    stats_of = getattr(torch.cuda.memory, "host_memory_stats", None)
    if stats_of is None:
        pytest.skip("this PyTorch has no torch.cuda.memory.host_memory_stats")
    stats = stats_of()
    for key in ("allocated_bytes.current", "allocated_bytes.all.current"):
        if key in stats:
            return int(stats[key])
    pytest.skip(f"host_memory_stats has no allocated_bytes figure: {sorted(stats)}")


@pytest.mark.cuda
def test_cuda_copy_bandwidth_leaves_no_pinned_memory_cached():
    torch.cuda.init()
    empty_host_cache = getattr(torch._C, "_host_emptyCache", None)
    if empty_host_cache is not None:  # then a new pin_memory block must show in the figure
        empty_host_cache()
        probe_before = cached_pinned_bytes()
        probe = torch.empty(1 << 20, dtype=torch.uint8, pin_memory=True)
        assert cached_pinned_bytes() > probe_before
        del probe
    before = cached_pinned_bytes()
    result = copy_bandwidth(torch.device("cuda"), sizes=(8 << 20, 24 << 20), repeats=2)
    assert result.kind == "pinned host-to-device"
    assert 0.1 < result.gb_per_s < 2000
    assert cached_pinned_bytes() == before


@pytest.mark.cuda
def test_cuda_copy_bandwidth_times_the_copies_of_the_device_asked_for():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    torch.cuda.set_device(0)
    result = copy_bandwidth(torch.device("cuda:1"), sizes=(64 << 20,), repeats=3)
    assert torch.cuda.current_device() == 0
    # Events on device 0's idle stream would time nothing: terabytes per second.
    assert 0.1 < result.gb_per_s < 2000


def test_each_dtype_gets_its_own_registered_buffer(fake_cuda):
    storage = pinned(ODD_LAYOUTS)
    dtypes = {dtype for shape, _, dtype in ODD_LAYOUTS if 0 not in shape}
    registered = fake_cuda.of("register")
    assert len(registered) == len(dtypes)
    assert sum(size for _, _, size, _, _ in registered) == storage.nbytes == storage.pinned_bytes
    storage.free()
    assert len(fake_cuda.of("unregister")) == len(dtypes)


def test_a_state_dict_of_several_dtypes_in_host_storage_can_be_saved(tmp_path):
    # torch.save refuses tensors of different dtypes that view one storage.
    layouts = [(shape, stride, dtype) for shape, stride, dtype in ODD_LAYOUTS]
    storage = HostStorage(layouts)
    for i, tensor in enumerate(storage.tensors):
        tensor.copy_(torch.full(tensor.shape, i + 1).to(tensor.dtype))
    state = {f"t{i}": t for i, t in enumerate(storage.tensors)}
    torch.save(state, tmp_path / "state.pt")
    loaded = torch.load(tmp_path / "state.pt")
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


# --------------------------------------------------------------------------------------------
# The host-memory check of apply_offload
# --------------------------------------------------------------------------------------------

PREFETCH = {"prefetch": {"offload_group_size": 2}}
UVA = {"uva": {"cpu_offload_gb": 1.0}}


def small_decoder(*, trainable: bool) -> DecoderLM:
    torch.manual_seed(0)
    model = DecoderLM(num_layers=4, hidden_size=32, num_heads=4, intermediate_size=64)
    return model.requires_grad_(trainable)


def counted(model: DecoderLM, config: dict) -> tuple[int, int]:
    """What the check counts for one process: offloaded weights, gradients of trainable ones."""
    params = dict(model.named_parameters())
    planned = plan_offload(model, config).params
    return (
        sum(p.nbytes for p in planned),
        sum(p.nbytes for p in planned if params[p.name].requires_grad),
    )


class Node:
    """``MemAvailable`` of a node whose processes offload one after another: it drops by the
    host memory each offload applied so far holds."""

    def __init__(self, free: int) -> None:
        self.free = free
        self.handles: list[OffloadHandle] = []

    def __call__(self) -> int:
        return self.free - sum(h.stats.host_bytes for h in self.handles)


@pytest.fixture
def node(monkeypatch: pytest.MonkeyPatch) -> Node:
    """Sets the node's free memory: ``node.free = ...``; offloads appended to ``node.handles``
    take theirs from it (and are removed at the end)."""
    fake = Node(0)
    monkeypatch.setattr(offload, "available_host_bytes", fake)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    yield fake
    for handle in fake.handles:
        handle.remove()


def test_ranks_offloading_one_after_another_check_against_memory_before_any_of_them(node):
    ranks = 4
    models = [small_decoder(trainable=False) for _ in range(ranks)]
    weights, _ = counted(models[0], PREFETCH)
    node.free = ranks * weights  # exactly what the four replicas need
    before = offload.available_host_bytes()  # every rank reads it, then a barrier
    for model in models:
        node.handles.append(
            apply_offload(model, PREFETCH, processes_per_node=ranks, host_bytes_available=before)
        )
    assert all(h.active for h in node.handles)
    assert offload.available_host_bytes() <= 0  # the node's memory really is taken now


def test_reading_memory_as_each_rank_applies_counts_earlier_ranks_twice(node):
    # Why the figure from before any rank offloaded is needed: read at apply time, the second
    # rank sees memory the first one took and still counts that rank's replica.
    models = [small_decoder(trainable=False) for _ in range(2)]
    weights, _ = counted(models[0], PREFETCH)
    node.free = 2 * weights
    node.handles.append(apply_offload(models[0], PREFETCH, processes_per_node=2))
    with pytest.raises(OffloadError, match=r"but only [\d,]+ are available;"):
        apply_offload(models[1], PREFETCH, processes_per_node=2)


def test_too_little_memory_before_offloading_is_refused_with_that_figure(node):
    model = small_decoder(trainable=False)
    weights, _ = counted(model, PREFETCH)
    node.free = 10 * weights  # what the node has now is not what is checked
    short = 2 * weights - 1
    with pytest.raises(OffloadError) as refused:
        apply_offload(model, PREFETCH, processes_per_node=2, host_bytes_available=short)
    message = str(refused.value)
    assert f"needs {2 * weights:,} bytes" in message
    assert f"{weights:,} bytes of weights in each of the 2 processes on this node" in message
    assert f"but only {short:,} were available before offloading began;" in message
    assert "Training needs more" not in message  # nothing offloaded trains
    with pytest.raises(ValueError, match="host_bytes_available must be >= 0 or None, got -1"):
        apply_offload(model, PREFETCH, host_bytes_available=-1)
    assert not any(m._forward_pre_hooks for m in model.modules())  # nothing was applied


@pytest.mark.parametrize(
    ("config", "where"),
    [pytest.param(PREFETCH, "with prefetch,", id="prefetch"),
     pytest.param(UVA, "with UVA in copy mode,", id="uva")],
)  # fmt: skip
def test_a_refusal_with_trainable_weights_names_what_training_adds_uncounted(node, config, where):
    model = small_decoder(trainable=True)
    weights, grads = counted(model, config)
    assert grads == weights > 0
    with pytest.raises(OffloadError) as refused:
        apply_offload(model, config, host_bytes_available=weights + grads - 1)
    message = str(refused.value)
    assert f"{weights:,} bytes of weights and {grads:,} of gradients of the trainable" in message
    assert "this check cannot know in advance" in message
    assert where in message
    assert f"gradient accumulation stages each new gradient in a second buffer (as large as " \
        f"the gradients: {grads:,} bytes per process)" in message  # fmt: skip
    assert f"AdamW's two moments: {2 * grads:,} bytes per process" in message


def test_gradient_accumulation_takes_a_second_gradients_worth_of_host_memory(node):
    # What the refusal says training adds and the check does not count (prefetch).
    model = small_decoder(trainable=True)
    node.free = 1 << 40
    handle = apply_offload(model, PREFETCH)
    node.handles.append(handle)
    ids = torch.randint(0, 1024, (2, 8))
    held = [handle.stats.host_bytes]
    for _ in range(3):  # three micro-batches, no zero_grad between them
        model(ids).sum().backward()
        held.append(handle.stats.host_bytes)
    weights, grads, staging = held[0], held[1] - held[0], held[2] - held[1]
    assert weights >= counted(model, PREFETCH)[0]
    assert grads >= counted(model, PREFETCH)[1] > 0
    assert staging == grads  # the staging buffer has the gradients' layouts
    assert held[3] == held[2]  # allocated once


TRIM_SCRIPT = """
import torch
from torch import nn
from hydra_offload import apply_offload
from hydra_offload.runtime.host import proc_bytes

def pss():
    return proc_bytes("/proc/self/smaps_rollup", "Pss")

torch.manual_seed(0)
# A large block freed raises glibc's mmap threshold above it (as a process's earlier work
# does): the 32 weights of 512 KiB below then come from its heap, which keeps them when freed.
scratch = torch.ones(4 << 20, dtype=torch.uint8)
del scratch
model = nn.Sequential(*(nn.Linear(256, 512, bias=False) for _ in range(32)))
weights = sum(p.numel() * p.element_size() for p in model.parameters())
before = pss()
handle = apply_offload(model, {"uva": {"cpu_offload_gb": 1.0}})
print((pss() - before) / weights)
"""


@pytest.mark.skipif(
    not Path("/proc/self/smaps_rollup").exists(), reason="needs Linux's /proc smaps_rollup"
)
def test_offloading_weights_that_start_in_host_memory_does_not_keep_a_second_copy():
    # The offload copies the weights into host storage and frees the originals; the process
    # then holds one copy, not two: what glibc kept of the freed blocks goes back to the
    # system (with its default settings, no MALLOC_* variable).
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    result = subprocess.run(
        [sys.executable, "-c", TRIM_SCRIPT], env=env, capture_output=True, text=True,
        timeout=120, check=True,
    )  # fmt: skip
    growth = float(result.stdout.strip())
    assert growth < 0.5, f"the process grew by {growth:.2f} x the offloaded weights"
