"""The prefetch ring schedule: which offloaded layer loads into which slots, and when.

Under the prefetch backend the offloaded layers of one stack form a *ring*. Offloaded layer
``j`` (its *position*: counting offloaded layers only, in stack order) copies each of its
parameters into one slot of that parameter's pool entry: slot ``j % step`` (the plan's rule,
:attr:`~hydra_offload.plan.PlannedParam.slot`). The users of a slot, in ring order, take
turns in it:

- **forward**: when layer ``j`` finishes, the copy of the next user of each of its slots is
  queued (:attr:`RingSchedule.next_users`: layer ``j + step``, or past the end of the stack
  the first user of the slots, the copy for the next forward: a *wrap-around*);
- **backward** walks the ring the other way: when layer ``j``'s backward is done, the
  previous user of its slots is copied in (:attr:`RingSchedule.prev_users`: layer
  ``j - step``; before the start of the stack, the wrap-around belongs to the next forward);
- at install every slot is empty, and walking the ring from its start each layer whose slots
  are all still empty takes them (:attr:`RingSchedule.preload`: the first ``step`` layers).

This module computes that schedule once, as an immutable :class:`RingSchedule` per stack; the
runtime (``_Ring`` in :mod:`hydra_offload.backends.prefetch`) and the step-time simulator
(:mod:`hydra_offload.tuning.simulate`) both read it, so the prediction cannot drift from what runs.
It is pure: no torch device work, only the plan's figures. :func:`schedules_of` gives the
schedules of a plan, one object per stack, the same objects for as long as the plan lives;
:func:`ring_schedule` builds one from plain arguments (the simulator's hypothetical settings).

Example:
    >>> import torch
    >>> from hydra_offload import plan_offload
    >>> stack = torch.nn.Sequential(*(torch.nn.Linear(8, 8, device="meta") for _ in range(8)))
    >>> settings = {"offload_group_size": 2, "offload_prefetch_step": 2}
    >>> (schedule,) = schedules_of(plan := plan_offload(stack, {"prefetch": settings}))
    >>> schedule.layers, schedule.preload
    ((1, 3, 5, 7), (0, 1))
    >>> schedule.next_users, schedule.prev_users
    (((2,), (3,), (0,), (1,)), ((2,), (3,), (0,), (1,)))
    >>> schedules_of(plan)[0] is schedule
    True
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hydra_offload.plan import OffloadPlan, PlannedParam

__all__ = ["RingSchedule", "ring_schedule", "schedules_of", "slots_by_step"]


@dataclass(frozen=True)
class RingSchedule:
    """The prefetch schedule of one layer stack (see the module docstring).

    Positions count offloaded layers only, in stack order. Slots with the same users in the
    same order always hold the same layer, so they are merged into one *group*: a layer
    usually has one group, whatever its parameter count.
    """

    num_layers: int
    """Layers in the stack, offloaded or not."""
    layers: tuple[int, ...]
    """Per position: the layer's index in the stack."""
    position: tuple[int, ...]
    """Per layer of the stack: its position among the offloaded layers, or -1."""
    slots: tuple[tuple[Hashable, ...], ...]
    """Per position: the identities of the slots its copy fills, in copy order."""
    copy_bytes: tuple[int, ...]
    """Per position: the bytes its copy moves."""
    groups: tuple[tuple[int, ...], ...]
    """Per position: the slot groups it uses, in the order of its slots."""
    group_users: tuple[tuple[int, ...], ...]
    """Per slot group: the positions that use it, in ring order."""
    next_users: tuple[tuple[int, ...], ...]
    """Per position: whom to load into its slots once its forward is done, in queue order.
    A user at a lower position is a wrap-around: the copy for the next forward."""
    prev_users: tuple[tuple[int, ...], ...]
    """Per position: whom to load into its slots once its backward is done, in queue order.
    A user at a higher position is a wrap-around: it belongs to the next forward."""
    preload: tuple[int, ...]
    """The positions loaded at install, in order: walking the ring, each whose slots are all
    still empty."""

    @property
    def num_groups(self) -> int:
        """How many distinct slot groups the ring uses."""
        return len(self.group_users)


def slots_by_step(
    keys: Sequence[Sequence[Hashable]], step: int
) -> tuple[tuple[Hashable, ...], ...]:
    """Slot identities under the plan's rule: position ``j`` takes slot ``j % step`` of each
    of its pool entries.

    Args:
        keys: per position, the pool entries of its parameters, in copy order.
        step: ``offload_prefetch_step``.

    Returns:
        Per position, ``(entry, j % step)`` for each entry: what :func:`ring_schedule` takes
        as ``slots`` (the plan numbers an entry's slots compactly, which names the same slots).

    Example:
        >>> slots_by_step([["w"], ["w"], ["w"]], 2)
        ((('w', 0),), (('w', 1),), (('w', 0),))
    """
    return tuple(tuple((key, j % step) for key in entries) for j, entries in enumerate(keys))


def ring_schedule(
    num_layers: int,
    layers: Sequence[int],
    slots: Sequence[Sequence[Hashable]],
    copy_bytes: Sequence[int] | None = None,
) -> RingSchedule:
    """The schedule of one stack, from each offloaded layer's slots.

    Args:
        num_layers: layers in the stack, offloaded or not.
        layers: the offloaded layers' indices in the stack, in stack order.
        slots: per offloaded layer, in the same order: the identities of the slots its copy
            fills, in copy order (any hashable values; equal values are the same slot).
        copy_bytes: per offloaded layer: the bytes its copy moves; ``None``: zeros.

    Returns:
        The :class:`RingSchedule`.

    Raises:
        ValueError: ``layers``, ``slots`` and ``copy_bytes`` differ in length, or a layer
            index is outside the stack or repeated.

    Example:
        Eight layers, every other one offloaded (``offload_group_size=2``), three slot
        positions (``offload_prefetch_step=3``): four offloaded layers on three slots, so
        the ring wraps unevenly.

        >>> s = ring_schedule(8, [1, 3, 5, 7], slots_by_step([["w"]] * 4, 3))
        >>> s.position
        (-1, 0, -1, 1, -1, 2, -1, 3)
        >>> s.groups, s.group_users
        (((0,), (1,), (2,), (0,)), ((0, 3), (1,), (2,)))
        >>> s.next_users  # 0 -> 3 in the forward, 3 -> 0 wraps around to the next one
        ((3,), (), (), (0,))
        >>> s.prev_users, s.preload
        (((3,), (), (), (0,)), (0, 1, 2))
    """
    n = len(layers)
    sizes = [0] * n if copy_bytes is None else list(copy_bytes)
    if len(slots) != n or len(sizes) != n:
        raise ValueError(
            f"one entry per offloaded layer: {n} layers, {len(slots)} slot lists, "
            f"{len(sizes)} copy sizes"
        )
    position = [-1] * num_layers
    for pos, index in enumerate(layers):
        if not 0 <= index < num_layers or position[index] != -1:
            raise ValueError(
                f"layer index {index} is outside the stack of {num_layers} or repeated"
            )
        position[index] = pos
    users: dict[Hashable, list[int]] = {}
    for pos, ids in enumerate(slots):
        for sid in ids:
            order = users.setdefault(sid, [])
            if not order or order[-1] != pos:
                order.append(pos)
    group_of: dict[tuple[int, ...], int] = {}
    groups: list[tuple[int, ...]] = []
    for ids in slots:
        mine: list[int] = []
        for sid in ids:
            gid = group_of.setdefault(tuple(users[sid]), len(group_of))
            if gid not in mine:
                mine.append(gid)
        groups.append(tuple(mine))
    group_users = tuple(group_of)  # insertion order: group id order
    following: list[list[int]] = [[] for _ in range(n)]
    preceding: list[list[int]] = [[] for _ in range(n)]
    for pos, used in enumerate(groups):
        for gid in used:
            order = group_users[gid]
            here = order.index(pos)
            nxt, prev = order[(here + 1) % len(order)], order[here - 1]
            if nxt != pos and nxt not in following[pos]:
                following[pos].append(nxt)
            if prev != pos and prev not in preceding[pos]:
                preceding[pos].append(prev)
    owned = [False] * len(group_users)
    preload: list[int] = []
    for pos, used in enumerate(groups):
        if not any(owned[g] for g in used):
            preload.append(pos)
            for g in used:
                owned[g] = True
    return RingSchedule(
        num_layers=num_layers,
        layers=tuple(layers),
        position=tuple(position),
        slots=tuple(tuple(ids) for ids in slots),
        copy_bytes=tuple(sizes),
        groups=tuple(groups),
        group_users=group_users,
        next_users=tuple(tuple(f) for f in following),
        prev_users=tuple(tuple(p) for p in preceding),
        preload=tuple(preload),
    )


_CACHE: dict[int, tuple[weakref.ref[OffloadPlan], tuple[RingSchedule, ...]]] = {}
"""The schedules of each live plan, by ``id``: an entry goes when its plan is collected."""
_LOCK = threading.RLock()  # reentrant: a collected plan's callback may run inside the lock


def schedules_of(plan: OffloadPlan) -> tuple[RingSchedule, ...]:
    """The schedule of each stack of a prefetch plan, in ``plan.stacks`` order.

    Computed once per plan object: every call with the same plan returns the same
    :class:`RingSchedule` objects (so the runtime and the simulator read one schedule). A
    layer's slots are its parameters' ``(slot_key, slot)``, in ``plan.params`` order (the
    order the runtime copies them); its copy moves their bytes. A plan of another backend has
    no stacks: ``()``.

    Example:
        >>> import torch
        >>> from hydra_offload import plan_offload
        >>> plan = plan_offload(torch.nn.Linear(4, 4), {})
        >>> schedules_of(plan)
        ()
    """
    key = id(plan)
    with _LOCK:
        cached = _CACHE.get(key)
        if cached is not None and cached[0]() is plan:
            return cached[1]
        schedules = _compute(plan)
        _CACHE[key] = (weakref.ref(plan, partial(_forget, key)), schedules)
        return schedules


def _forget(key: int, ref: weakref.ref[OffloadPlan]) -> None:
    with _LOCK:
        cached = _CACHE.get(key)
        if cached is not None and cached[0] is ref:
            del _CACHE[key]


def _compute(plan: OffloadPlan) -> tuple[RingSchedule, ...]:
    by_layer: dict[tuple[str | None, int | None], list[PlannedParam]] = {}
    for p in plan.params:
        by_layer.setdefault((p.stack, p.layer), []).append(p)
    out = []
    for stack in plan.stacks:
        params = [by_layer.get((stack.path, index), []) for index in stack.offloaded_layers]
        out.append(
            ring_schedule(
                stack.num_layers,
                stack.offloaded_layers,
                [[(p.slot_key, p.slot) for p in ps] for ps in params],
                [sum(p.nbytes for p in ps) for ps in params],
            )
        )
    return tuple(out)
