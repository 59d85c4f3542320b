"""Prefetch settings for a device-memory target, chosen by simulated step time.

:func:`suggest_prefetch` tries the settings (``offload_group_size`` G,
``offload_num_in_group`` K, ``offload_prefetch_step`` S) that fit a device budget, predicts
each one's step time with :func:`~hydra_offload.tuning.simulate.simulate_prefetch`, and
returns the fastest as a :class:`Suggestion`, with the Hydra overrides that select it. It is
pure: it plans with :func:`~hydra_offload.plan.plan_offload`, so a model built on the ``meta``
device is enough, and no device is needed.

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
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hydra_offload.config import OffloadConfig, PrefetchOffloadConfig
from hydra_offload.schedule import RingSchedule, ring_schedule, slots_by_step

if TYPE_CHECKING:
    from rich.console import RenderableType
    from rich.table import Table
    from torch import nn

    from hydra_offload.plan import OffloadPlan

from hydra_offload.tuning.simulate import (
    GIB,
    LayerSeconds,
    _check_bandwidth,
    _check_bytes,
    _check_count,
    _check_seconds,
    _run,
    _serial_sum,
    _split_seconds,
)

__all__ = ["Suggestion", "suggest_prefetch"]

_FORWARDS = 3
"""Forwards :func:`suggest_prefetch` simulates per candidate (the last one is reported)."""

_STEP_SLACK = 4
"""The grid tries ``offload_prefetch_step`` up to ``2 * offload_num_in_group + _STEP_SLACK``."""

_TIE = 0.01
"""Step times within this fraction of the fastest count as a tie, won by fewer device bytes."""


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
