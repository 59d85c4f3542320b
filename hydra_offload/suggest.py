"""Prefetch settings for a device-memory target, and the step time of any prefetch plan.

:func:`simulate_prefetch` predicts how long one forward takes under a prefetch
:class:`~hydra_offload.plan.OffloadPlan`, from two measured figures: the compute time of each
layer and the host-to-device bandwidth. :func:`suggest_prefetch` tries the settings
(``offload_group_size`` G, ``offload_num_in_group`` K, ``offload_prefetch_step`` S) that fit a
device budget and returns the fastest as a :class:`Suggestion`, with the Hydra overrides that
select it. Both are pure: they plan with :func:`~hydra_offload.plan.plan_offload`, so a model
built on the ``meta`` device is enough, and no device is needed.

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
    >>> from hydra_offload.models import DecoderLM
    >>> with torch.device("meta"):
    ...     model = DecoderLM(num_layers=8)  # 3.2 MB per layer, 27.8 MB in all
    >>> s = suggest_prefetch(model, layer_seconds=0.001, bandwidth=10e9,
    ...                      device_budget_bytes=16 * 2**20)
    >>> for override in s.overrides:
    ...     print(override)
    offload=prefetch
    offload.prefetch.offload_group_size=1
    offload.prefetch.offload_num_in_group=1
    offload.prefetch.offload_prefetch_step=2
    >>> s.predicted_step_seconds == s.baseline_step_seconds  # every copy is hidden
    True
    >>> s.device_bytes <= 16 * 2**20
    True
    >>> from hydra_offload import plan_offload
    >>> plan = plan_offload(model, s.config)
    >>> round(simulate_prefetch(plan, layer_seconds=0.001, bandwidth=1e9), 6)  # 1 GB/s
    0.025706
    >>> round(plan.offloaded_bytes / 1e9, 6)  # copy-bound: every layer's copy, one by one
    0.025706
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from numbers import Real
from typing import TYPE_CHECKING, Any

from hydra_offload.config import OffloadConfig, PrefetchOffloadConfig
from hydra_offload.schedule import RingSchedule, ring_schedule, schedules_of, slots_by_step

if TYPE_CHECKING:
    from rich.console import RenderableType
    from rich.table import Table
    from torch import nn

    from hydra_offload.plan import OffloadPlan

__all__ = ["Suggestion", "simulate_prefetch", "suggest_prefetch"]

GIB = 1024**3

LayerSeconds = float | Sequence[float]
"""Compute seconds of each layer: one number for every layer, or one per layer, in stack
order (stacks concatenated in the plan's order)."""

_FORWARDS = 3
"""Forwards :func:`suggest_prefetch` simulates per candidate (the last one is reported)."""

_STEP_SLACK = 4
"""The grid tries ``offload_prefetch_step`` up to ``2 * offload_num_in_group + _STEP_SLACK``."""

_TIE = 0.01
"""Step times within this fraction of the fastest count as a tie, won by fewer device bytes."""


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


# --------------------------------------------------------------------------------------------
# Suggestion
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Suggestion:
    """What :func:`suggest_prefetch` proposes, with the figures it predicts."""

    config: OffloadConfig
    """The proposed configuration (backend ``none`` when the model fits without offloading)."""
    predicted_step_seconds: float
    """Predicted seconds of one forward under :attr:`config`."""
    baseline_step_seconds: float
    """Seconds of one forward without offloading: every layer's compute plus the rest."""
    device_bytes: int
    """Predicted device bytes: parameters left on the device, the pool, the activations."""
    offloaded_bytes: int
    """Parameter bytes kept in host memory."""
    pool_bytes: int
    """Bytes of the static device buffer pool."""
    device_budget_bytes: int
    """The budget the suggestion was made for."""
    total_param_bytes: int
    """Bytes of all the model's parameters."""
    activation_bytes: int = 0
    """Device bytes counted for activations, as given."""

    @property
    def offload_needed(self) -> bool:
        """Whether the model needs offloading to fit the budget."""
        return self.config.resolved_backend != "none"

    @property
    def slowdown(self) -> float:
        """Predicted step time over the no-offload step time (1.0: no cost)."""
        if self.baseline_step_seconds == 0:
            return 1.0
        return self.predicted_step_seconds / self.baseline_step_seconds

    @property
    def overrides(self) -> list[str]:
        """The Hydra command-line overrides that select :attr:`config`."""
        if not self.offload_needed:
            return ["offload=none"]
        p = self.config.prefetch
        out = [
            "offload=prefetch",
            f"offload.prefetch.offload_group_size={p.offload_group_size}",
            f"offload.prefetch.offload_num_in_group={p.offload_num_in_group}",
            f"offload.prefetch.offload_prefetch_step={p.offload_prefetch_step}",
        ]
        paths = self.config.layer_paths
        if paths is not None:
            value = paths[0] if len(paths) == 1 else "[" + ",".join(paths) + "]"
            out.append(f"offload.layers={value}")
        return out

    def table(self) -> Table:
        """The suggestion as a two-column rich table (the style of the plan's table)."""
        from rich.table import Table

        from hydra_offload._format import format_bytes

        if self.offload_needed:
            p = self.config.prefetch
            title = (
                f"Offload suggestion: prefetch G={p.offload_group_size}, "
                f"K={p.offload_num_in_group}, S={p.offload_prefetch_step}"
            )
        else:
            title = "Offload suggestion: none needed, the model fits"
        table = Table(title=title, show_header=False, title_justify="left")
        table.add_column("what", style="bold")
        table.add_column("value")
        table.add_row("overrides", " ".join(self.overrides))
        extra = 100 * (self.slowdown - 1)
        table.add_row(
            "predicted step",
            f"{_ms(self.predicted_step_seconds)} ({extra:+.1f}% over no offload)",
        )
        table.add_row("step without offload", _ms(self.baseline_step_seconds))
        table.add_row("device bytes (predicted)", format_bytes(self.device_bytes))
        table.add_row("device budget", format_bytes(self.device_budget_bytes))
        table.add_row("bytes in host memory", format_bytes(self.offloaded_bytes))
        table.add_row("device buffer pool", format_bytes(self.pool_bytes))
        table.add_row("activations (given)", format_bytes(self.activation_bytes))
        table.add_row("model parameter bytes", format_bytes(self.total_param_bytes))
        return table

    def __rich__(self) -> RenderableType:
        return self.table()


def _ms(seconds: float) -> str:
    return f"{1000 * seconds:,.3f} ms"


# --------------------------------------------------------------------------------------------
# suggest_prefetch
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layer:
    """A layer of a stack that has parameters to offload."""

    index: int
    nbytes: int
    keys: tuple[Hashable, ...]
    """Its parameters' pool entries, in the order the runtime copies them."""
    sig: int
    """Layers with the same keys share a signature."""


@dataclass(frozen=True)
class _Stack:
    num_layers: int
    offset: int
    """Position of the stack's first layer among all the stacks' layers."""
    layers: tuple[_Layer, ...]
    key_bytes: dict[Hashable, int]
    sig_keys: tuple[tuple[Hashable, ...], ...]
    uniform_bytes: int | None
    """Bytes of a layer when every layer has the same pool entries (the usual case)."""

    def figures(self, chosen: Sequence[_Layer], step: int) -> tuple[int, int, int]:
        """For ``chosen`` offloaded with prefetch step ``step``: the pool's bytes, the bytes
        of the copies that must happen within each forward (see :class:`_Candidate`), and the
        index of the last layer so copied (-1: none)."""
        n = len(chosen)
        size = self.uniform_bytes
        if size is not None:
            last = chosen[-1].index if n > step else -1
            return size * min(step, n), size * max(n - step, 0), last
        positions: dict[int, set[int]] = {}
        for j, layer in enumerate(chosen):
            positions.setdefault(layer.sig, set()).add(j % step)
        per_key: dict[Hashable, set[int]] = {}
        for sig, used in positions.items():
            for key in self.sig_keys[sig]:
                per_key.setdefault(key, set()).update(used)
        pool = sum(self.key_bytes[k] * len(used) for k, used in per_key.items())
        # Layer j shares every slot with layer j - step when they have the same entries.
        copied = [
            layer
            for j, layer in enumerate(chosen)
            if j >= step and chosen[j - step].sig == layer.sig
        ]
        last = copied[-1].index if copied else -1
        return pool, sum(layer.nbytes for layer in copied), last

    def ring(self, chosen: Sequence[_Layer], step: int) -> RingSchedule:
        """The schedule the plan of this setting would give the stack (without planning)."""
        return ring_schedule(
            self.num_layers,
            [layer.index for layer in chosen],
            slots_by_step([layer.keys for layer in chosen], step),
            [layer.nbytes for layer in chosen],
        )


def _stacks_of_plan(plan: OffloadPlan) -> list[_Stack]:
    """The offloadable layers of each stack, from a plan that offloads every layer."""
    by_layer: dict[tuple[str | None, int | None], list[Any]] = {}
    for p in plan.params:
        by_layer.setdefault((p.stack, p.layer), []).append(p)
    stacks = []
    offset = 0
    for stack in plan.stacks:
        key_bytes: dict[Hashable, int] = {}
        sigs: dict[tuple[Hashable, ...], int] = {}
        layers = []
        for index in stack.offloaded_layers:
            params = by_layer[(stack.path, index)]
            keys = tuple(p.slot_key for p in params)
            for p in params:
                key_bytes[p.slot_key] = p.nbytes
            sig = sigs.setdefault(keys, len(sigs))
            layers.append(_Layer(index, sum(p.nbytes for p in params), keys, sig))
        uniform = layers[0].nbytes if len(sigs) == 1 else None
        stacks.append(
            _Stack(stack.num_layers, offset, tuple(layers), key_bytes, tuple(sigs), uniform)
        )
        offset += stack.num_layers
    return stacks


@dataclass(frozen=True)
class _Candidate:
    group: int
    per_group: int
    step: int
    chosen: tuple[tuple[_Layer, ...], ...]
    offloaded_bytes: int
    pool_bytes: int
    device_bytes: int
    lower_bound: float
    """No forward under this setting is faster. A layer that takes slots over from an earlier
    layer of the same forward is copied within that forward, after the first offloaded layer
    has computed and before the last such layer computes, one copy at a time: so a forward
    takes at least the compute up to the first offloaded layer, those copies, and the compute
    from the last such layer on; and at least the compute of every layer."""

    @property
    def order(self) -> tuple[int, int, int]:
        return (self.group, self.per_group, self.step)


@dataclass(frozen=True)
class _Timing:
    """What the lower bounds need: compute before each layer (all stacks, in order)."""

    prefix: tuple[float, ...]
    other_seconds: float
    bandwidth: float
    baseline: float

    def lower_bound(self, first: int, copied_bytes: int, last: int) -> float:
        if last < 0:
            return self.baseline
        copies = (
            self.other_seconds
            + self.prefix[first + 1]
            + copied_bytes / self.bandwidth
            + (self.prefix[-1] - self.prefix[last])
        )
        # The baseline sums like the simulation; the copy bound must not round too high.
        return max(self.baseline, copies * (1 - 1e-9))


def _candidates(
    stacks: Sequence[_Stack],
    max_group: int,
    fixed_bytes: int,
    timing: _Timing,
    *,
    budget: int | None,
) -> list[_Candidate]:
    """Every distinct plan of the grid (see :func:`suggest_prefetch`) that fits ``budget``
    (``None``: all of them), with its figures."""
    out: list[_Candidate] = []
    seen: set[tuple[Any, ...]] = set()
    for group in range(1, max_group + 1):
        for per_group in range(1, group + 1):
            chosen = tuple(
                tuple(layer for layer in s.layers if layer.index % group >= group - per_group)
                for s in stacks
            )
            offloaded = sum(layer.nbytes for c in chosen for layer in c)
            if budget is not None and fixed_bytes - offloaded > budget:
                continue  # does not fit even with an empty pool
            # S >= the longest ring keeps every offloaded layer in the pool: nothing saved.
            top = min(2 * per_group + _STEP_SLACK, max(len(c) for c in chosen) - 1)
            indices = tuple(tuple(layer.index for layer in c) for c in chosen)
            first = next(
                (s.offset + c[0].index for s, c in zip(stacks, chosen, strict=True) if c), -1
            )
            for step in range(per_group, top + 1):
                if (indices, step) in seen:
                    continue
                seen.add((indices, step))
                pool = copied = 0
                last = -1
                for s, c in zip(stacks, chosen, strict=True):
                    pool_bytes, copied_bytes, last_copied = s.figures(c, step)
                    pool += pool_bytes
                    copied += copied_bytes
                    if last_copied >= 0:
                        last = s.offset + last_copied
                device = fixed_bytes - offloaded + pool
                if budget is not None and device > budget:
                    continue
                out.append(
                    _Candidate(
                        group=group,
                        per_group=per_group,
                        step=step,
                        chosen=chosen,
                        offloaded_bytes=offloaded,
                        pool_bytes=pool,
                        device_bytes=device,
                        lower_bound=timing.lower_bound(first, copied, last),
                    )
                )
    return out


def _pick(candidates: Sequence[_Candidate], step_time: Callable[[_Candidate], float]) -> _Candidate:
    """The fastest candidate; within :data:`_TIE` of it, the one with fewest device bytes.

    Candidates are simulated lazily: in lower-bound order until none can be faster, then in
    device-bytes order until the first within the tie.
    """
    fastest = math.inf
    # Fewer offloaded bytes first: more compute to hide each copy behind, likely faster.
    first = sorted(candidates, key=lambda c: (c.lower_bound, c.offloaded_bytes, c.order))
    for c in first:
        if c.lower_bound >= fastest:
            break
        fastest = min(fastest, step_time(c))
    limit = fastest * (1 + _TIE)
    best: _Candidate | None = None
    for c in sorted(candidates, key=lambda c: (c.device_bytes, c.order)):
        if best is not None and c.device_bytes > best.device_bytes:
            break
        if c.lower_bound > limit:
            continue
        seconds = step_time(c)
        if seconds <= limit and (best is None or seconds < step_time(best)):
            best = c
    assert best is not None  # the fastest one is within its own tie
    return best


def suggest_prefetch(
    model: nn.Module,
    *,
    layer_seconds: LayerSeconds,
    bandwidth: float,
    device_budget_bytes: int,
    other_seconds: float = 0.0,
    activation_bytes: int = 0,
    layers: str | Sequence[str] | None = None,
    max_group_size: int | None = None,
) -> Suggestion:
    """The fastest prefetch settings whose predicted device memory fits a budget.

    Predicted device bytes of a setting = the model's parameter bytes - the offloaded bytes
    + the buffer pool + ``activation_bytes``. Among the settings that fit, the one with the
    smallest predicted step time (:func:`simulate_prefetch`) wins; settings within 1% of it
    count as a tie, won by fewer device bytes. When the whole model fits, offloading is not
    needed and the suggestion says so (``config`` resolves to backend ``none``).

    The grid: G from 1 to the longest stack (or ``max_group_size``); K from 1 to G; S from K
    (adjacent offloaded layers have no compute between them to hide their copies) to
    ``min(2 * K + 4, n - 1)`` where n is the longest ring of offloaded layers (S >= n holds
    every offloaded layer in the pool and saves nothing). Settings that give the same plan are
    tried once. The model is planned once (every layer offloaded) and each setting's figures
    derived from that plan, so the grid costs no further walk of the model; the step time is
    simulated only for settings that can still win (a lower bound prunes the rest). A
    32-layer Llama-7B-shaped model takes well under a second.

    Args:
        model: the model; it may live on the ``meta`` device (nothing reads tensor data).
        layer_seconds: compute seconds of each layer of the stack(s): one number for all, or
            one per layer in stack order.
        bandwidth: host-to-device copy bandwidth, bytes per second.
        device_budget_bytes: device bytes the weights, pool and activations may take.
        other_seconds: compute outside the stacks (embeddings, head), once per forward.
        activation_bytes: device bytes to reserve for activations (and anything else).
        layers: the stack path(s) (the config's ``layers``); ``None``: auto-detect.
        max_group_size: largest G tried; ``None``: the longest stack.

    Returns:
        The :class:`Suggestion`; its ``config`` validates and plans to its ``device_bytes``.

    Raises:
        ValueError: no setting fits the budget (the message gives the smallest footprint
            reachable), or an argument is out of range (the message names it).
        hydra_offload.stacks.LayerStackError: no layer stack found, or ``layers`` names none.

    Example:
        >>> import torch
        >>> from hydra_offload.models import DecoderLM
        >>> with torch.device("meta"):
        ...     model = DecoderLM(num_layers=8)
        >>> suggest_prefetch(model, layer_seconds=0.001, bandwidth=10e9,
        ...                  device_budget_bytes=2**30).overrides
        ['offload=none']
    """
    from hydra_offload.plan import plan_offload

    speed = _check_bandwidth(bandwidth)
    other = _check_seconds("other_seconds", other_seconds)
    budget = _check_bytes("device_budget_bytes", device_budget_bytes)
    activations = _check_bytes("activation_bytes", activation_bytes)
    if max_group_size is not None:
        _check_count("max_group_size", max_group_size, 1)
    paths = layers if layers is None or isinstance(layers, str) else tuple(layers)

    def prefetch_config(group: int, per_group: int, step: int) -> OffloadConfig:
        settings = PrefetchOffloadConfig(
            offload_group_size=group, offload_num_in_group=per_group, offload_prefetch_step=step
        )
        return OffloadConfig(offload_backend="prefetch", prefetch=settings, layers=paths)

    every = prefetch_config(1, 1, 1)
    full = plan_offload(model, every)
    sizes = [s.num_layers for s in full.stacks]
    seconds = _split_seconds(layer_seconds, sizes)
    baseline = _serial_sum(other, seconds)
    fixed = full.total_param_bytes + activations

    def suggestion(
        config: OffloadConfig, predicted: float, offloaded: int, pool: int
    ) -> Suggestion:
        return Suggestion(
            config=config,
            predicted_step_seconds=predicted,
            baseline_step_seconds=baseline,
            device_bytes=full.total_param_bytes - offloaded + pool + activations,
            offloaded_bytes=offloaded,
            pool_bytes=pool,
            device_budget_bytes=budget,
            total_param_bytes=full.total_param_bytes,
            activation_bytes=activations,
        )

    if fixed <= budget:
        return suggestion(OffloadConfig(), baseline, 0, 0)

    stacks = _stacks_of_plan(full)
    longest = max(sizes)
    max_group = longest if max_group_size is None else min(max_group_size, longest)
    prefix = [0.0]
    for stack_seconds in seconds:
        for value in stack_seconds:
            prefix.append(prefix[-1] + value)
    timing = _Timing(tuple(prefix), other, speed, baseline)
    fitting = _candidates(stacks, max_group, fixed, timing, budget=budget)
    if not fitting:
        everything = _candidates(stacks, max_group, fixed, timing, budget=None)
        raise ValueError(_nothing_fits(everything, budget, fixed, activations))

    times: dict[tuple[int, int, int], float] = {}

    def step_time(c: _Candidate) -> float:
        if c.order not in times:
            rings = [s.ring(chosen, c.step) for s, chosen in zip(stacks, c.chosen, strict=True)]
            times[c.order] = _run(
                rings, seconds, bandwidth=speed, other_seconds=other, forwards=_FORWARDS
            )
        return times[c.order]

    best = _pick(fitting, step_time)
    config = prefetch_config(best.group, best.per_group, best.step)
    plan = plan_offload(model, config)
    return suggestion(config, step_time(best), plan.offloaded_bytes, plan.pool_bytes)


def _nothing_fits(
    candidates: Sequence[_Candidate],
    budget: int,
    fixed: int,
    activations: int,
) -> str:
    need = f"the device budget of {budget / GIB:.2f} GiB ({budget:,} B)"
    if not candidates:
        return (
            f"no prefetch setting fits {need}: no setting saves device memory on this model "
            f"(it needs {fixed / GIB:.2f} GiB without offloading); raise device_budget_bytes "
            "or use offload=uva"
        )
    least = min(candidates, key=lambda c: (c.device_bytes, c.order))
    hints = ["raise device_budget_bytes"]
    if activations:
        hints.append(f"lower activation_bytes ({activations / GIB:.2f} GiB: a smaller batch)")
    hints.append("or use offload=uva (no buffer pool)")
    return (
        f"no prefetch setting fits {need}: the smallest device footprint reachable is "
        f"{least.device_bytes / GIB:.2f} GiB ({least.device_bytes:,} B, with "
        f"offload_group_size={least.group}, offload_num_in_group={least.per_group}, "
        f"offload_prefetch_step={least.step}); " + ", ".join(hints)
    )
