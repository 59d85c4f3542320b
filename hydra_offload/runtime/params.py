"""Moving parameters between their home and host storage, and back, through their weight
adapters (:mod:`hydra_offload.weights`).

The parameter objects stay the same throughout (optimizers, tied weights and user references
keep working); only the tensors each one reads its values from change: its ``.data`` for a
plain tensor, the inner tensors of a tensor subclass, a quantized weight's state.

Example:
    >>> import torch
    >>> linear = torch.nn.Linear(2, 2)
    >>> weight, before = linear.weight, linear.weight.detach().clone()
    >>> from hydra_offload.runtime.device import DeviceRuntime
    >>> staged = stage_to_host(linear, ["weight"], DeviceRuntime(torch.device("cpu")))
    >>> staged.params[0].hosts[0].data_ptr() != before.data_ptr()
    True
    >>> restore(staged.params)
    >>> linear.weight is weight and torch.equal(linear.weight, before)
    True
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from hydra_offload.errors import OffloadError
from hydra_offload.runtime.device import DeviceRuntime
from hydra_offload.runtime.host import HostStorage
from hydra_offload.runtime.shared import NodeGroup, exchange
from hydra_offload.weights import ModulePatch, WeightAdapter, adapter_for

__all__ = [
    "MoveGuard",
    "OffloadedParam",
    "PickleGuard",
    "Staged",
    "point_at",
    "restore",
    "stage_to_host",
]


@dataclass
class OffloadedParam:
    """One parameter under offload: where its true weights live and where it came from."""

    name: str
    param: nn.Parameter
    hosts: list[torch.Tensor]
    """The true weights, in host storage: one tensor per part of the parameter (see
    :attr:`weights`), of the part's shape, stride and dtype."""
    home: torch.device
    """The device the parameter lived on before offloading; ``restore`` puts it back there."""
    weights: WeightAdapter
    """How the parameter's values are held and pointed at (one plain tensor, a tensor
    subclass's inner tensors, a quantized weight and its state)."""


@dataclass
class Staged:
    storage: HostStorage
    params: list[OffloadedParam]


def stage_to_host(
    model: nn.Module,
    names: Sequence[str],
    runtime: DeviceRuntime,
    params: dict[str, nn.Parameter] | None = None,
    node: NodeGroup | None = None,
    *,
    trainable_shared: bool = False,
) -> Staged:
    """Copy the values of ``model``'s parameters ``names`` (every part of each) into one new
    :class:`HostStorage` (page-locked for the runtime's device where it has one); the model
    is unchanged.

    With ``node`` (the processes of this node, :func:`~hydra_offload.runtime.shared.join_node`),
    the frozen parameters' values go to memory the node's processes share: the node's leader
    fills it, the others map it (a collective of the process group: every process of it
    calls this, with the same parameters); trainable ones too with ``trainable_shared`` (one
    process of the node steps each, see :mod:`hydra_offload.runtime.partition`), otherwise
    they stay in each process's own memory, as do weights a process may rewrite (a
    bitsandbytes 4-bit layer that may be repacked for the CPU).

    Raises:
        RuntimeError: host memory could not be allocated or page-locked (nothing is kept).
        OffloadError: with ``node``, a process of the group failed (every process raises).
    """
    if params is None:
        params = dict(model.named_parameters())
    adapters = [adapter_for(model, name, params[name], device=runtime.device) for name in names]
    counts = [len(adapter.layouts()) for adapter in adapters]
    shares = [
        node is not None
        and (trainable_shared or not params[name].requires_grad)
        and adapter.shareable
        for name, adapter in zip(names, adapters, strict=True)
    ]
    layouts = [layout for adapter in adapters for layout in adapter.layouts()]
    marks = [share for share, count in zip(shares, counts, strict=True) for _ in range(count)]
    try:
        storage = runtime.host_storage(layouts, shared=marks, node=node)
    except BaseException as err:
        if node is not None:  # the others wait in publish(): tell them, then raise
            with contextlib.suppress(OffloadError):
                exchange(node, None, f"allocating host memory failed: {err}")
        raise
    failure: BaseException | None = None
    try:
        position = 0
        for adapter, count, share in zip(adapters, counts, shares, strict=True):
            if not share or (node is not None and node.leader):
                views = [storage.view(i) for i in range(position, position + count)]
                adapter.write_to([v for v in views if v is not None])
            position += count
    except BaseException as err:
        if node is None:
            storage.free()
            raise
        failure = err
    problem = None if failure is None else f"copying weights to host memory failed: {failure}"
    try:
        runtime.publish(storage, problem)
    except BaseException as err:
        storage.free()
        if failure is not None:
            raise failure from err
        raise
    staged, position = [], 0
    for name, adapter, count in zip(names, adapters, counts, strict=True):
        hosts = storage.tensors[position : position + count]
        position += count
        param = params[name]
        staged.append(OffloadedParam(name, param, hosts, param.device, adapter))
    return Staged(storage, staged)


def point_at(entries: Sequence[tuple[OffloadedParam, Sequence[torch.Tensor]]]) -> None:
    """Make each parameter read its values from the given tensors (one per part)."""
    for entry, tensors in entries:
        entry.weights.use(tensors)


def restore(params: Sequence[OffloadedParam], device: torch.device | None = None) -> None:
    """Give each parameter its own memory again, values from the host, on ``device`` (by
    default the device it lived on before offloading)."""
    for entry in params:
        entry.weights.restore(entry.hosts, device or entry.home)


class MoveGuard:
    """Refuses ``.to()``, ``.cuda()``, ``.cpu()``, ``.half()``... that would move an offloaded
    parameter off the compute device or convert it, while the offload is active.

    Such a move would detach the parameter from the storage the offload serves it from (a
    pool slot, a zero-copy view, host memory): the layer would then compute with a stale copy.
    What a move does is judged on the compute device, whatever ``.data`` points at right now:
    between forwards an offloaded parameter may be its host tensor (UVA copy mode, prefetch
    after a backward), which ``.cpu()`` would leave as it is while moving everything else.
    So a move is refused unless it leaves a tensor of the parameter's dtype on the compute
    device as it is (``model.to(device)`` onto the compute device, ``.float()`` of a float
    model); the check runs on the module the call is made on, over every offloaded parameter
    below it, before anything is changed. A move that goes through leaves offloaded
    parameters and their gradients as they are (the offload keeps them where it serves them)
    and moves the rest.
    """

    def __init__(
        self, model: nn.Module, params: Sequence[OffloadedParam], compute: torch.device
    ) -> None:
        """``compute``: the device the offload serves the parameters on (whatever ``.data``
        points at between forwards: a pool slot, a zero-copy view, host memory)."""
        offloaded = {id(e.param): e for e in params}
        self.patches: list[ModulePatch] = []
        """The ``_apply`` each patched module has as its own attribute."""
        for module in model.modules():
            below = [offloaded[id(p)] for p in module.parameters() if id(p) in offloaded]
            if below:
                patch = partial(self._apply, below, compute, module._apply)
                self.patches.append(ModulePatch(module, "_apply", patch))

    @staticmethod
    def _apply(
        below: list[OffloadedParam],
        compute: torch.device,
        original: Any,
        fn: Any,
        *args: Any,
        **kw: Any,
    ) -> Any:
        for entry in below:
            problem = _move_problem(entry, fn, compute)
            if problem is not None:
                raise OffloadError(
                    f"{entry.name} is offloaded: moving or converting it (.to(), .cuda(), "
                    f".cpu(), .half(), ...) would detach it from its offloaded storage "
                    f"({problem}). Call remove() on the offload handle first (remove(device=...) "
                    "puts the offloaded weights on that device); nothing was changed"
                )
        future = [
            name
            for name in (
                "overwrite_module_params_on_conversion",
                "swap_module_params_on_conversion",
            )
            if getattr(torch.__future__, f"get_{name}")()
        ]
        if future:
            raise OffloadError(
                f"{below[0].name} is offloaded: with torch.__future__.set_{future[0]}(True), "
                "moving or converting a module replaces its parameter objects, even those it "
                "leaves where they are, which would detach them from the offload. Turn the "
                "flag off, or call remove() on the offload handle first; nothing was changed"
            )
        kept = {id(t): t for e in below for t in (e.param, e.param.grad) if t is not None}
        # This module's own offloaded parameters are hidden from the move (Module._apply
        # skips an entry that is None): it would otherwise swap a tensor subclass's
        # parameter with a new wrapper of itself (torch.utils.swap_tensors), which moves the
        # parameter's attributes (the offload's among them) to another object, even when
        # nothing changes. Its children hide theirs in their own _apply.
        module = original.__self__
        own = {
            key: param
            for key, param in module._parameters.items()
            if param is not None and kept.get(id(param)) is param
        }
        for key in own:
            module._parameters[key] = None
        try:
            return original(partial(_keeping, kept, fn), *args, **kw)
        finally:
            for key, param in own.items():
                module._parameters[key] = param

    def remove(self) -> None:
        for patch in self.patches:
            patch.remove()
        self.patches = []


def _move_problem(entry: OffloadedParam, fn: Any, compute: torch.device) -> str | None:
    """What ``fn`` (the function ``Module._apply`` maps over tensors) would do to the
    offloaded parameter ``entry``, served on ``compute``, that the offload cannot serve, or
    ``None`` when it leaves the parameter as the offload serves it.

    ``fn`` is first applied to an empty tensor of the parameter's dtype and dimensions on the
    compute device (no device memory is allocated): it must return that very tensor. Where
    a plain parameter's ``.data`` is on the compute device, ``fn`` must return it too (a
    memory format conversion may depend on the real shape). A tensor subclass or quantized
    weight is judged by its dtype and dimensions (its own ``.to()`` may make a new wrapper
    over the same inner tensors).
    """
    param = entry.param
    shape = (0,) * param.dim() if param.dim() else ()
    probe = torch.empty(shape, dtype=param.dtype, device=compute)
    try:
        with torch.no_grad():
            moved = fn(probe)
    except Exception as err:  # e.g. "Cannot copy out of meta tensor": a move all the same
        return f"a tensor on its compute device {probe.device} cannot be moved so: {err}"
    if moved is not probe:
        if isinstance(moved, torch.Tensor) and moved.device != probe.device:
            return f"it would go to {moved.device}, off its compute device {probe.device}"
        if isinstance(moved, torch.Tensor) and moved.dtype != probe.dtype:
            return f"it would become {moved.dtype} instead of {probe.dtype}"
        return f"it would be replaced by a new tensor on {probe.device}"
    data = param.data
    if type(data) is torch.Tensor and data.device == probe.device:
        with torch.no_grad():
            if fn(data) is not data:
                return f"it would be replaced by a new tensor on {probe.device}"
    return None


def _keeping(kept: dict[int, torch.Tensor], fn: Any, tensor: torch.Tensor) -> torch.Tensor:
    """``fn(tensor)``, except for the tensors in ``kept`` (offloaded parameters and their
    gradients, by ``id``), which stay as they are."""
    if kept.get(id(tensor)) is tensor:
        return tensor
    return fn(tensor)


_DDP_IGNORE = "_ddp_params_and_buffers_to_ignore"


class PickleGuard:
    """Makes pickling and copying an offloaded model give the plain model, with its true
    weights, while the offload is active.

    Left alone, pickling an offloaded module fails on the offload's hooks (they reach the
    handle, streams and weak references), and a prefetch parameter would carry whatever its
    pool slot holds, possibly another layer's weights. Python's ``pickle`` and ``copy``
    look ``__reduce_ex__`` and ``__deepcopy__`` up on the object itself before its class, so
    the guard gives, for as long as the offload is applied:

    - every offloaded parameter its own ``__reduce_ex__`` and ``__deepcopy__``. Both start
      from a copy of the parameter's true weights, taken from host storage after the device
      is synchronized (shape, strides and dtype as they are), in ordinary CPU memory: pickling
      never needs device memory, and the copy can be offloaded again as it is. Then they do
      what PyTorch does for any parameter: pickling gives a plain ``nn.Parameter`` with the
      same ``requires_grad`` and the parameter's own attributes, without hooks; a deep copy
      gives one of the same class. As with any parameter, ``.grad`` is not carried. A tied
      parameter is one object, so it is reduced once and stays tied in the copy.
    - every module that carries something of the offload's its own ``__reduce_ex__``: the
      module reduces as its class makes it reduce, with the offload's hooks (and their
      entries in the ``with_kwargs`` / ``always_called`` tables), the :class:`MoveGuard`
      patch and this override left out of its state; on the root module, the names of
      offloaded parameters that joined ``_ddp_params_and_buffers_to_ignore`` after the offload
      was applied (the Lightning callback's) are left out too.

    The live model is not changed by pickling. Every entry point goes through these:
    ``pickle``, ``torch.save`` (and so a Lightning checkpoint whose ``hyper_parameters`` hold
    a module), ``copy.deepcopy``; and ``copy.copy``, whose copy of a module is then plain as
    well (it shares the live model's parameters and submodules, so compute with the model,
    not with a shallow copy). Offloaded parameters in the result live in CPU memory and
    everything else where it was: move the copy (``.to(device)``) before running it on an
    accelerator. When the offload is removed the overrides go, and the model pickles as any
    model.
    """

    def __init__(
        self,
        model: nn.Module,
        params: Sequence[OffloadedParam],
        hooks: Sequence[RemovableHandle],
        runtime: DeviceRuntime,
        patches: Sequence[ModulePatch] = (),
    ) -> None:
        self._installed: list[tuple[Any, str, Any]] = []
        replaced: dict[int, dict[str, Any]] = {}
        for entry in params:
            weights = _TrueWeights(entry, runtime)
            self._set(entry.param, "__reduce_ex__", weights.reduce_ex)
            self._set(entry.param, "__deepcopy__", weights.deepcopy)
            substitutes = entry.weights.plain_module_state()
            if substitutes:
                replaced.setdefault(id(entry.weights.owner), {}).update(substitutes)
        # Which module owns each hook table our hooks are in.
        owner = {
            id(value): module
            for module in model.modules()
            for value in vars(module).values()
            if isinstance(value, dict)
        }
        hooks_of: dict[int, list[RemovableHandle]] = {}
        for handle in hooks:
            for ref in (handle.hooks_dict_ref, *handle.extra_dict_ref):
                table = ref()
                module = owner.get(id(table)) if table is not None else None
                if module is not None:
                    found = hooks_of.setdefault(id(module), [])
                    if handle not in found:
                        found.append(handle)
        patches_of: dict[int, list[Any]] = {}
        for patch in patches:
            patches_of.setdefault(id(patch.module), []).append(patch.value)
        offloaded = frozenset(entry.name for entry in params)
        before = getattr(model, _DDP_IGNORE, None)
        for module in model.modules():
            root = module is model
            if not (
                root or id(module) in hooks_of or id(module) in patches_of or id(module) in replaced
            ):
                continue
            reducer = _PlainModule(
                module,
                hooks_of.get(id(module), []),
                patches_of.get(id(module), []),
                (offloaded, None if before is None else frozenset(before)) if root else None,
                replaced.get(id(module), {}),
            )
            self._set(module, "__reduce_ex__", reducer)

    def _set(self, target: Any, name: str, value: Any) -> None:
        target.__dict__[name] = value
        self._installed.append((target, name, value))

    def remove(self) -> None:
        """Take the overrides off: the model pickles as it does without an offload."""
        for target, name, value in self._installed:
            if target.__dict__.get(name) is value:
                del target.__dict__[name]
        self._installed = []


class _TrueWeights:
    """``__reduce_ex__`` and ``__deepcopy__`` of one offloaded parameter (see
    :class:`PickleGuard`)."""

    __slots__ = ("hosts", "param", "runtime", "weights")

    def __init__(self, entry: OffloadedParam, runtime: DeviceRuntime) -> None:
        self.param = weakref.ref(entry.param)  # the parameter holds this object: no cycle
        self.hosts = entry.hosts
        self.weights = weakref.ref(entry.weights)
        self.runtime = runtime

    def _adapter(self) -> WeightAdapter:
        param, weights = self.param(), self.weights()
        if param is None or weights is None:  # only reachable through the parameter itself
            raise ReferenceError("the offloaded parameter no longer exists")
        return weights

    def _copies(self) -> list[torch.Tensor]:
        """The true weights, copied into ordinary CPU memory, strides kept."""
        # Device work may still write host storage (an optimizer step through zero-copy
        # views); copies out of it may still read it, which is fine.
        self.runtime.synchronize()
        copies = []
        for host in self.hosts:
            copy = self.runtime.to_host(host)
            if copy.stride() != host.stride():  # a layout clone() does not keep (gaps, overlap)
                exact = torch.empty_strided(
                    host.shape, host.stride(), dtype=host.dtype, device="cpu"
                )
                with torch.no_grad():
                    exact.copy_(copy)
                copy = exact
            copies.append(copy)
        return copies

    def reduce_ex(self, proto: int) -> Any:
        rebuilt = self._adapter().rebuild(self._copies())
        for key in _OVERRIDES:
            rebuilt.__dict__.pop(key, None)
        return rebuilt.__reduce_ex__(proto)  # exactly as PyTorch reduces a parameter

    def deepcopy(self, memo: dict[int, Any]) -> Any:
        return self._adapter().rebuild(self._copies(), memo)


_OVERRIDES = frozenset({"__reduce_ex__", "__deepcopy__"})


class _PlainModule:
    """``__reduce_ex__`` of a module that carries something of an offload's (see
    :class:`PickleGuard`): its class's reduction, with that left out of the state."""

    __slots__ = ("ddp", "hooks", "module", "patches", "substitutes")

    def __init__(
        self,
        module: nn.Module,
        hooks: list[RemovableHandle],
        patches: list[Any],
        ddp: tuple[frozenset[str], frozenset[str] | None] | None,
        substitutes: dict[str, Any] | None = None,
    ) -> None:
        self.module = weakref.ref(module)  # the module holds this object: no cycle
        self.hooks = hooks
        self.patches = patches
        self.ddp = ddp
        self.substitutes = substitutes or {}
        """Attributes whose value the copy takes from here (state a quantized weight's
        module keeps beside it: the weight's copy carries its own)."""
        """Root module only: (offloaded parameter names, DDP-ignored names before the
        offload, ``None`` when the attribute did not exist)."""

    def __call__(self, proto: int) -> Any:
        module = self.module()
        if module is None:
            raise ReferenceError("the offloaded module no longer exists")
        reduced = type(module).__reduce_ex__(module, proto)
        if isinstance(reduced, tuple) and len(reduced) > 2 and isinstance(reduced[2], dict):
            reduced = (*reduced[:2], self._plain(reduced[2]), *reduced[3:])
        return reduced

    def _plain(self, state: dict[str, Any]) -> dict[str, Any]:
        """A copy of a module's state without the offload's things (the module is unchanged:
        what is filtered is copied first)."""
        ours = [self, *self.patches]
        state = {k: v for k, v in state.items() if not any(v is o for o in ours)}
        for key, value in self.substitutes.items():
            if key in state:
                state[key] = value
        tables = {id(value): key for key, value in state.items() if isinstance(value, dict)}
        for handle in self.hooks:
            for ref in (handle.hooks_dict_ref, *handle.extra_dict_ref):
                table = ref()
                key = tables.get(id(table)) if table is not None else None
                if key is None or handle.id not in state[key]:
                    continue
                if state[key] is table:  # the module's own table: filter a copy
                    state[key] = type(table)(table)
                del state[key][handle.id]
        if self.ddp is not None and isinstance(state.get(_DDP_IGNORE), (list, tuple, set)):
            offloaded, before = self.ddp
            names = state[_DDP_IGNORE]
            kept = [n for n in names if n not in offloaded or (before and n in before)]
            if len(kept) != len(names):
                if kept or before is not None:
                    state[_DDP_IGNORE] = type(names)(kept)
                else:
                    del state[_DDP_IGNORE]
        return state
