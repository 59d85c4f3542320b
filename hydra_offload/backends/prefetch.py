"""The prefetch backend: offloaded layers' weights stream through a static device pool.

Each offloaded parameter's ``.data`` points at a slot of the :class:`BufferPool` for the whole
offload. Per layer stack, a ring walks the offloaded layers: when offloaded layer ``j``
finishes, the copy of offloaded layer ``(j + step) mod n`` into the slots ``j`` just used is
queued on the copy stream, after an event that marks the end of ``j``'s compute. Before a
layer computes, the compute stream waits (on the device, never on the host) for the event
that ends that layer's copy.

Every slot records which layer it holds. A layer whose slots hold anything else when it is
called (layers skipped, called twice, out of order, after a forward that raised) loads its
weights on demand first, and ``stats.stalls`` counts it. Nothing depends on layers running
in registration order.

``state_dict()`` reports the true weights from host storage and ``load_state_dict()`` writes
into host storage, so checkpoints never see a slot's contents.

Training works, correctly if not yet fast: while autograd records an offloaded layer, what it
saves of the layer's weights is a reference to their host copy, fetched back when backward
needs it (a slot would hold another layer's weights by then); and an optimizer step updates
offloaded parameters in host storage, their gradients copied there first, after which the
slots reload.
"""

from __future__ import annotations

from collections import defaultdict
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)
from torch.utils.hooks import RemovableHandle

from hydra_offload.plan import OffloadPlan
from hydra_offload.runtime import BufferPool, DeviceRuntime, Slot, ops
from hydra_offload.runtime.counters import Counters
from hydra_offload.runtime.params import (
    OffloadedParam,
    Staged,
    point_at,
    restore,
    stage_to_host,
)
from hydra_offload.runtime.timing import WaitTimer

__all__ = ["PrefetchOffload"]


class _Layer:
    """An offloaded layer: the (slot, host tensor) pairs its load copies."""

    __slots__ = (
        "copies", "grad_hooks", "hosts", "nbytes", "next_users", "ready", "recording", "slots",
    )  # fmt: skip

    def __init__(self, copies: list[tuple[Slot, torch.Tensor]]) -> None:
        self.copies = copies
        self.slots = [slot for slot, _ in copies]
        self.hosts = {slot.tensor.untyped_storage().data_ptr(): host for slot, host in copies}
        """Which host tensor holds this layer's true weights for each slot's storage."""
        self.grad_hooks: Any = None
        """The layer's saved-tensor hooks (made once by its ring, entered per forward)."""
        self.recording = False
        self.nbytes = sum(host.numel() * host.element_size() for _, host in copies)
        self.ready: Any = None
        self.next_users: list[_Layer] = []
        """The layers that use this layer's slots next, in ring order: what to prefetch
        once this layer is done."""


class _Ring:
    """The offloaded layers of one stack, in stack order, and their prefetch schedule.

    Layer ``j`` uses slot position ``j % step`` (see the plan), so the next user of the
    slots ``j`` frees is offloaded layer ``j + step``, wrapping around at the end of the
    stack: the copy for the next forward starts during this one.
    """

    def __init__(
        self,
        layers: list[_Layer],
        runtime: DeviceRuntime,
        copy_stream: Any,
        counters: Counters,
    ) -> None:
        self.layers = layers
        for layer in layers:
            layer.grad_hooks = torch.autograd.graph.saved_tensors_hooks(
                partial(self._pack, layer), self._unpack
            )
        self.timer = WaitTimer(runtime.device, len(layers)) if runtime.is_cuda else None
        self.ring_id = ops.register_ring(self)
        self.runtime = runtime
        self.copy_stream = copy_stream
        self.counters = counters
        users: dict[int, list[int]] = defaultdict(list)
        for position, layer in enumerate(layers):
            for slot in layer.slots:
                users[id(slot)].append(position)
        for position, layer in enumerate(layers):
            following: list[_Layer] = []
            for slot in layer.slots:
                order = users[id(slot)]
                nxt = layers[order[(order.index(position) + 1) % len(order)]]
                if nxt is not layer and nxt not in following:
                    following.append(nxt)
            layer.next_users = following

    @staticmethod
    def holds(layer: _Layer) -> bool:
        return all(slot.owner is layer for slot in layer.slots)

    @staticmethod
    def can_fill(layer: _Layer) -> bool:
        """Whether loading ``layer`` now overwrites nothing a pending layer still needs."""
        return all(s.owner is None or s.owner is layer or s.used for s in layer.slots)

    def load(self, layer: _Layer) -> None:
        """Queue the copy of ``layer``'s weights into its slots on the copy stream."""
        stream = self.copy_stream
        with stream:
            for slot in layer.slots:
                if slot.free is not None:
                    stream.wait_event(slot.free)  # compute is done with the old contents
            for slot, host in layer.copies:
                slot.tensor.copy_(host, non_blocking=True)
            ready = stream.record_event()
        for slot in layer.slots:
            slot.owner = layer
            slot.ready = ready
            slot.used = False
        layer.ready = ready
        self.counters.loads += 1
        self.counters.h2d_bytes += layer.nbytes

    def before(self, position: int, module: nn.Module, args: Any, kwargs: Any) -> None:
        """Forward pre-hook of offloaded layer ``position``.

        Compiled without gradients, the step is a custom operator (see :mod:`runtime.ops`),
        so the graph has no break. With gradients, the step must also swap what autograd
        saves (``saved_tensors_hooks``), which the compiler does not trace: the graph breaks
        there and the step runs eagerly.
        """
        if torch.compiler.is_compiling() and not torch.is_grad_enabled():
            anchor = ops.first_tensor((args, kwargs))
            if anchor is not None:
                ops.layer_begin(anchor, self.ring_id, position)
                return
            torch._dynamo.graph_break()  # nothing to order the weights' reads after
        self.begin(position)

    def after(self, position: int, module: nn.Module, args: Any, output: Any) -> None:
        """Forward hook of offloaded layer ``position`` (also called when it raised)."""
        if torch.compiler.is_compiling() and not torch.is_grad_enabled():
            anchor = ops.first_tensor(output)
            if anchor is not None:
                ops.layer_end(anchor, self.ring_id, position)
                return
            torch._dynamo.graph_break()
        self.end(position)

    def begin(self, position: int) -> None:
        """Make the compute stream wait for the layer's weights, loading them if needed."""
        layer = self.layers[position]
        if not self.holds(layer):
            self.counters.stalls += 1
            self.load(layer)
        if self.timer is None:
            self.runtime.current_stream().wait_event(layer.ready)
        else:
            self.timer.wait(position, self.runtime.current_stream(), layer.ready)
        if torch.is_grad_enabled():
            # Autograd would keep the slot itself for backward, and by then the slot holds
            # another layer's weights: save a reference to the host copy instead.
            layer.grad_hooks.__enter__()
            layer.recording = True

    def end(self, position: int) -> None:
        """Mark the layer's slots free after its compute and start the next copies."""
        layer = self.layers[position]
        if layer.recording:
            layer.grad_hooks.__exit__(None, None, None)
            layer.recording = False
        done = self.runtime.current_stream().record_event()
        for slot in layer.slots:
            slot.free = done
            slot.used = True
        for upcoming in layer.next_users:
            if not self.holds(upcoming) and self.can_fill(upcoming):
                self.load(upcoming)

    def _pack(self, layer: _Layer, tensor: torch.Tensor) -> Any:
        if tensor.device == self.runtime.device and tensor.layout == torch.strided:
            host = layer.hosts.get(tensor.untyped_storage().data_ptr())
            if host is not None:
                return _SavedWeight(host, tensor)
        return tensor

    def _unpack(self, saved: Any) -> torch.Tensor:
        if not isinstance(saved, _SavedWeight):
            return saved
        host = saved.host
        weights = torch.empty_strided(
            host.shape, host.stride(), dtype=host.dtype, device=self.runtime.device
        )
        weights.copy_(host, non_blocking=True)
        self.counters.h2d_bytes += host.numel() * host.element_size()
        return weights.as_strided(saved.size, saved.stride, saved.offset)

    def preload(self) -> None:
        """Fill the empty slots with the first offloaded layers, as the wrap-around would."""
        for layer in self.layers:
            if not self.holds(layer) and all(s.owner is None for s in layer.slots):
                self.load(layer)

    @staticmethod
    def invalidate(layer: _Layer) -> None:
        """Forget what ``layer``'s slots hold (their contents were overwritten)."""
        for slot in layer.slots:
            slot.owner = None


class _SavedWeight:
    """What autograd keeps of a layer's weight: where the true values are, and the view."""

    __slots__ = ("host", "offset", "size", "stride")

    def __init__(self, host: torch.Tensor, tensor: torch.Tensor) -> None:
        self.host = host
        self.size = tensor.size()
        self.stride = tensor.stride()
        self.offset = tensor.storage_offset()


class PrefetchOffload:
    """The installed prefetch offload of one model (see :func:`hydra_offload.apply_offload`)."""

    def __init__(
        self, model: nn.Module, plan: OffloadPlan, runtime: DeviceRuntime, counters: Counters
    ) -> None:
        self.runtime = runtime
        self.counters = counters
        self._hooks: list[RemovableHandle] = []
        params = dict(model.named_parameters())
        self.staged: Staged = stage_to_host(
            [(p.name, params[p.name]) for p in plan.params],
            pin_for=runtime.device if runtime.is_cuda else None,
        )
        if runtime.is_cuda and not all(e.host.is_pinned() for e in self.staged.params):
            self.staged.storage.free()
            raise RuntimeError("host storage is not page-locked: async copies would be unsafe")
        swapped = False
        try:
            # Point the parameters at host storage first, so their device memory is released
            # before the pool is allocated (peak = max, not sum).
            point_at([(e.param, e.host) for e in self.staged.params])
            swapped = True
            self.pool = BufferPool(
                [(s.shape, s.stride, s.dtype, s.count) for s in plan.pool], runtime.device
            )
            self._install(model, plan)
        except BaseException:
            self._uninstall(restore_params=swapped)
            raise

    def _install(self, model: nn.Module, plan: OffloadPlan) -> None:
        entry_of = {
            (s.stack, s.local_name, s.shape, s.stride, s.dtype): slots
            for s, slots in zip(plan.pool, self.pool.slots, strict=True)
        }
        host_of = {e.name: e for e in self.staged.params}
        by_layer: dict[tuple[str, int], list[Any]] = defaultdict(list)
        for p in plan.params:
            by_layer[(p.stack, p.layer)].append(p)
        copy_stream = self.runtime.new_stream()
        # The pool's memory may have been used by compute just before; copies go after it.
        copy_stream.wait_stream(self.runtime.current_stream())
        self.rings: list[_Ring] = []
        self._slot_of: dict[int, tuple[OffloadedParam, torch.Tensor]] = {}
        for stack_plan in plan.stacks:
            stack = model.get_submodule(stack_plan.path) if stack_plan.path else model
            layers = []
            for index in stack_plan.offloaded_layers:
                copies = []
                for p in by_layer[(stack_plan.path, index)]:
                    key = (p.stack, p.local_name, p.shape, p.stride, p.dtype)
                    slot = entry_of[key][p.slot or 0]
                    entry = host_of[p.name]
                    entry.param.data = slot.tensor
                    self._slot_of[id(entry.param)] = (entry, slot.tensor)
                    copies.append((slot, entry.host))
                layers.append(_Layer(copies))
            ring = _Ring(layers, self.runtime, copy_stream, self.counters)
            self.rings.append(ring)
            for position, index in enumerate(stack_plan.offloaded_layers):
                module = stack[index]
                self._hook_layer(module, ring, position, by_layer[(stack_plan.path, index)])
            ring.preload()
        # The preload belongs to setup, not to any forward: count from here.
        self.counters.loads = self.counters.h2d_bytes = 0
        self._stepping: dict[int, list[tuple[nn.Parameter, torch.Tensor, torch.Tensor]]] = {}
        self._hooks += [
            register_optimizer_step_pre_hook(self._before_step),
            register_optimizer_step_post_hook(self._after_step),
        ]

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> Any:
        """An optimizer is about to update parameters: the offloaded ones it holds are
        updated in host storage (their true weights), with their gradients copied there.

        With a closure (``optimizer.step(closure)``, as Lightning calls it), the gradients
        exist only once the closure has run: the move happens right after it returns.
        """
        # ``args`` are step()'s positional arguments, the optimizer itself first.
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:
            self._to_host(optimizer)
            return None

        def closure_then_to_host() -> Any:
            loss = closure()
            self._to_host(optimizer)
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": closure_then_to_host}
        return (args[0], closure_then_to_host, *args[2:]), kwargs

    def _to_host(self, optimizer: torch.optim.Optimizer) -> None:
        if id(optimizer) in self._stepping:  # a closure called again (e.g. LBFGS)
            return
        moved = []
        for group in optimizer.param_groups:
            for param in group["params"]:
                found = self._slot_of.get(id(param))
                if found is None or param.grad is None:
                    continue
                entry, slot = found
                grad = param.grad
                param.data = entry.host
                param.grad = grad.to(entry.host.device)
                moved.append((param, slot, grad))
        self._stepping[id(optimizer)] = moved

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        moved = self._stepping.pop(id(optimizer), None)
        if not moved:
            return
        for param, slot, grad in moved:
            param.data = slot
            param.grad = grad
        # Host storage changed: whatever the slots hold is stale. Reload from the host.
        for ring in self.rings:
            for layer in ring.layers:
                ring.invalidate(layer)
            ring.preload()

    def _hook_layer(self, module: nn.Module, ring: _Ring, position: int, planned: list) -> None:
        layer = ring.layers[position]
        hosts = {p.local_name: host for p, (_, host) in zip(planned, layer.copies, strict=True)}
        self._hooks += [
            module.register_forward_pre_hook(partial(ring.before, position), with_kwargs=True),
            module.register_forward_hook(partial(ring.after, position), always_call=True),
            module.register_state_dict_post_hook(partial(_true_weights, hosts)),
            module.register_load_state_dict_pre_hook(partial(_load_into_host, hosts)),
            module.register_load_state_dict_post_hook(partial(self._after_load, ring, layer)),
        ]

    def _after_load(self, ring: _Ring, layer: _Layer, module: nn.Module, keys: Any) -> None:
        # The default loader also copied into the slots (which other layers may own):
        # wait for that copy, then make every layer sharing them reload from the host.
        self.runtime.synchronize()
        ring.invalidate(layer)

    @property
    def wait_ms(self) -> float | None:
        """Time the compute stream waited for copies (CUDA only)."""
        timers = [ring.timer for ring in self.rings if ring.timer is not None]
        return sum(t.read() for t in timers) if timers else None

    @property
    def pool_bytes(self) -> int:
        return self.pool.nbytes if hasattr(self, "pool") else 0

    def remove(self, device: torch.device | None = None) -> None:
        self._uninstall(restore_params=True, device=device)

    def _uninstall(self, *, restore_params: bool, device: torch.device | None = None) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self.runtime.synchronize()  # no copy may still be writing into the pool
        if restore_params:
            restore(self.staged.params, device)
        if hasattr(self, "pool"):
            self.pool.release()
        for ring in getattr(self, "rings", []):
            ops.unregister_ring(ring.ring_id)
        self.rings = []
        self.staged.storage.free()


def _true_weights(
    hosts: dict[str, torch.Tensor], module: nn.Module, state: dict, prefix: str, meta: Any
) -> None:
    for local, host in hosts.items():
        key = prefix + local
        if key not in state:
            continue
        value = state[key]
        if isinstance(value, nn.Parameter):  # state_dict(keep_vars=True)
            state[key] = nn.Parameter(host, requires_grad=value.requires_grad)
        else:
            state[key] = host.detach()


def _load_into_host(
    hosts: dict[str, torch.Tensor],
    module: nn.Module,
    state: dict,
    prefix: str,
    meta: Any,
    strict: bool,
    missing: list,
    unexpected: list,
    errors: list,
) -> None:
    with torch.no_grad():
        for local, host in hosts.items():
            value = state.get(prefix + local)
            if isinstance(value, torch.Tensor) and value.shape == host.shape:
                host.copy_(value)
