"""A simulated accelerator, so that stream-ordering and host/device bugs fail on a CPU.

With the compute device = CPU, every copy completes before the next line runs and host and
device memory are the same thing: a missing wait, or a device tensor used where a host one
belongs, changes nothing and no test can see it. :class:`SimulatedDevice` makes both visible
while keeping the compute on the CPU (so outputs can still be compared bit for bit):

- **Copies on side streams really complete later.** Each side stream (the copy stream, the
  gradient stream) is a worker thread that runs its queue in order: copies after a small
  random delay, event records, waits for other streams' events. The compute stream is the
  calling thread: its work is done when the call returns, and waiting on an event blocks
  until the event has happened. A layer that computes without waiting for its weights reads
  the slot while the copy is still under way, and its output differs.
- **Every missing wait is an error, whatever the timing.** A dispatch mode sees every
  operator; with the copies, the events and the waits it keeps vector clocks, as the CUDA
  sanitizer does: an access to memory that another stream wrote, or a write to memory another
  stream reads, with no event wait (or host synchronization) ordering the two, raises
  :class:`SimulatedDeviceError` at once.
- **Released memory is not used.** Just before the offload gives memory up (host storage
  freed, the pool released), every stream's access to it must be known to the host, or a
  copy still in flight would touch memory a GPU may already have handed out again.
- **Host memory is not device memory.** Host storage made through the runtime
  (:meth:`SimulatedRuntime.host_storage`) is marked as host memory, and so is whatever is
  computed from host tensors alone; everything else is device memory. An operator mixing the
  two (other than a copy) raises, as PyTorch refuses CPU and CUDA tensors in one operator; a
  copy between them on a side stream must use registered (page-locked) host memory, or it
  would not be asynchronous on a GPU.

Zero-dimensional tensors are exempt from the mixing rule (PyTorch accepts CPU scalars in
device operators, and code moves scalars with ``.to(device)``, which the simulation cannot
see on a CPU-only machine), and so is ``torch.equal`` (tests compare host tensors with device
ones, which on a GPU they would move with ``.cpu()`` first).

Example:
    >>> import torch
    >>> from hydra_offload import apply_offload
    >>> from hydra_offload.models import DecoderLM
    >>> model = DecoderLM(num_layers=4).eval()
    >>> ids = torch.randint(0, 1024, (2, 16))
    >>> expected = model(ids)
    >>> with SimulatedDevice(), apply_offload(model, {"prefetch": {"offload_group_size": 2}}):
    ...     torch.equal(model(ids), expected)
    True
"""

from __future__ import annotations

import queue
import random
import threading
import time
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hydra_offload.runtime.device import _FACTORY, DeviceRuntime
from hydra_offload.runtime.host import HostStorage, Layout, storage_span
from hydra_offload.runtime.shared import NodeGroup

__all__ = ["SimulatedDevice", "SimulatedDeviceError", "SimulatedRuntime"]

HOST, DEVICE = "host", "device"
COMPUTE = 0
"""The id of the compute stream in the vector clocks (side streams count from 1)."""


class SimulatedDeviceError(AssertionError):
    """A stream-ordering or host/device bug the simulated device detected."""


_HAPPENED = threading.Event()
_HAPPENED.set()


class SimEvent:
    """An event of the simulated device: happened once its stream has reached its latest
    record. As with CUDA events, an event never recorded has happened, and a wait takes the
    latest record at the time it is issued (a later record does not change it)."""

    __slots__ = ("_device", "clock", "happened", "time")

    def __init__(self, device: SimulatedDevice) -> None:
        self._device = device
        self.clock: dict[int, int] = {}
        """What its stream had done (and learned of others) when it was recorded."""
        self.happened = _HAPPENED
        """Set once the stream has reached the latest record (a new object per record)."""
        self.time = 0.0

    def record(self, stream: Any = None) -> None:
        """Record on ``stream`` (default: the compute stream), as ``torch.Event.record``."""
        (stream if stream is not None else self._device.compute).record_event(self)

    def query(self) -> bool:
        if not self.happened.is_set():
            return False
        self._device._host_learns(self.clock)
        return True

    def synchronize(self) -> None:
        self.happened.wait()
        self._device._host_learns(self.clock)

    def elapsed_time(self, end: SimEvent) -> float:
        """Milliseconds from this event to ``end`` (both must have happened)."""
        if not (self.happened.is_set() and end.happened.is_set()):
            raise RuntimeError("elapsed_time() on an event that has not happened yet")
        return (end.time - self.time) * 1e3


class _ComputeStream:
    """The compute stream: the calling thread itself. Work issued on it is done when the
    call returns; waiting on an event blocks until it has happened."""

    id = COMPUTE

    def __init__(self, device: SimulatedDevice) -> None:
        self._device = device

    def record_event(self, event: SimEvent | None = None) -> SimEvent:
        event = event or SimEvent(self._device)
        with self._device._lock:
            event.clock = self._device._clock_of(COMPUTE)
        event.time = time.perf_counter()
        event.happened = _HAPPENED
        return event

    def wait_event(self, event: SimEvent) -> None:
        event.happened.wait()
        self._device._learns(COMPUTE, event.clock)

    def wait_stream(self, stream: Any) -> None:
        self.wait_event(stream.record_event())

    def synchronize(self) -> None:
        self._device._host_learns(self._device._clock_of(COMPUTE))


_STOP = object()


class _SideStream:
    """A side stream: a worker thread that runs its queue in order."""

    def __init__(self, device: SimulatedDevice, stream_id: int) -> None:
        self._device = device
        self.id = stream_id
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=_run_queue, args=(self._queue,), name=f"sim-stream-{stream_id}", daemon=True
        )
        self._thread.start()
        weakref.finalize(self, self._queue.put, _STOP)

    def record_event(self, event: SimEvent | None = None) -> SimEvent:
        event = event or SimEvent(self._device)
        with self._device._lock:
            event.clock = self._device._clock_of(self.id)
        event.happened = threading.Event()
        self._queue.put(("record", event, event.happened))
        return event

    def wait_event(self, event: SimEvent) -> None:
        self._device._learns(self.id, event.clock)
        self._queue.put(("wait", event.happened))

    def wait_stream(self, stream: Any) -> None:
        self.wait_event(stream.record_event())

    def synchronize(self) -> None:
        self.record_event().synchronize()

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        self._device._side_copy(self.id, dst, src)
        delay = self._device._delay()
        self._queue.put(("copy", dst, src, delay))

    def stop(self) -> None:
        self._queue.put(_STOP)


def _run_queue(work: queue.SimpleQueue[Any]) -> None:
    while True:
        item = work.get()
        if item is _STOP:
            return
        kind = item[0]
        if kind == "copy":
            _, dst, src, delay = item
            if delay:
                time.sleep(delay)
            with torch.no_grad():
                dst.copy_(src)
            item = dst = src = None  # the copy is done: hold nothing until the next one
        elif kind == "record":
            _, event, happened = item
            if event.happened is happened:  # not recorded again since
                event.time = time.perf_counter()
            happened.set()
        else:  # "wait"
            item[1].wait()


class SimulatedRuntime(DeviceRuntime):
    """The runtime the backends get for the simulated device (see :class:`SimulatedDevice`)."""

    def __init__(self, simulated: SimulatedDevice) -> None:
        super().__init__(simulated.device)
        self.simulated = simulated
        self.is_accelerator = True  # exercise every accelerator path
        self.is_cuda = False

    @property
    def pin_for(self) -> torch.device | None:
        return None

    def host_storage(
        self,
        layouts: Sequence[Layout],
        *,
        shared: Sequence[bool] | None = None,
        node: NodeGroup | None = None,
    ) -> HostStorage:
        storage = HostStorage(layouts, pin_for=None, shared=shared, node=node)
        views = [storage.view(i) for i in range(len(layouts))]
        self.simulated.mark_host([v for v in views if v is not None], pinned=True)
        return storage

    def publish(self, storage: HostStorage, problem: str | None = None) -> None:
        storage.publish(problem)
        self.simulated.mark_host(storage.tensors, pinned=True)

    def release(self, tensors: Sequence[torch.Tensor]) -> None:
        self.simulated.released(tensors)

    def hand_over(self, tensors: Sequence[torch.Tensor]) -> None:
        self.simulated.released(tensors)  # the same check: no stream may still access it

    def wait_work(self, stream: Any, work: Any) -> None:
        if work is not None:  # the host waits; what the stream does next comes after
            work.wait()

    def new_stream(self) -> Any:
        return self.simulated.new_stream()

    def current_stream(self) -> Any:
        return self.simulated.compute

    def copy(self, stream: Any, dst: torch.Tensor, src: torch.Tensor) -> None:
        if isinstance(stream, _SideStream):
            stream.copy(dst, src)
            return
        self.simulated._check_transfer(dst, src)
        with torch.no_grad():
            dst.copy_(src, non_blocking=True)

    def to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            host = tensor.detach().clone()
        self.simulated._host_learns(self.simulated._clock_of(COMPUTE))
        self.simulated.mark_host([host], pinned=False)
        return host

    def to_device(
        self, tensor: torch.Tensor, device: torch.device, *, copy: bool = False
    ) -> torch.Tensor:
        if not copy and self.simulated.kind(tensor) == DEVICE:
            return tensor
        with torch.no_grad():
            moved = tensor.detach().clone()
        self.simulated._host_learns(self.simulated._clock_of(COMPUTE))
        self.simulated.mark_device([moved])
        return moved

    def in_host_memory(self, tensor: torch.Tensor) -> bool:
        return self.simulated.kind(tensor) == HOST

    def timing_event(self) -> SimEvent:
        return SimEvent(self.simulated)

    def synchronize(self) -> None:
        self.simulated.synchronize()

    def memory_allocated(self) -> int | None:
        return None


class SimulatedDevice:
    """A simulated accelerator with the CPU as compute device (a context manager).

    Inside the ``with`` block, offloads applied with the CPU as compute device get a
    :class:`SimulatedRuntime`, and every operator is checked (see the module docstring).

    Args:
        max_delay_ms: each copy on a side stream starts after a random delay of up to this
            many milliseconds.
        min_delay_ms: ... and at least this many.
        seed: seeds the delays.
        check: keep the vector clocks and memory kinds, and raise on the first violation;
            ``False`` keeps only the asynchronous copies.
    """

    def __init__(
        self,
        *,
        max_delay_ms: float = 1.0,
        min_delay_ms: float = 0.0,
        seed: int = 0,
        check: bool = True,
    ) -> None:
        if not 0 <= min_delay_ms <= max_delay_ms:
            raise ValueError(
                f"need 0 <= min_delay_ms <= max_delay_ms, got {min_delay_ms} and {max_delay_ms}"
            )
        self.device = torch.device("cpu")
        self.max_delay_ms = max_delay_ms
        self.min_delay_ms = min_delay_ms
        self.check = check
        self.compute = _ComputeStream(self)
        self._random = random.Random(seed)
        self._lock = threading.RLock()
        self._streams: list[weakref.ref[_SideStream]] = []
        self._next_id = 1
        self._seq: dict[int, int] = {COMPUTE: 0}
        """Operations issued so far on each stream."""
        self._knows: dict[int, dict[int, int]] = {COMPUTE: {}}
        """Per stream: how far each other stream had got when it last synchronized with it."""
        self._host_knows: dict[int, int] = {}
        """How far each stream had got when the host last synchronized with it."""
        self._kind: dict[int, str] = {}
        self._pinned: set[int] = set()
        self._accesses: dict[int, list[list[Any]]] = {}
        """Per followed storage (host memory, and device memory a side stream touched):
        ``[start, end, stream, last_read, last_write]`` of each byte range accessed on a
        stream (host accesses are ordered by program order and not kept)."""
        self._born: dict[int, int] = {}
        """Per device storage: the compute operation that allocated (or computed) it."""
        self._followed: dict[int, int] = {}
        """Storages with records, each with a generation (see :meth:`_follow`)."""
        self._generation = 0
        self._mode: _Checker | None = None
        self._token: Any = None
        self.checked_ops = 0
        """Operators the checker has seen (to show it ran)."""

    # -- entering and leaving -----------------------------------------------------------------

    def __enter__(self) -> SimulatedDevice:
        self._token = _FACTORY.set(self._runtime_for)
        if self.check:
            self._mode = _Checker(self)
            self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.synchronize()
        finally:
            if self._mode is not None:
                self._mode.__exit__(None, None, None)
                self._mode = None
            _FACTORY.reset(self._token)
            for ref in self._streams:
                stream = ref()
                if stream is not None:
                    stream.stop()
            self._streams = []

    def _runtime_for(self, device: torch.device) -> SimulatedRuntime | None:
        return SimulatedRuntime(self) if device.type == "cpu" else None

    # -- streams and clocks -------------------------------------------------------------------

    def new_stream(self) -> _SideStream:
        with self._lock:
            stream = _SideStream(self, self._next_id)
            self._seq[stream.id] = 0
            self._knows[stream.id] = {}
            self._next_id += 1
            self._streams.append(weakref.ref(stream))
        return stream

    def synchronize(self) -> None:
        """Wait on the host for every stream (``torch.accelerator.synchronize``)."""
        for ref in list(self._streams):
            stream = ref()
            if stream is not None:
                stream.synchronize()
        self.compute.synchronize()

    def _delay(self) -> float:
        with self._lock:
            return self._random.uniform(self.min_delay_ms, self.max_delay_ms) / 1e3

    def _clock_of(self, stream: int) -> dict[int, int]:
        with self._lock:
            clock = dict(self._knows[stream])
            clock[stream] = self._seq[stream]
            return clock

    def _learns(self, stream: int, clock: dict[int, int]) -> None:
        with self._lock:
            knows = self._knows[stream]
            for other, seq in clock.items():
                if knows.get(other, 0) < seq:
                    knows[other] = seq

    def _host_learns(self, clock: dict[int, int]) -> None:
        """The host has seen the work in ``clock`` complete: so has everything the host
        issues from now on, on any stream."""
        with self._lock:
            for knows in (self._host_knows, *self._knows.values()):
                for other, seq in clock.items():
                    if knows.get(other, 0) < seq:
                        knows[other] = seq

    # -- memory kinds -------------------------------------------------------------------------

    def mark_host(self, tensors: Sequence[torch.Tensor], *, pinned: bool) -> None:
        """Mark the storage of each tensor as host memory (``pinned``: page-locked)."""
        with self._lock:
            for tensor in tensors:
                key = self._follow(tensor)
                self._kind[key] = HOST
                self._accesses.setdefault(key, [])
                if pinned:
                    self._pinned.add(key)

    def mark_device(self, tensors: Sequence[torch.Tensor]) -> None:
        """Mark the storage of each tensor as device memory."""
        with self._lock:
            for tensor in tensors:
                key = _key(tensor)
                self._kind.pop(key, None)
                self._pinned.discard(key)

    def kind(self, tensor: torch.Tensor) -> str:
        """``"host"`` or ``"device"``: which memory the simulation holds ``tensor`` in."""
        return self._kind.get(_key(tensor), DEVICE)

    def _check_transfer(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        kinds = (self.kind(dst), self.kind(src))
        if kinds not in ((HOST, DEVICE), (DEVICE, HOST)):
            raise SimulatedDeviceError(
                f"a copy between host and device memory was asked for, but it copies "
                f"{kinds[1]} memory into {kinds[0]} memory"
            )
        host = dst if kinds[0] == HOST else src
        if self.check and _key(host) not in self._pinned:
            raise SimulatedDeviceError(
                "an asynchronous copy uses host memory that is not page-locked: on a GPU it "
                "would run synchronously and the stream ordering would not hold"
            )

    def released(self, tensors: Sequence[torch.Tensor]) -> None:
        """The memory of ``tensors`` is about to be given up: on a GPU it could be handed out
        again at once, so every stream's access to it must be known to the host (waited
        for), or a copy still in flight would write into, or read, someone else's memory.

        Raises:
            SimulatedDeviceError: a stream may still access it.
        """
        if not self.check:
            return
        with self._lock:
            for tensor in tensors:
                if tensor.dim() and _key(tensor) in self._accesses:
                    self._check(
                        tensor, True, None, self._host_knows,
                        "releasing memory the offload is done with",
                    )  # fmt: skip

    # -- the happens-before checks ------------------------------------------------------------

    def _side_copy(self, stream: int, dst: torch.Tensor, src: torch.Tensor) -> None:
        self._check_transfer(dst, src)
        if not self.check:
            return
        with self._lock:
            self._seq[stream] += 1
            seq = self._seq[stream]
            knows = self._knows[stream]
            operands = [(dst, True), (src, False)]
            for tensor, _ in operands:
                key = _key(tensor)
                if key not in self._accesses:
                    # First touched by a side stream: the compute stream wrote it when it
                    # was allocated (or computed).
                    self._follow(tensor)
                    nbytes = tensor.untyped_storage().nbytes()
                    self._accesses[key] = [[0, nbytes, COMPUTE, 0, self._born.get(key, 0)]]
            for tensor, write in operands:
                self._check(tensor, write, stream, knows, f"a copy on side stream {stream}")
            for tensor, write in operands:
                self._record(_key(tensor), tensor, write, stream, seq)

    def _check(
        self, tensor: torch.Tensor, write: bool, stream: int | None, knows: dict, what: str
    ) -> None:
        ranges = self._accesses.get(_key(tensor))
        if not ranges:
            return
        start, end = _byte_range(tensor)
        for lo, hi, other, last_read, last_write in ranges:
            if other == stream or hi <= start or end <= lo:
                continue
            seq = max(last_read, last_write) if write else last_write
            if seq and knows.get(other, 0) < seq:
                by = "the compute stream" if other == COMPUTE else f"side stream {other}"
                raise SimulatedDeviceError(
                    f"unordered access: {what} {'writes' if write else 'reads'} "
                    f"{self.kind(tensor)} memory that {by} "
                    f"{'wrote' if last_write >= last_read else 'reads'} "
                    f"(its operation {seq}), with no event wait or synchronization between "
                    "them: the result depends on timing"
                )

    def _record(self, key: int, tensor: torch.Tensor, write: bool, stream: int, seq: int) -> None:
        start, end = _byte_range(tensor)
        ranges = self._accesses.setdefault(key, [])
        for entry in ranges:
            if entry[0] == start and entry[1] == end and entry[2] == stream:
                entry[4 if write else 3] = seq
                return
        ranges.append([start, end, stream, 0 if write else seq, seq if write else 0])

    def _operator(
        self, name: str, groups: list[tuple[list[torch.Tensor], list[torch.Tensor]]]
    ) -> None:
        """Check one operator run on the calling thread, before it runs.

        ``groups``: ``(reads, writes)`` of the tensors that compute together (one group, or
        one per position of a ``_foreach`` operator). A group that touches device memory runs
        on the compute stream; one that touches only host memory is the host's own work,
        ordered with everything the host issues by program order. Scalars (0-dim tensors) are
        left out: they are the host's. Only memory a side stream has touched (and host
        memory) is followed: nothing else can be out of order.
        """
        self.checked_ops += 1
        accesses = self._accesses
        kinds = self._kind
        with self._lock:
            for reads, writes in groups:
                touched = [(t, False) for t in reads if t.dim() > 0] + [
                    (t, True) for t in writes if t.dim() > 0
                ]
                if not touched:
                    continue
                on_device = any(_key(t) not in kinds for t, _ in touched)
                followed = [(t, w) for t, w in touched if _key(t) in accesses]
                if on_device:
                    self._seq[COMPUTE] += 1
                if not followed:
                    continue
                if on_device:
                    stream, knows = COMPUTE, self._knows[COMPUTE]
                    what = f"{name} on the compute stream"
                else:
                    stream, knows = None, self._host_knows
                    what = f"host operator {name}"
                for tensor, write in followed:
                    self._check(tensor, write, stream, knows, what)
                if stream is None:
                    continue
                seq = self._seq[COMPUTE]
                for tensor, write in followed:
                    self._record(_key(tensor), tensor, write, COMPUTE, seq)

    def _follow(self, tensor: torch.Tensor) -> int:
        """Start keeping records for ``tensor``'s storage, and forget them when it goes:
        storage made where the dispatcher does not see it (``torch.load``) may later sit at
        the same address and must not inherit them."""
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key not in self._followed:
            self._generation += 1
            self._followed[key] = self._generation
            weakref.finalize(storage, self._forget, key, self._generation)
        return key

    def _forget(self, key: int, generation: int) -> None:
        with self._lock:
            if self._followed.get(key) != generation:
                return  # already another storage's records
            del self._followed[key]
            self._kind.pop(key, None)
            self._pinned.discard(key)
            self._accesses.pop(key, None)
            self._born.pop(key, None)

    def _fresh(self, tensor: torch.Tensor, kind: str) -> None:
        """A new allocation: forget what was recorded for a storage at the same address."""
        key = _key(tensor)
        with self._lock:
            self._accesses.pop(key, None)
            self._pinned.discard(key)
            if kind == HOST:
                self._follow(tensor)
                self._kind[key] = HOST
                self._accesses[key] = []  # host memory is always followed
            else:
                self._kind.pop(key, None)
                self._born[key] = self._seq[COMPUTE]


def _key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


def _byte_range(tensor: torch.Tensor) -> tuple[int, int]:
    start = tensor.storage_offset() * tensor.element_size()
    return start, start + storage_span(tensor.shape, tensor.stride()) * tensor.element_size()


class _Checker(TorchDispatchMode):
    """Sees every operator run on this thread (and in backward) while the device is active."""

    def __init__(self, device: SimulatedDevice) -> None:
        super().__init__()
        self.device = device

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        info = _info(func)
        if info.view:
            return func(*args, **kwargs)  # no data is read or written
        reads: list[torch.Tensor] = []
        writes: list[torch.Tensor] = []
        lists = False
        for index, (name, written) in enumerate(info.arguments):
            if index < len(args):
                value = args[index]
            elif name in kwargs:
                value = kwargs[name]
            else:
                continue
            target = writes if written else reads
            if isinstance(value, torch.Tensor):
                target.append(value)
            elif isinstance(value, (list, tuple)):
                tensors = [v for v in value if isinstance(v, torch.Tensor)]
                if tensors:
                    lists = True
                    target.extend(tensors)
        device = self.device
        groups = [(reads, writes)]
        synchronous = False
        if func is torch.ops.aten.copy_.default:
            kind = device.kind(args[0])  # a copy may cross between host and device
            non_blocking = kwargs.get("non_blocking", args[2] if len(args) > 2 else False)
            synchronous = not non_blocking and device.kind(args[1]) != kind
        elif func is torch.ops.aten.equal.default:
            # Tests compare host tensors (a state dict) with device ones; on a GPU they would
            # move one side with .cpu() first, which the simulation cannot see.
            kind, groups = DEVICE, []
        elif info.like:
            kind = self._same_kind(info.name, reads)
            groups = [([], writes)]  # the input gives the shape only
        elif lists and info.foreach:
            groups = _positions(func._schema, args, kwargs)
            for group_reads, group_writes in groups:
                self._same_kind(info.name, [*group_reads, *group_writes])
            kinds = {device.kind(t) for t in (*reads, *writes) if t.dim() > 0}
            kind = HOST if kinds == {HOST} else DEVICE
        else:
            kind = self._same_kind(info.name, [*reads, *writes])
            synchronous = func is torch.ops.aten._local_scalar_dense.default and kind == DEVICE
        device._operator(info.name, groups)
        if synchronous:
            # A blocking copy between host and device (or reading a value on the host)
            # waits for the compute stream, as PyTorch does.
            device._host_learns(device._clock_of(COMPUTE))
        out = func(*args, **kwargs)
        if info.fresh:
            inputs = {_key(t) for t in (*reads, *writes)}
            outputs = out if isinstance(out, (tuple, list)) else (out,)
            for fresh, value in zip(info.fresh, outputs, strict=False):
                if not fresh:
                    continue
                for tensor in value if isinstance(value, (tuple, list)) else (value,):
                    if isinstance(tensor, torch.Tensor) and _key(tensor) not in inputs:
                        device._fresh(tensor, kind)
        return out

    def _same_kind(self, name: str, tensors: list[torch.Tensor]) -> str:
        kinds = {self.device.kind(t) for t in tensors if t.dim() > 0}
        if len(kinds) > 1:
            shapes = ", ".join(
                f"{self.device.kind(t)} {tuple(t.shape)}" for t in tensors if t.dim() > 0
            )
            raise SimulatedDeviceError(
                f"{name} mixes host and device memory ({shapes}); on a GPU this fails with "
                "'Expected all tensors to be on the same device'"
            )
        if kinds:
            return kinds.pop()
        return DEVICE  # only scalars, or nothing: a factory


def _positions(
    schema: Any, args: tuple, kwargs: dict
) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """``(reads, writes)`` at each position of a ``_foreach`` operator's tensor lists."""
    columns: list[tuple[list[torch.Tensor], bool]] = []
    for index, argument in enumerate(schema.arguments):
        value = args[index] if index < len(args) else kwargs.get(argument.name)
        if isinstance(value, (list, tuple)) and value and isinstance(value[0], torch.Tensor):
            written = argument.alias_info is not None and argument.alias_info.is_write
            columns.append((list(value), written))
    size = max(len(column) for column, _ in columns)
    groups = []
    for position in range(size):
        reads = [c[position] for c, written in columns if not written and len(c) == size]
        writes = [c[position] for c, written in columns if written and len(c) == size]
        groups.append((reads, writes))
    return groups


class _OpInfo:
    """What the checker needs to know of an operator's schema (computed once per operator)."""

    __slots__ = ("arguments", "foreach", "fresh", "like", "name", "view")

    def __init__(self, schema: Any) -> None:
        self.name: str = schema.name
        self.arguments = [
            (a.name, a.alias_info is not None and a.alias_info.is_write) for a in schema.arguments
        ]
        writes = any(written for _, written in self.arguments)
        self.view = (
            bool(schema.returns)
            and not writes
            and all(r.alias_info is not None for r in schema.returns)
        )
        """It only makes views (aliases) of its inputs: no data is read or written."""
        self.fresh = [r.alias_info is None for r in schema.returns]
        """Per return: a new allocation (not an alias of an input)."""
        self.foreach = self.name.startswith("aten::_foreach_")
        self.like = self.name.endswith("_like")


_INFO: dict[Any, _OpInfo] = {}


def _info(func: Any) -> _OpInfo:
    info = _INFO.get(func)
    if info is None:
        info = _INFO[func] = _OpInfo(func._schema)
    return info
