"""The few CUDA runtime calls host memory needs, made on the runtime PyTorch itself loaded.

``torch.cuda.cudart()`` binds ``cudaHostRegister``, ``cudaHostUnregister`` and
``cudaGetErrorString``, but neither ``cudaGetLastError`` nor ``cudaPointerGetAttributes``.
Those two are called here through :mod:`ctypes`, on the very ``libcudart`` that is already
mapped into this process (found in ``/proc/self/maps``, opened with ``RTLD_NOLOAD`` so that no
second copy is ever loaded). It has to be that copy: the runtime's last error is kept per
library instance and per thread, so clearing it through another copy would clear nothing.

Nothing is looked up on import. :func:`get_runtime` builds the runtime on first use, and only
:class:`~hydra_offload.runtime.host.HostStorage` with a CUDA device calls it, so a CPU-only
machine never touches CUDA. :func:`set_runtime` installs another implementation of
:class:`CudaRuntime` (tests record the calls made on it).

Example:
    >>> maps = (
    ...     "7f00-7f10 r-xp 0 08:01 1 /env/nvidia/cuda_runtime/lib/libcudart.so.12\\n"
    ...     "7f20-7f30 r-xp 0 08:01 2 /opt/other/libcudart.so.11.0\\n"
    ...     "7f40-7f50 r-xp 0 08:01 3 /env/torch/lib/libtorch_cuda.so\\n"
    ... )
    >>> cudart_candidates(maps, cuda_version="11.8")
    ['/opt/other/libcudart.so.11.0', '/env/nvidia/cuda_runtime/lib/libcudart.so.12']
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import threading
import warnings
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import torch

__all__ = [
    "MEMORY_DEVICE",
    "MEMORY_HOST",
    "MEMORY_MANAGED",
    "MEMORY_UNREGISTERED",
    "CudaRuntime",
    "LoadedCudart",
    "PointerAttributes",
    "cudart_candidates",
    "get_runtime",
    "set_runtime",
]

MEMORY_UNREGISTERED = 0
"""``cudaMemoryTypeUnregistered``: memory the CUDA runtime knows nothing about."""
MEMORY_HOST = 1
"""``cudaMemoryTypeHost``: page-locked host memory (allocated or registered)."""
MEMORY_DEVICE = 2
"""``cudaMemoryTypeDevice``: device memory."""
MEMORY_MANAGED = 3
"""``cudaMemoryTypeManaged``: managed (unified) memory."""

_LIBRARY_NAME = re.compile(r"libcudart(?:-[0-9a-f]+)?\.so(?:\.[0-9]+)*")


@dataclass(frozen=True)
class PointerAttributes:
    """What ``cudaPointerGetAttributes`` reports about one address.

    Attributes:
        type: one of the ``MEMORY_*`` constants.
        device: for host memory, the device that was current when it was registered.
        device_pointer: the address kernels on the current device use for it (0: none).
        host_pointer: the address the host uses for it (0: none).
    """

    type: int
    device: int
    device_pointer: int
    host_pointer: int


class CudaRuntime(Protocol):
    """The CUDA runtime calls host storage makes; error codes are returned as ints.

    A failed call leaves the runtime's last error set: the caller clears it with
    :meth:`get_last_error`.
    """

    def current_device(self) -> int:
        """Index of the calling thread's current CUDA device."""
        ...

    def device_guard(self, index: int) -> AbstractContextManager[Any]:
        """Make ``index`` the current device inside the ``with`` block, then restore."""
        ...

    def host_register(self, ptr: int, nbytes: int, flags: int) -> int:
        """``cudaHostRegister``."""
        ...

    def host_unregister(self, ptr: int) -> int:
        """``cudaHostUnregister``."""
        ...

    def get_last_error(self) -> int:
        """``cudaGetLastError``: the last error of this thread, which is reset to success."""
        ...

    def error_string(self, code: int) -> str:
        """``cudaGetErrorString``."""
        ...

    def pointer_attributes(self, ptr: int) -> tuple[int, PointerAttributes]:
        """``cudaPointerGetAttributes`` on the current device: (error code, attributes)."""
        ...

    def synchronize(self, index: int) -> None:
        """Wait until device ``index`` has finished all queued work."""
        ...


class _RawAttributes(ctypes.Structure):
    # cudaPointerAttributes of CUDA 11 to 13: type, device, devicePointer, hostPointer, then
    # (CUDA 12.x+) reserved words. The tail is generous so a longer struct never overflows.
    _fields_ = [
        ("type", ctypes.c_int),
        ("device", ctypes.c_int),
        ("device_pointer", ctypes.c_void_p),
        ("host_pointer", ctypes.c_void_p),
        ("tail", ctypes.c_byte * 256),
    ]


class LoadedCudart:
    """:class:`CudaRuntime` on the CUDA runtime loaded in this process.

    Registration goes through PyTorch's own binding (``torch.cuda.cudart()``);
    ``cudaGetLastError``, ``cudaGetErrorString`` and ``cudaPointerGetAttributes`` through
    :mod:`ctypes` on the same loaded library. Where that library cannot be found (a build that
    links the runtime statically), the last error cannot be cleared and pointer attributes
    cannot be read: :meth:`pointer_attributes` then raises, so zero-copy views are refused.

    Raises:
        RuntimeError: CUDA is not available.
    """

    def __init__(self) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA is not available: host memory cannot be page-locked")
        torch.cuda.init()
        self._torch = torch.cuda.cudart()
        self._lib = _open_loaded_cudart()

    @property
    def library(self) -> str | None:
        """Path of the ``libcudart`` the ctypes calls go to (``"<process>"``: the symbols
        visible process-wide; None: not found)."""
        return None if self._lib is None else (self._lib._name or "<process>")

    def current_device(self) -> int:
        return torch.cuda.current_device()

    def device_guard(self, index: int) -> AbstractContextManager[Any]:
        return torch.cuda.device(index)

    def host_register(self, ptr: int, nbytes: int, flags: int) -> int:
        return int(self._torch.cudaHostRegister(ptr, nbytes, flags))

    def host_unregister(self, ptr: int) -> int:
        return int(self._torch.cudaHostUnregister(ptr))

    def get_last_error(self) -> int:
        if self._lib is None:
            warnings.warn(
                "the CUDA runtime's last error cannot be cleared (cudaGetLastError is not "
                "reachable: the runtime library PyTorch uses was not found among this "
                "process's loaded libraries); the next kernel launch may report it",
                RuntimeWarning,
                stacklevel=2,
            )
            return 0
        return int(self._lib.cudaGetLastError())

    def error_string(self, code: int) -> str:
        if self._lib is not None:
            text = self._lib.cudaGetErrorString(code)
            if text:
                return text.decode(errors="replace")
        return f"CUDA error {code}"

    def pointer_attributes(self, ptr: int) -> tuple[int, PointerAttributes]:
        if self._lib is None:
            raise RuntimeError(
                "cudaPointerGetAttributes is unavailable: the CUDA runtime library PyTorch "
                "uses was not found among this process's loaded libraries"
            )
        raw = _RawAttributes()
        err = int(self._lib.cudaPointerGetAttributes(ctypes.byref(raw), ctypes.c_void_p(ptr)))
        attributes = PointerAttributes(
            int(raw.type), int(raw.device), raw.device_pointer or 0, raw.host_pointer or 0
        )
        return err, attributes

    def synchronize(self, index: int) -> None:
        torch.cuda.synchronize(index)


def cudart_candidates(maps: str, *, cuda_version: str | None) -> list[str]:
    """Paths of the ``libcudart`` files mapped into a process, from its ``/proc/<pid>/maps``.

    Libraries whose major version is PyTorch's CUDA major version (``cuda_version``, as in
    ``torch.version.cuda``) come first; otherwise the order of the maps is kept.
    """
    paths: list[str] = []
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) < 6:
            continue
        path = fields[5].strip()
        if _LIBRARY_NAME.fullmatch(os.path.basename(path)) and path not in paths:
            paths.append(path)
    if cuda_version:
        major = f".so.{cuda_version.split('.')[0]}"
        paths.sort(key=lambda p: not (p.endswith(major) or f"{major}." in p))
    return paths


_SYMBOLS = ("cudaGetLastError", "cudaGetErrorString", "cudaPointerGetAttributes")


def _open_loaded_cudart() -> ctypes.CDLL | None:
    """The ``libcudart`` already loaded in this process, with its ctypes signatures set."""
    try:
        with open("/proc/self/maps") as maps_file:
            maps = maps_file.read()
    except OSError:
        maps = ""
    only_if_loaded = getattr(os, "RTLD_NOLOAD", 0) | getattr(os, "RTLD_LAZY", 0)
    libs: list[ctypes.CDLL] = []
    for path in cudart_candidates(maps, cuda_version=torch.version.cuda):
        try:
            libs.append(ctypes.CDLL(path, mode=only_if_loaded))
        except OSError:
            continue
    if not libs:
        # The symbols already visible process-wide (a runtime loaded RTLD_GLOBAL).
        with contextlib.suppress(OSError, TypeError):
            libs.append(ctypes.CDLL(None))
    for lib in libs:
        if all(hasattr(lib, symbol) for symbol in _SYMBOLS):
            lib.cudaGetLastError.restype = ctypes.c_int
            lib.cudaGetLastError.argtypes = []
            lib.cudaGetErrorString.restype = ctypes.c_char_p
            lib.cudaGetErrorString.argtypes = [ctypes.c_int]
            lib.cudaPointerGetAttributes.restype = ctypes.c_int
            lib.cudaPointerGetAttributes.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
            return lib
    return None


_runtime: CudaRuntime | None = None
_lock = threading.Lock()


def get_runtime() -> CudaRuntime:
    """The process's :class:`CudaRuntime`: the installed one, else :class:`LoadedCudart`
    (built on first use).

    Raises:
        RuntimeError: CUDA is not available.
    """
    global _runtime
    with _lock:
        if _runtime is None:
            _runtime = LoadedCudart()
        return _runtime


def set_runtime(runtime: CudaRuntime | None) -> CudaRuntime | None:
    """Install ``runtime`` for later :func:`get_runtime` calls (``None``: the real one, built
    on next use) and return the previous one.

    Memory already registered keeps the runtime it was registered with until it is released.
    """
    global _runtime
    with _lock:
        previous, _runtime = _runtime, runtime
        return previous
