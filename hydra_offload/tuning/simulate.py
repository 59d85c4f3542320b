"""The step time of a prefetch plan, predicted from per-layer compute and the bandwidth.

:func:`simulate_prefetch` predicts how long one forward takes under a prefetch
:class:`~hydra_offload.plan.OffloadPlan`, from two measured figures: the compute time of each
layer and the host-to-device bandwidth. It is pure: no device is needed, and a plan of a model
built on the ``meta`` device is enough.

The model of the runtime (``backends/prefetch.py``) is a timeline of two streams, driven by
the ring schedule the runtime itself reads (:mod:`hydra_offload.schedule`: who loads into
which slots, and when):

- **Compute** runs the layers of each stack one after another, each taking its
  ``layer_seconds``; ``other_seconds`` (embeddings, head: compute outside the stacks) is added
  once per forward, before the first stack.
- **One copy stream** serves every stack; copies run one at a time, in the order they are
  queued. Copying offloaded layer ``j`` takes ``bytes of its offloaded parameters / bandwidth``.
- Offloaded layer ``j`` (counting offloaded layers only) uses slot position ``j % S``. When it
  finishes computing, the copy of the next user of its slots is queued: offloaded layer
  ``j + S``, or, past the end of the stack, the first layer of the same position (the copy
  for the next forward starts during this one). A copy starts once the copy stream is free and
  compute is done with every slot it overwrites. A layer starts computing once the previous
  layer is done and its own copy has landed.
- At apply time the first S offloaded layers are preloaded: ready at time 0.
- Slots are tracked as the runtime tracks them (owner, used), so a layer whose weights are not
  in its slots when it is called is loaded on demand, as the runtime does.

Several forwards run back to back and the duration of the last one is the prediction, so the
wrap-around copies and the preload are accounted for as they are in a long run.

Limits: the host is assumed never to be the bottleneck (the runtime queues work ahead, and
hook overhead is ignored); copies do not slow compute down (no contention for memory
bandwidth); a copy's time is linear in its bytes (no per-copy latency: fold it into a lower
``bandwidth`` for small layers); backward is not modelled (training walks the offloaded
layers again in reverse, which this does not predict); only parameter bytes, the buffer pool and the
``activation_bytes`` you give count towards device memory (no allocator overhead, no
workspace, no CUDA context).

Example:
    >>> import torch
    >>> from hydra_offload import plan_offload
    >>> from hydra_offload.models import DecoderLM
    >>> with torch.device("meta"):
    ...     model = DecoderLM(num_layers=8)  # 3.2 MB per layer, 27.8 MB in all
    >>> plan = plan_offload(model, {"prefetch": {"offload_group_size": 1,
    ...                                          "offload_prefetch_step": 2}})
    >>> round(simulate_prefetch(plan, layer_seconds=0.001, bandwidth=1e9), 6)  # 1 GB/s
    0.025706
    >>> round(plan.offloaded_bytes / 1e9, 6)  # copy-bound: every layer's copy, one by one
    0.025706
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from numbers import Real
from typing import TYPE_CHECKING

from hydra_offload.schedule import RingSchedule, schedules_of

if TYPE_CHECKING:
    from hydra_offload.plan import OffloadPlan

__all__ = ["LayerSeconds", "simulate_prefetch"]

GIB = 1024**3

LayerSeconds = float | Sequence[float]
"""Compute seconds of each layer: one number for every layer, or one per layer, in stack
order (stacks concatenated in the plan's order)."""


# --------------------------------------------------------------------------------------------
# The runtime's prefetch ring as a timeline
# --------------------------------------------------------------------------------------------


def _rings_of_plan(plan: OffloadPlan) -> tuple[RingSchedule, ...]:
    """The plan's ring schedules: the very objects the runtime installs from."""
    return schedules_of(plan)


class _Timeline:
    """The two streams and every ring's slot state while forwards run."""

    def __init__(self, rings: Sequence[RingSchedule], bandwidth: float) -> None:
        self.rings = rings
        self.copy_seconds = [[b / bandwidth for b in ring.copy_bytes] for ring in rings]
        self.owner = [[-1] * ring.num_groups for ring in rings]
        self.used = [[False] * ring.num_groups for ring in rings]
        self.free = [[0.0] * ring.num_groups for ring in rings]
        self.ready = [[0.0] * len(ring.groups) for ring in rings]
        self.copy_free = 0.0
        self.now = 0.0
        for r, ring in enumerate(rings):  # the preload: ready before the first forward
            owner = self.owner[r]
            for pos in ring.preload:
                for g in ring.groups[pos]:
                    owner[g] = pos

    def _load(self, r: int, pos: int) -> None:
        groups = self.rings[r].groups[pos]
        free, owner, used = self.free[r], self.owner[r], self.used[r]
        start = self.copy_free
        for g in groups:  # compute must be done with what the copy overwrites
            start = max(start, free[g])
        self.copy_free = start + self.copy_seconds[r][pos]
        self.ready[r][pos] = self.copy_free
        for g in groups:
            owner[g] = pos
            used[g] = False

    def _rebase(self) -> None:
        """Make the current time 0, so a forward's duration is summed like the baseline
        (a forward without waits then takes exactly the baseline, not a rounding away)."""
        origin = self.now
        self.now = 0.0
        self.copy_free -= origin
        for times in (*self.free, *self.ready):
            for i in range(len(times)):
                times[i] -= origin

    def forward(self, seconds: Sequence[Sequence[float]], other_seconds: float) -> float:
        """Run one forward; its duration."""
        self._rebase()
        now = other_seconds
        for r, ring in enumerate(self.rings):
            owner, used, free, ready = self.owner[r], self.used[r], self.free[r], self.ready[r]
            for index, pos in enumerate(ring.position):
                if pos < 0:
                    now += seconds[r][index]
                    continue
                groups = ring.groups[pos]
                if any(owner[g] != pos for g in groups):  # not in its slots: load on demand
                    self._load(r, pos)
                now = max(now, ready[pos]) + seconds[r][index]
                for g in groups:
                    free[g] = now
                    used[g] = True
                for nxt in ring.next_users[pos]:
                    mine = ring.groups[nxt]
                    holds = all(owner[g] == nxt for g in mine)
                    can_fill = all(owner[g] in (-1, nxt) or used[g] for g in mine)
                    if not holds and can_fill:
                        self._load(r, nxt)
        self.now = now
        return now


def _serial_sum(other_seconds: float, seconds: Sequence[Sequence[float]]) -> float:
    """The forward without offloading, summed in the order :class:`_Timeline` sums it."""
    total = other_seconds
    for stack in seconds:
        for value in stack:
            total += value
    return total


def _run(
    rings: Sequence[RingSchedule],
    seconds: Sequence[Sequence[float]],
    *,
    bandwidth: float,
    other_seconds: float,
    forwards: int,
) -> float:
    timeline = _Timeline(rings, bandwidth)
    last = 0.0
    for _ in range(forwards):
        last = timeline.forward(seconds, other_seconds)
    return last


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------


def _number(value: object) -> float | None:
    """``value`` as a float if it is a real number (not a bool), else ``None``."""
    if isinstance(value, Real) and not isinstance(value, bool):
        return float(value)
    return None


def _check_seconds(name: str, value: object) -> float:
    number = _number(value)
    if number is None or not math.isfinite(number) or number < 0:
        raise ValueError(f"{name} must be a finite number of seconds >= 0, got {value!r}")
    return number


def _check_bandwidth(bandwidth: object) -> float:
    number = _number(bandwidth)
    if number is None or not number > 0:  # NaN fails the comparison too
        raise ValueError(
            "bandwidth must be a number of bytes per second > 0 (e.g. 25e9 for 25 GB/s), "
            f"got {bandwidth!r}"
        )
    return number


def _check_bytes(name: str, value: object) -> int:
    number = _number(value)
    if number is None or not math.isfinite(number) or number < 0:
        raise ValueError(f"{name} must be a number of bytes >= 0, got {value!r}")
    return int(number)


def _check_count(name: str, value: object, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _split_seconds(layer_seconds: object, sizes: Sequence[int]) -> list[list[float]]:
    """``layer_seconds`` as one list per stack, checked."""
    total = sum(sizes)
    if _number(layer_seconds) is not None:
        each = _check_seconds("layer_seconds", layer_seconds)
        return [[each] * n for n in sizes]
    if not isinstance(layer_seconds, Iterable) or isinstance(layer_seconds, (str, bytes, Mapping)):
        raise ValueError(
            "layer_seconds must be a number of seconds or a sequence with one per layer, "
            f"got {type(layer_seconds).__name__}"
        )
    values = list(layer_seconds)
    if len(values) != total:
        raise ValueError(
            f"layer_seconds has {len(values)} entries but the layer stack(s) have {total} "
            f"layers ({' + '.join(map(str, sizes))}): give one per layer, in stack order, or "
            "a single number for all"
        )
    flat = [_check_seconds(f"layer_seconds[{i}]", v) for i, v in enumerate(values)]
    out, at = [], 0
    for n in sizes:
        out.append(flat[at : at + n])
        at += n
    return out


# --------------------------------------------------------------------------------------------
# simulate_prefetch
# --------------------------------------------------------------------------------------------


def simulate_prefetch(
    plan: OffloadPlan,
    *,
    layer_seconds: LayerSeconds,
    bandwidth: float,
    other_seconds: float = 0.0,
    forwards: int = 3,
) -> float:
    """Predicted seconds of one steady-state forward under a prefetch plan.

    See the module docstring for the model of the runtime. With several stacks, they run one
    after another within a forward, in the plan's order, sharing the one copy stream.

    Args:
        plan: a plan of the prefetch backend (:func:`~hydra_offload.plan.plan_offload`; a
            ``meta`` model is enough).
        layer_seconds: compute seconds of each layer of the stack(s): one number for all, or
            one per layer in stack order (several stacks: concatenated in ``plan.stacks``
            order).
        bandwidth: host-to-device copy bandwidth, bytes per second.
        other_seconds: compute outside the stacks (embeddings, head), once per forward.
        forwards: forwards simulated back to back; the duration of the last is returned.

    Returns:
        Seconds of the last forward.

    Raises:
        ValueError: the plan is not a prefetch plan, or an argument is out of range (the
            message names it).

    Example:
        >>> import torch
        >>> from hydra_offload import plan_offload
        >>> from hydra_offload.models import DecoderLM
        >>> with torch.device("meta"):
        ...     model = DecoderLM(num_layers=4)
        >>> plan = plan_offload(model, {"prefetch": {"offload_group_size": 2}})
        >>> simulate_prefetch(plan, layer_seconds=0.5, bandwidth=1e12)  # copies hidden
        2.0
    """
    if getattr(plan, "backend", None) != "prefetch":
        raise ValueError(
            f"plan must be a prefetch plan, got backend {getattr(plan, 'backend', plan)!r}; "
            "make it with plan_offload(model, config) where config selects offload=prefetch"
        )
    speed = _check_bandwidth(bandwidth)
    other = _check_seconds("other_seconds", other_seconds)
    count = _check_count("forwards", forwards, 1)
    seconds = _split_seconds(layer_seconds, [s.num_layers for s in plan.stacks])
    return _run(_rings_of_plan(plan), seconds, bandwidth=speed, other_seconds=other, forwards=count)
