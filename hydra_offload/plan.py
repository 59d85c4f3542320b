"""Planning: which parameters go to host memory, and what that costs and saves on the device.

:func:`plan_offload` is a pure function of the model's structure and the config. It reads
names, shapes, strides and dtypes only, never tensor data, so it works on a model built on
the ``meta`` device; the result, an immutable :class:`OffloadPlan`, is what the backends
execute and what users see as a table.

Example:
    >>> import torch
    >>> from hydra_offload import OffloadConfig, plan_offload
    >>> from hydra_offload.models import DecoderLM
    >>> with torch.device("meta"):
    ...     model = DecoderLM(num_layers=8)
    >>> cfg = OffloadConfig(prefetch={"offload_group_size": 4, "offload_num_in_group": 1})
    >>> plan = plan_offload(model, cfg)
    >>> plan.backend, plan.layers, plan.stacks[0].offloaded_layers
    ('prefetch', ('layers',), (3, 7))
    >>> plan.device_bytes_saved == plan.offloaded_bytes - plan.pool_bytes
    True
"""

from __future__ import annotations

import textwrap
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from hydra_offload._format import format_bytes, format_indices
from hydra_offload._warnings import warn_at_caller
from hydra_offload.config import OffloadConfig, ResolvedBackend, to_offload_config
from hydra_offload.selection import matches_any, unmatched_patterns
from hydra_offload.stacks import (
    LayerStack,
    StackCandidate,
    StackChoice,
    child_classes,
    class_name,
    find_layer_stacks,
)
from hydra_offload.weights import Layout, WeightsInfo, describe

__all__ = [
    "MIN_SAVED_FRACTION",
    "OffloadPlan",
    "OffloadPlanWarning",
    "PlanDescription",
    "PlannedParam",
    "PoolSlot",
    "StackPlan",
    "plan_offload",
]

GIB = 1024**3

MIN_SAVED_FRACTION = 0.05
"""A prefetch plan that saves less than this share of the model's parameter bytes on the
device warns (:class:`OffloadPlanWarning`) and says so in its notes."""


class OffloadPlanWarning(UserWarning):
    """The plan is valid but probably not what was meant: a pattern matched nothing, the
    auto-detected layer stack mixes layers of different classes, or the plan saves less than
    :data:`MIN_SAVED_FRACTION` of the model's parameter bytes on the device."""


@dataclass(frozen=True)
class PlannedParam:
    """One parameter that moves to host memory."""

    name: str
    """Fully qualified name, as ``model.named_parameters()`` gives it."""
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    """Bytes of its parts: what it takes in host memory (for a quantized weight, its
    quantized values and their quantization state)."""
    parts: tuple[Layout, ...] = ()
    """``(shape, stride, dtype)`` of each plain tensor that holds its values (see
    :mod:`hydra_offload.weights`): one, its own layout, for a plain tensor; ``()``: that
    one."""
    kind: str = "tensor"
    """What it is: ``"tensor"``, a tensor subclass's name (``"Int8Tensor"``),
    ``"bitsandbytes 4-bit"``..."""
    stack: str | None = None
    """Prefetch: path of the stack the parameter's layer belongs to."""
    layer: int | None = None
    """Prefetch: index of the layer in its stack."""
    local_name: str | None = None
    """Prefetch: name inside the layer (``mlp.down_proj.weight``)."""
    slot: int | None = None
    """Prefetch: which of its pool entry's slots the layer's copy goes to."""

    @property
    def layouts(self) -> tuple[Layout, ...]:
        """The layout of each of its parts."""
        return self.parts or ((self.shape, self.stride, self.dtype),)

    @property
    def slot_key(self) -> tuple[Any, ...] | None:
        """Prefetch: the pool entry this parameter shares with the other layers."""
        if self.local_name is None:
            return None
        return (self.local_name, self.shape, self.stride, self.dtype, self.layouts)


@dataclass(frozen=True)
class PoolSlot:
    """One entry of a stack's static device buffer pool: ``count`` tensors of one kind."""

    stack: str
    local_name: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    """Bytes of one slot."""
    count: int
    parts: tuple[Layout, ...] = ()
    """The layouts of the tensors of one slot: one per part of its parameters (see
    :attr:`PlannedParam.parts`); ``()``: one, ``(shape, stride, dtype)``."""

    @property
    def layouts(self) -> tuple[Layout, ...]:
        """The layout of each tensor of one slot."""
        return self.parts or ((self.shape, self.stride, self.dtype),)

    @property
    def total_bytes(self) -> int:
        return self.nbytes * self.count


@dataclass(frozen=True)
class StackPlan:
    """What happens to one layer stack under the prefetch backend."""

    path: str
    num_layers: int
    offloaded_layers: tuple[int, ...]
    """Indices of the layers with at least one parameter offloaded, in stack order."""
    offloaded_bytes: int
    pool_bytes: int


@dataclass(frozen=True)
class OffloadPlan:
    """What a backend will do to a model: immutable, computed without touching weights.

    Attributes:
        backend: ``"none"``, ``"uva"`` or ``"prefetch"``.
        config_hash: :meth:`OffloadConfig.compute_hash` of the config that made the plan.
        layers: the stack path(s) used (prefetch only).
        params: the offloaded parameters, in ``named_parameters()`` order.
        stacks: per-stack figures (prefetch only).
        pool: the static device buffer pool entries (prefetch only).
        candidates: module lists considered by auto-detection, with the decision on each.
        total_param_bytes: bytes of all the model's parameters (shared ones once).
        budget_bytes: UVA's byte budget, ``int(cpu_offload_gb * 1024**3)``.
        notes: things worth knowing about the plan (also shown by :meth:`summary`).

    Example:
        >>> import torch
        >>> from hydra_offload import OffloadConfig, plan_offload
        >>> plan = plan_offload(torch.nn.Linear(4, 4), OffloadConfig(uva={"cpu_offload_gb": 1}))
        >>> plan.offloaded_params, plan.offloaded_bytes
        (('weight', 'bias'), 80)
    """

    backend: ResolvedBackend
    config_hash: str
    layers: tuple[str, ...]
    params: tuple[PlannedParam, ...]
    stacks: tuple[StackPlan, ...]
    pool: tuple[PoolSlot, ...]
    candidates: tuple[StackCandidate, ...]
    total_param_bytes: int
    budget_bytes: int | None
    notes: tuple[str, ...]

    @property
    def offloaded_params(self) -> tuple[str, ...]:
        """Fully qualified names of the offloaded parameters."""
        return tuple(p.name for p in self.params)

    @property
    def offloaded_bytes(self) -> int:
        """Bytes of parameters kept in host memory."""
        return sum(p.nbytes for p in self.params)

    @property
    def pool_bytes(self) -> int:
        """Bytes of the static device buffer pool (0 for UVA and none)."""
        return sum(slot.total_bytes for slot in self.pool)

    @property
    def device_bytes_saved(self) -> int:
        """Parameter bytes no longer resident on the device: offloaded bytes minus the pool."""
        return self.offloaded_bytes - self.pool_bytes

    def describe(self) -> PlanDescription:
        """The plan as labelled text: what :meth:`summary` prints and the rich table of
        :func:`hydra_offload.render.render_plan` shows, from one source.

        Example:
            >>> import torch
            >>> from hydra_offload import plan_offload
            >>> plan = plan_offload(torch.nn.Linear(4, 4), {"uva": {"cpu_offload_gb": 1}})
            >>> plan.describe().rows[0]
            ('backend', 'uva')
        """
        rows: list[tuple[str, str]] = [("backend", self.backend)]
        if self.backend == "uva" and self.budget_bytes is not None:
            rows.append(("budget (cpu_offload_gb)", format_bytes(self.budget_bytes)))
        for stack in self.stacks:
            label = stack.path or "<root>"
            rows.append(
                (
                    f"layer stack {label!r}",
                    f"{len(stack.offloaded_layers)} of {stack.num_layers} layers offloaded: "
                    f"{format_indices(stack.offloaded_layers)}",
                )
            )
        total = self.total_param_bytes
        rows.append(("parameters offloaded", f"{len(self.params):,}"))
        rows.append(
            (
                "bytes in host memory",
                format_bytes(self.offloaded_bytes) + _share(self.offloaded_bytes, total),
            )
        )
        if self.backend == "prefetch":
            rows.append(("device buffer pool", format_bytes(self.pool_bytes)))
        rows.append(
            (
                "device bytes saved",
                format_bytes(self.device_bytes_saved) + _share(self.device_bytes_saved, total),
            )
        )
        rows.append(("model parameter bytes", format_bytes(total)))
        candidates = tuple(
            (
                c.display_path,
                c.class_share,
                f"{c.param_bytes:,}",
                ("chosen: " if c.chosen else "rejected: ") + c.reason,
            )
            for c in self.candidates
        )
        return PlanDescription(
            title=f"Offload plan: {self.backend}  (config {self.config_hash[:12]})",
            rows=tuple(rows),
            candidates=candidates,
            notes=self.notes,
        )

    def summary(self, width: int = 100) -> str:
        """The plan as plain text (what the Lightning callback logs and writes to
        ``offload_plan.txt``); notes are wrapped at ``width`` columns.

        Example:
            >>> import torch
            >>> from hydra_offload import plan_offload
            >>> print(plan_offload(torch.nn.Linear(4, 4), {}).summary(), end="")
            Offload plan: none  (config ...)
              backend                none
              parameters offloaded   0
              bytes in host memory   0 B = 0.0% of the model
              device bytes saved     0 B = 0.0% of the model
              model parameter bytes  80 B
        """
        return self.describe().text(width)


@dataclass(frozen=True)
class PlanDescription:
    """An :class:`OffloadPlan` as labelled text, for any renderer (plain text, rich)."""

    title: str
    rows: tuple[tuple[str, str], ...]
    """``(what, value)`` pairs, in display order."""
    candidates: tuple[tuple[str, str, str, str], ...]
    """Layer stack auto-detection: one row per candidate, under :attr:`CANDIDATE_COLUMNS`."""
    notes: tuple[str, ...]

    CANDIDATE_COLUMNS: ClassVar[tuple[str, str, str, str]] = (
        "module list",
        "layer class",
        "parameter bytes",
        "decision",
    )
    CANDIDATES_TITLE: ClassVar[str] = "Layer stack auto-detection"

    def text(self, width: int = 100) -> str:
        """Aligned plain-text columns; notes wrapped at ``width``."""
        lines = [self.title]
        label = max(len(what) for what, _ in self.rows)
        lines += [f"  {what:<{label}}  {value}" for what, value in self.rows]
        if self.candidates:
            lines += ["", self.CANDIDATES_TITLE]
            table = [self.CANDIDATE_COLUMNS, *self.candidates]
            widths = [max(len(row[i]) for row in table) for i in range(3)]
            lines += [
                "  "
                + "  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths, strict=True))
                + "  "
                + row[3]
                for row in table
            ]
        for note in self.notes:
            lines += textwrap.wrap(f"note: {note}", width=max(width, 20), subsequent_indent="  ")
        return "\n".join(lines) + "\n"


def _share(part: int, whole: int) -> str:
    return f" = {100 * part / whole:.1f}% of the model" if whole else ""


def plan_offload(
    model: nn.Module, config: OffloadConfig | Any, *, device: torch.device | str | None = None
) -> OffloadPlan:
    """Plan the offload of ``model`` under ``config`` without touching any weight.

    Args:
        model: any ``nn.Module``; it may live on the ``meta`` device.
        config: an :class:`OffloadConfig`, or anything :func:`~hydra_offload.to_offload_config`
            accepts (a ``DictConfig`` or a ``dict``).
        device: the compute device, when known; ``None``: each parameter's own device. Only
            weight formats whose layout depends on where they compute read it (a
            bitsandbytes 4-bit layer may repack itself on a CPU: its state is planned for
            both forms there).

    Quantized weights (torchao's tensor subclasses, bitsandbytes' 4-bit and 8-bit weights)
    are planned by their true bytes, quantization state included (see
    :mod:`hydra_offload.weights`). The weights of PEFT adapters (LoRA's ``lora_A`` /
    ``lora_B`` and the like, in any module with a ``base_layer`` and
    ``adapter_layer_names``) are never offloaded: they are small, they train, and PEFT adds
    and removes them; the plan notes how many stay on the device.

    Returns:
        The plan. An :class:`OffloadPlanWarning`, also listed in ``plan.notes``, for each of:
        a pattern in ``cpu_offload_params`` / ``offload_params`` that matches no parameter;
        under prefetch, an auto-detected layer stack whose children are of different
        classes, and a plan that saves less than :data:`MIN_SAVED_FRACTION` of the model's
        parameter bytes on the device.

    Raises:
        hydra_offload.stacks.LayerStackError: prefetch with a ``layers`` entry that selects
            nothing to offload (no such path, not a module list, an empty one, or one whose
            layers hold no parameter of their own), or no layer stack found by
            auto-detection. Paths are read through ``torch.compile`` wrappers.
        hydra_offload.OffloadConfigError: ``config`` is not a valid configuration.

    Example:
        >>> import torch
        >>> from hydra_offload import plan_offload
        >>> plan = plan_offload(torch.nn.Linear(4, 4), {"offload_backend": "auto"})
        >>> plan.backend, plan.offloaded_params
        ('none', ())
    """
    config = to_offload_config(config)
    aliases = _aliases(model)
    where = torch.device(device) if device is not None else None
    weights = {p: describe(model, names[0], p, device=where) for p, names in aliases.items()}
    total = sum(w.nbytes for w in weights.values())
    adapters = _peft_adapter_params(model)
    backend = config.resolved_backend
    common: dict[str, Any] = {
        "backend": backend,
        "config_hash": config.compute_hash(),
        "total_param_bytes": total,
    }
    if backend == "uva":
        return _plan_uva(config, aliases, weights, adapters, common)
    if backend == "prefetch":
        return _plan_prefetch(model, config, aliases, weights, adapters, common)
    return OffloadPlan(
        layers=(), params=(), stacks=(), pool=(), candidates=(), budget_bytes=None,
        notes=(), **common,
    )  # fmt: skip


def _peft_adapter_params(model: nn.Module) -> dict[nn.Parameter, str]:
    """The parameters of PEFT adapters (tuner layers: modules with a ``base_layer`` and
    ``adapter_layer_names``), each with the name of its adapter module (``lora_A``)."""
    found: dict[nn.Parameter, str] = {}
    for module in model.modules():
        names = getattr(module, "adapter_layer_names", None)
        if not isinstance(names, (tuple, list)) or not hasattr(module, "base_layer"):
            continue
        for layer_name in names:
            layer = getattr(module, layer_name, None)
            if isinstance(layer, nn.Module):
                for param in layer.parameters():
                    found.setdefault(param, layer_name)
    return found


def _peft_note(kept: int) -> tuple[str, ...]:
    if not kept:
        return ()
    return (
        f"{kept} parameter(s) of PEFT adapters (e.g. LoRA's lora_A / lora_B) stay on the "
        "device: adapters are never offloaded",
    )


def _aliases(model: nn.Module) -> dict[nn.Parameter, list[str]]:
    """Each distinct parameter, in ``named_parameters()`` order, with every name it is
    registered under; the first is its canonical name (tied parameters have several)."""
    aliases: dict[nn.Parameter, list[str]] = defaultdict(list)
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases[param].append(name)
    return dict(aliases)


def _selected(patterns: frozenset[str], names: list[str]) -> bool:
    """Whether a parameter known under ``names`` is selected by ``patterns``."""
    return any(matches_any(patterns, name) for name in names)


def _planned(name: str, param: torch.Tensor, weights: WeightsInfo, **where: Any) -> PlannedParam:
    return PlannedParam(
        name=name,
        shape=tuple(param.shape),
        stride=tuple(param.stride()),
        dtype=param.dtype,
        nbytes=weights.nbytes,
        parts=weights.parts,
        kind=weights.kind,
        **where,
    )


def _warn_unmatched(
    field: str, patterns: frozenset[str], aliases: dict[nn.Parameter, list[str]]
) -> tuple[str, ...]:
    missing = unmatched_patterns(patterns, (n for names in aliases.values() for n in names))
    if not missing:
        return ()
    note = (
        f"{field}: {', '.join(repr(p) for p in missing)} matched no parameter; patterns are "
        "whole dot-separated name segments ('experts' matches 'mlp.experts.w2_weight', "
        "'expert' does not)"
    )
    warn_at_caller(note, OffloadPlanWarning)
    return (note,)


def _plan_uva(
    config: OffloadConfig,
    aliases: dict[nn.Parameter, list[str]],
    weights: dict[nn.Parameter, WeightsInfo],
    adapters: dict[nn.Parameter, str],
    common: dict[str, Any],
) -> OffloadPlan:
    budget = int(config.uva.cpu_offload_gb * GIB)
    patterns = config.uva.cpu_offload_params
    notes = list(_warn_unmatched("offload.uva.cpu_offload_params", patterns, aliases))
    eligible = [
        (p, names[0])
        for p, names in aliases.items()
        if _selected(patterns, names) and p not in adapters
    ]
    notes += _peft_note(sum(1 for p, names in aliases.items() if p in adapters))
    chosen: list[PlannedParam] = []
    used = 0
    for param, name in eligible:
        if used >= budget:
            break
        chosen.append(_planned(name, param, weights[param]))
        used += chosen[-1].nbytes
    if budget == 0:
        notes.append("offload.uva.cpu_offload_gb is 0: nothing is offloaded")
    elif eligible and used < budget:
        notes.append(
            f"the budget ({budget:,} bytes) exceeds what can be offloaded; all "
            f"{used:,} eligible parameter bytes go to host memory"
        )
    return OffloadPlan(
        layers=(), params=tuple(chosen), stacks=(), pool=(), candidates=(),
        budget_bytes=budget, notes=tuple(notes), **common,
    )  # fmt: skip


def _plan_prefetch(
    model: nn.Module,
    config: OffloadConfig,
    aliases: dict[nn.Parameter, list[str]],
    weights: dict[nn.Parameter, WeightsInfo],
    adapters: dict[nn.Parameter, str],
    common: dict[str, Any],
) -> OffloadPlan:
    settings = config.prefetch
    group, per_group, step = (
        settings.offload_group_size,
        settings.offload_num_in_group,
        settings.offload_prefetch_step,
    )
    choice = find_layer_stacks(model, config.layer_paths)
    notes = [
        f"offload.layers: {stack.entry!r} resolves to {stack.path!r}, the path its "
        "parameters are named under"
        for stack in choice.stacks
        if stack.entry is not None and stack.entry != stack.path
    ]
    shared_noted: set[nn.Parameter] = set()
    kept_adapters: set[nn.Parameter] = set()
    planned: list[PlannedParam] = []
    stack_plans: list[StackPlan] = []
    pool: list[PoolSlot] = []
    for stack in choice.stacks:
        layers = list(stack.module)
        chosen = [i for i in range(len(layers)) if i % group >= group - per_group]
        by_layer: list[tuple[int, list[PlannedParam]]] = []
        for index in chosen:
            prefix = stack.qualified(index)
            params = []
            for local, param in layers[index].named_parameters():
                name = aliases[param][0]
                if param in adapters:
                    kept_adapters.add(param)
                    continue
                if not _selected(settings.offload_params, aliases[param]):
                    continue
                if any(not _inside(alias, prefix) for alias in aliases[param]):
                    if param not in shared_noted:
                        shared_noted.add(param)
                        notes.append(
                            f"{name} stays on the device: it is registered as "
                            f"{', '.join(aliases[param])}, not inside one layer"
                        )
                    continue
                params.append(_planned(name, param, weights[param], stack=stack.path,
                                       layer=index, local_name=local))  # fmt: skip
            if params:
                by_layer.append((index, params))
        stack_params, stack_pool = _assign_slots(stack, by_layer, step)
        planned += stack_params
        pool += stack_pool
        stack_plans.append(
            StackPlan(
                path=stack.path,
                num_layers=len(layers),
                offloaded_layers=tuple(index for index, _ in by_layer),
                offloaded_bytes=sum(p.nbytes for p in stack_params),
                pool_bytes=sum(s.total_bytes for s in stack_pool),
            )
        )
        if not chosen:
            notes.append(
                f"{stack.path or '<root>'} has {len(layers)} layers, fewer than "
                f"offload_group_size ({group}): none is offloaded"
            )
    notes += _peft_note(len(kept_adapters))
    unmatched = _warn_unmatched("offload.prefetch.offload_params", settings.offload_params, aliases)
    notes += unmatched
    if settings.offload_params and not planned and not unmatched:
        notes.append(
            "offload.prefetch.offload_params matches no parameter of the offloaded layers: "
            "nothing is offloaded"
        )
    if step < per_group:
        notes.append(
            f"offload_prefetch_step ({step}) < offload_num_in_group ({per_group}): adjacent "
            "offloaded layers have no compute between them to hide their copies; "
            f"offload_prefetch_step={per_group} or more is recommended"
        )
    offloaded = sum(p.nbytes for p in planned)
    pool_bytes = sum(s.total_bytes for s in pool)
    if offloaded and offloaded == pool_bytes:
        notes.append(
            "the device buffer pool holds every offloaded layer at once, so no device memory "
            "is saved: lower offload_prefetch_step or offload_group_size, or offload more "
            "layers"
        )
    notes += _warn_mixed_stack(choice, stack_plans)
    if offloaded:
        notes += _warn_low_saving(offloaded, pool_bytes, common["total_param_bytes"])
    order = {names[0]: i for i, names in enumerate(aliases.values())}
    planned.sort(key=lambda p: order[p.name])
    return OffloadPlan(
        layers=tuple(s.path for s in choice.stacks), params=tuple(planned),
        stacks=tuple(stack_plans), pool=tuple(pool), candidates=choice.candidates,
        budget_bytes=None, notes=tuple(notes), **common,
    )  # fmt: skip


def _counts(classes: Counter[str]) -> str:
    return ", ".join(f"{count} {name}" for name, count in classes.most_common())


def _warn_mixed_stack(choice: StackChoice, stack_plans: list[StackPlan]) -> tuple[str, ...]:
    """Warn when auto-detection chose a module list whose children are of several classes:
    layers are picked by position, so what is offloaded is whatever sits there."""
    chosen = next((c for c in choice.candidates if c.chosen), None)
    if chosen is None or not chosen.mixed:
        return ()
    stack, stack_plan = choice.stacks[0], stack_plans[0]
    others = child_classes(stack.module)
    del others[chosen.layer_class]
    layers = list(stack.module)
    offloaded = Counter(class_name(layers[i]) for i in stack_plan.offloaded_layers)
    picked = (
        f"this offloads {_counts(offloaded)} (layers "
        f"{', '.join(str(i) for i in stack_plan.offloaded_layers)})"
        if offloaded
        else "this offloads none of them"
    )
    keep = f", or to {stack.path!r} to keep this stack without this warning" if stack.path else ""
    note = (
        f"offload.layers: the auto-detected layer stack {chosen.display_path!r} is mixed: "
        f"{chosen.same_class} of its {chosen.num_children} children are {chosen.layer_class}, "
        f"the others {_counts(others)}; layers are offloaded by position, so {picked}. Set "
        f"offload.layers to the path of the model's repeated blocks{keep}"
    )
    warn_at_caller(note, OffloadPlanWarning)
    return (note,)


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%"


def _warn_low_saving(offloaded: int, pool_bytes: int, total: int) -> tuple[str, ...]:
    """Warn when the plan saves less than :data:`MIN_SAVED_FRACTION` of ``total``."""
    saved = offloaded - pool_bytes
    if not total or saved >= MIN_SAVED_FRACTION * total:
        return ()
    if offloaded < MIN_SAVED_FRACTION * total:
        why = (
            f"the offloaded layers hold only {offloaded:,} B ({_percent(offloaded, total)}): "
            "check that offload.layers names the model's repeated blocks, or offload more "
            "layers (offload_group_size, offload_num_in_group)"
        )
    else:
        why = (
            f"the device buffer pool ({pool_bytes:,} B: offload_prefetch_step slots for each "
            "distinct name, shape and dtype in the offloaded layers) takes back "
            f"{_percent(pool_bytes, offloaded)} of the {offloaded:,} B offloaded: lower "
            "offload_prefetch_step, offload more layers, or check that offload.layers names the "
            "model's repeated blocks"
        )
    note = (
        f"the plan saves {saved:,} B of device memory, {_percent(saved, total)} of the model's "
        f"{total:,} parameter bytes, below the {MIN_SAVED_FRACTION:.0%} under which "
        f"hydra-offload warns (hydra_offload.plan.MIN_SAVED_FRACTION); {why}"
    )
    warn_at_caller(note, OffloadPlanWarning)
    return (note,)


def _inside(name: str, prefix: str) -> bool:
    return not prefix or name.startswith(prefix + ".")


def _assign_slots(
    stack: LayerStack, by_layer: list[tuple[int, list[PlannedParam]]], step: int
) -> tuple[list[PlannedParam], list[PoolSlot]]:
    """Give the j-th offloaded layer slot ``j % step`` of each of its pool entries.

    Each entry (name inside the layer, shape, stride, dtype) gets as many slots as the
    distinct positions its layers use: ``step`` at most, fewer when fewer layers share it.
    """
    positions: dict[tuple[Any, ...], set[int]] = defaultdict(set)
    sample: dict[tuple[Any, ...], PlannedParam] = {}
    assigned: list[PlannedParam] = []
    for ordinal, (_, params) in enumerate(by_layer):
        for param in params:
            key = param.slot_key
            positions[key].add(ordinal % step)
            sample.setdefault(key, param)
    compact = {key: sorted(pos) for key, pos in positions.items()}
    for ordinal, (_, params) in enumerate(by_layer):
        for param in params:
            slot = compact[param.slot_key].index(ordinal % step)
            assigned.append(_with_slot(param, slot))
    pool = [
        PoolSlot(
            stack=stack.path,
            local_name=p.local_name or "",
            shape=p.shape,
            stride=p.stride,
            dtype=p.dtype,
            nbytes=p.nbytes,
            count=len(compact[key]),
            parts=p.parts,
        )
        for key, p in sample.items()
    ]
    return assigned, pool


def _with_slot(param: PlannedParam, slot: int) -> PlannedParam:
    from dataclasses import replace

    return replace(param, slot=slot)
