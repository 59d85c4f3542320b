"""Host memory shared by the processes of one node: one copy of the offloaded weights per node.

Data-parallel ranks offload the same model. Each keeping its own host copy multiplies host
memory by the number of GPUs; instead the ranks of a node keep one copy, in memory they all
map. The node's **leader** (its first process in the process group) creates each segment,
fills it, and hands it to the others, who map the very same pages; every process then
page-locks its mapping with the CUDA runtime (portable registration) and reads it as it reads
private page-locked memory.

A segment is an anonymous memory file (``memfd_create``), not a name in ``/dev/shm``: there is
no name another process could guess or open, nothing to unlink, and nothing left behind when
a process is killed (the memory goes with the last process that maps it), and the size of
``/dev/shm`` (64 MB in a container by default) does not limit it (the memory counts against
the container's memory like any other). The others map it through
``/proc/<leader pid>/fd/<n>``, which only processes of the same user (in the same PID
namespace) can open; the leader closes its descriptors once every process of the node has
mapped the segments.

:func:`join_node` finds the node's processes (one collective over the group); it is also where
ranks whose plans differ are refused together. :class:`HostStorage
<hydra_offload.runtime.host.HostStorage>` makes the segments (``shared=``) and publishes them
(:meth:`~hydra_offload.runtime.host.HostStorage.publish`, the second collective).

Example (one process: nothing to share):
    >>> join_node(None, "plan-signature") is None
    True
    >>> segment = SharedSegment.create(4096)
    >>> segment.buffer.numel(), int(segment.buffer.sum())
    (4096, 0)
    >>> segment.close()
"""

from __future__ import annotations

import ctypes
import functools
import os
import socket
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from hydra_offload.errors import OffloadError

__all__ = [
    "NodeGroup",
    "SharedSegment",
    "can_share",
    "exchange",
    "join_node",
    "release_freed_memory",
]


def can_share() -> bool:
    """Whether this system can share host memory between processes here (Linux's
    ``memfd_create``)."""
    return hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd")


def _node_key() -> str:
    """What identifies this node, as its processes see it: the host name, the boot (two
    machines with one host name differ) and the PID namespace (a process in another
    container cannot open ``/proc/<pid>`` here)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as boot:
            boot_id = boot.read().strip()
    except OSError:
        boot_id = "?"
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        namespace = 0
    return f"{socket.gethostname()}/{boot_id}/{namespace}"


@dataclass(frozen=True)
class NodeGroup:
    """The processes of this node among those of a process group."""

    group: Any
    """The ``torch.distributed`` process group (``None``: the default group)."""
    size: int
    """How many processes of the group run on this node (1 on a node that has only this
    one, while others share)."""
    index: int
    """This process's position among them (0: the leader, which creates the segments)."""
    key: str
    """Which node."""

    @property
    def leader(self) -> bool:
        return self.index == 0


def _gather(value: Any, group: Any) -> list[Any]:
    import torch.distributed as dist

    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, value, group=group)
    return gathered


def join_node(
    group: Any, signature: str, problem: str | None = None, *, share: bool = True
) -> NodeGroup | None:
    """Meet the other processes of ``group`` (one collective: every process of the group
    must call it), and return this node's :class:`NodeGroup`; ``None`` on every process when
    no node runs two of them (nothing to share), or when ``group`` is ``None`` and no process
    group is initialized.

    Args:
        group: a ``torch.distributed`` process group, or ``None`` for the default one when
            ``torch.distributed`` is initialized.
        signature: what this process is about to offload (the plan, as text): every process
            must have the same.
        problem: this process cannot go on (why), as found before the meeting: every process
            then raises, so that none is left waiting for the others in a collective.
        share: whether this process would share host memory: the processes share only when
            every one would (the same answer on all of them).

    Raises:
        OffloadError: a process had a ``problem``, or the processes' signatures differ;
            raised on every process alike, before any allocates.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        if problem is not None:
            raise OffloadError(problem)
        return None
    rank = dist.get_rank(group)
    everyone = _gather((_node_key(), signature, problem, share), group)
    for other, (_, _, their_problem, _) in enumerate(everyone):
        if their_problem is not None:
            if other == rank:
                raise OffloadError(their_problem)
            raise OffloadError(
                f"process {other} of the group cannot offload, so none does: {their_problem}"
            )
    differ = [other for other, entry in enumerate(everyone) if entry[1] != everyone[0][1]]
    if differ:
        raise OffloadError(
            f"the processes of the group planned different offloads (process {differ[0]}'s "
            "plan differs from process 0's: another model, config or dtype); every process "
            "of a data-parallel job must offload the same model alike, so none offloads"
        )
    keys = [entry[0] for entry in everyone]
    if not all(entry[3] for entry in everyone) or all(keys.count(key) < 2 for key in keys):
        return None  # no node has two processes: nothing to share anywhere
    # Every process gets a node (one of its own node's size, 1 included), so that all of
    # them take part in the collectives that follow.
    node = [other for other, key in enumerate(keys) if key == keys[rank]]
    return NodeGroup(group=group, size=len(node), index=node.index(rank), key=keys[rank])


def exchange(node: NodeGroup, value: Any, problem: str | None = None) -> list[Any]:
    """Every process of the group sends ``value`` (a collective of the whole group); returns
    what the processes of this node sent, in node order (the leader's first).

    Raises:
        OffloadError: a process (of any node) sent a ``problem``: every process raises.
    """
    import torch.distributed as dist

    everyone = _gather((node.key, value, problem), node.group)
    rank = dist.get_rank(node.group)
    for other, (_, _, their_problem) in enumerate(everyone):
        if their_problem is not None:
            if other == rank:
                raise OffloadError(their_problem)
            raise OffloadError(
                f"process {other} of the group could not offload, so none does: {their_problem}"
            )
    return [sent for key, sent, _ in everyone if key == node.key]


class SharedSegment:
    """One segment of shared host memory: a uint8 CPU tensor (:attr:`buffer`) over a
    memory file that other processes of the node map too."""

    def __init__(self, buffer: torch.Tensor, fd: int | None, pid: int) -> None:
        self.buffer = buffer
        self._fd = fd
        self.pid = pid
        """The process whose descriptor the others open (the leader)."""
        # The descriptor is closed once, by close() or when the segment goes.
        self._closer = weakref.finalize(self, os.close, fd) if fd is not None else None

    @property
    def fd(self) -> int | None:
        """The leader's descriptor, while it is open."""
        return self._fd

    @staticmethod
    def create(nbytes: int) -> SharedSegment:
        """A new zero-filled segment of ``nbytes`` bytes, mapped here (the leader).

        Raises:
            OSError: the memory file could not be made or mapped.
        """
        fd = os.memfd_create("hydra-offload", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, nbytes)
            buffer = _map(f"/proc/self/fd/{fd}", nbytes)
        except BaseException:
            os.close(fd)
            raise
        return SharedSegment(buffer, fd, os.getpid())

    @staticmethod
    def attach(pid: int, fd: int, nbytes: int) -> SharedSegment:
        """Map the segment the leader (process ``pid``) holds as descriptor ``fd``.

        Raises:
            OffloadError: it cannot be opened (another user, another PID namespace).
        """
        path = f"/proc/{pid}/fd/{fd}"
        try:
            buffer = _map(path, nbytes)
        except (OSError, RuntimeError) as err:
            raise OffloadError(
                f"could not map the node's shared host memory ({path}, {nbytes:,} bytes): "
                f"{err}. The processes of a node must run as one user in one PID namespace "
                "(one container); otherwise turn sharing off (offload.share_host_memory=false)"
            ) from err
        return SharedSegment(buffer, None, pid)

    def close(self) -> None:
        """Close the leader's descriptor (the mappings keep the memory)."""
        if self._closer is not None:
            self._closer()
        self._fd = None


def _map(path: str, nbytes: int) -> torch.Tensor:
    storage = torch.UntypedStorage.from_file(path, shared=True, nbytes=nbytes)
    return torch.empty(0, dtype=torch.uint8, device="cpu").set_(storage)


def release_freed_memory() -> None:
    """Give the memory this process freed back to the operating system now.

    glibc keeps freed blocks below its mmap threshold in the heap, where they still count in
    the process's resident memory: after the offload frees a process's own copy of the
    weights, ``malloc_trim(0)`` returns what it can. Does nothing elsewhere.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or ``None`` where there is none."""
    try:
        return getattr(ctypes.CDLL("libc.so.6"), "malloc_trim", None)
    except OSError:
        return None
