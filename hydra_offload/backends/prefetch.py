"""The prefetch backend: offloaded layers' weights stream through a static device pool.

Each offloaded parameter's ``.data`` points at a slot of the :class:`BufferPool` while its
layer computes. Per layer stack, a ring walks the offloaded layers: when offloaded layer ``j``
finishes, the copy of offloaded layer ``(j + step) mod n`` into the slots ``j`` just used is
queued on the copy stream, after an event that marks the end of ``j``'s compute. Before a
layer computes, the compute stream waits (on the device, never on the host) for the event
that ends that layer's copy. Who loads into which slots after whom is the plan's ring schedule
(:mod:`hydra_offload.schedule`), which the step-time simulator reads too.

Every slot records which layer it holds. A layer whose slots hold anything else when it is
called (layers skipped, called twice, out of order, after a forward that raised) loads its
weights on demand first, and ``stats.stalls`` counts it. Nothing depends on layers running
in registration order.

``state_dict()`` reports the true weights from host storage (under every name of a parameter
tied inside a layer) and ``load_state_dict()`` writes into host storage, so checkpoints never
see a slot's contents; nor do pickles and deep copies of the model (see
:class:`~hydra_offload.runtime.params.PickleGuard`).

Training. Autograd saves views of the slots, so a layer's backward must find its own weights
there again. A forward recorded by autograd puts a gradient hook on each offloaded layer's
outputs (its backward is about to start) and inputs (its backward is done), and keeps the
last ``step`` layers in their slots instead of copying the first ones in for the next forward.
Backward then walks the ring in reverse: when layer ``j``'s backward is done, layer
``j - step`` is copied into its slots, ``step`` layers ahead, on the copy stream; a layer
whose slots hold anything else when its backward starts loads on demand (a stall), as in the
forward. Recomputation (activation checkpointing) runs inside the layer's backward, where its
weights are.

The gradient of each trainable offloaded parameter goes to page-locked host memory as soon as
autograd has accumulated it (device to host, on a second stream, while backward goes on) and
the device copy is released. When backward ends, those parameters point at their host weights
and host gradients: gradient clipping and the optimizer step work on them there (the
optimizer's state lives in host memory too, wherever a loaded checkpoint put it), and the next
forward copies the updated weights in. Gradient accumulation adds into the host gradient;
``zero_grad()`` starts it again (see :mod:`hydra_offload.runtime.grads`). Whether a parameter
trains is read when the offload is applied.

Every copy, stream and event goes through the :class:`DeviceRuntime`, so the same code runs on
an accelerator, on the CPU, and on the simulated device the tests use to make missing waits
fail (:mod:`hydra_offload.runtime.simulated`).
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)
from torch.utils._pytree import tree_leaves
from torch.utils.hooks import RemovableHandle

from hydra_offload.backends.base import StagedOffload
from hydra_offload.plan import OffloadPlan
from hydra_offload.runtime import BufferPool, DeviceRuntime, Slot, ops
from hydra_offload.runtime.counters import Counters
from hydra_offload.runtime.grads import HostGradients, optimizer_state_to, queue_once
from hydra_offload.runtime.params import Staged, point_at, restore, stage_to_host
from hydra_offload.runtime.partition import Partition
from hydra_offload.runtime.shared import NodeGroup
from hydra_offload.runtime.timing import WaitTimer
from hydra_offload.runtime.trace import StackTrace, StepTrace
from hydra_offload.schedule import RingSchedule, schedules_of
from hydra_offload.weights import ModulePatch, WeightAdapter

__all__ = ["PrefetchOffload"]


class _Param:
    """An offloaded parameter of a layer: its slot's tensors and its host copy (one tensor
    per part, see :mod:`hydra_offload.weights`)."""

    __slots__ = ("hosts", "layer", "on_host", "param", "slots", "weights")

    def __init__(
        self,
        param: nn.Parameter,
        slots: list[torch.Tensor],
        hosts: list[torch.Tensor],
        layer: _Layer,
        weights: WeightAdapter,
    ) -> None:
        self.layer: _Layer | None = layer
        self.param = param
        self.slots = slots
        self.hosts = hosts
        self.weights = weights
        self.on_host = False
        """Whether ``.data`` / ``.grad`` point at host storage (after a backward, for the
        optimizer) instead of the slot."""


class _Layer:
    """An offloaded layer: the (slot, host tensors) pairs its load copies."""

    __slots__ = (
        "copies", "in_backward", "nbytes", "next_users", "on_host", "params", "position",
        "prev_users", "ready", "slots",
    )  # fmt: skip

    def __init__(self, position: int, copies: list[tuple[Slot, list[torch.Tensor]]]) -> None:
        self.position = position
        self.copies = copies
        self.slots = [slot for slot, _ in copies]
        self.params: list[_Param] = []
        self.nbytes = sum(h.numel() * h.element_size() for _, hosts in copies for h in hosts)
        self.ready: Any = None
        self.next_users: list[_Layer] = []
        """The layers that use this layer's slots next, in ring order: what to prefetch
        once this layer's forward is done."""
        self.prev_users: list[_Layer] = []
        """The layers that use this layer's slots before it: what to prefetch once this
        layer's backward is done (backward walks the ring in reverse)."""
        self.in_backward = False
        """Backward has reached this layer and not yet left it: its slots stay its own."""
        self.on_host = False
        """Some of its parameters point at host storage (see :attr:`_Param.on_host`)."""


class _Ring:
    """The offloaded layers of one stack, in stack order, and their prefetch schedule.

    The schedule is the plan's :class:`~hydra_offload.schedule.RingSchedule` (the one the
    step-time simulator reads): layer ``j`` uses slot position ``j % step``, so the next user
    of the slots ``j`` frees is offloaded layer ``j + step``, wrapping around at the end of
    the stack: the copy for the next forward starts during this one. Backward walks the ring
    the other way: when layer ``j``'s backward is done, layer ``j - step`` is copied into its
    slots.
    """

    def __init__(
        self,
        layers: list[_Layer],
        schedule: RingSchedule,
        runtime: DeviceRuntime,
        copy_stream: Any,
        counters: Counters,
        backend: PrefetchOffload,
    ) -> None:
        if len(schedule.layers) != len(layers) or any(
            len(layer.slots) != len(slots)
            for layer, slots in zip(layers, schedule.slots, strict=True)
        ):
            raise ValueError("the layers do not match their schedule")
        self.layers = layers
        self.schedule = schedule
        self.timer = WaitTimer(runtime)
        self.ring_id = ops.register_ring(self)
        self.runtime = runtime
        self.copy_stream = copy_stream
        self.counters = counters
        self.backend: PrefetchOffload | None = backend
        self.deferred: list[_Layer] = []
        """Wrap-around loads held back at the end of a recorded forward."""
        self.trace: StackTrace | None = None
        """Where copies and computes are recorded while a trace is active
        (:meth:`hydra_offload.offload.OffloadHandle.trace`)."""
        for position, layer in enumerate(layers):
            layer.next_users = [layers[p] for p in schedule.next_users[position]]
            layer.prev_users = [layers[p] for p in schedule.prev_users[position]]

    @staticmethod
    def holds(layer: _Layer) -> bool:
        return all(slot.owner is layer for slot in layer.slots)

    @staticmethod
    def can_fill(layer: _Layer) -> bool:
        """Whether loading ``layer`` now overwrites nothing a pending layer still needs."""
        return all(s.owner is None or s.owner is layer or s.used for s in layer.slots)

    def load(self, layer: _Layer, *, now: bool = False) -> None:
        """Queue the copy of ``layer``'s weights into its slots on the copy stream.

        ``now``: the copy goes after everything queued on the compute stream so far (a load
        on demand, which may take slots whose last reader was not marked).
        """
        if now:
            done = self.runtime.current_stream().record_event()
            for slot in layer.slots:
                slot.free = done
                if isinstance(slot.owner, _Layer) and slot.owner is not layer:
                    slot.owner.in_backward = False
        stream = self.copy_stream
        for slot in layer.slots:
            if slot.free is not None:
                stream.wait_event(slot.free)  # compute is done with the old contents
        trace = self.trace
        start = trace.mark(stream) if trace is not None else None
        for slot, hosts in layer.copies:
            for tensor, host in zip(slot.tensors, hosts, strict=True):
                self.runtime.copy(stream, tensor, host)
        if trace is not None:
            trace.copied(layer.position, start, trace.mark(stream), stall=now)
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
        so the graph has no break. The operator takes the layer's offloaded weights, so that
        the compiled code reads them only after it. With gradients, the step also sets up
        backward (tensor hooks), which the compiler does not trace: the graph breaks there and
        the step runs eagerly.
        """
        if torch.compiler.is_compiling() and not torch.is_grad_enabled():
            anchor = ops.first_tensor((args, kwargs))
            if anchor is not None:
                weights = [entry.param for entry in self.layers[position].params]
                ops.layer_begin(anchor, weights, self.ring_id, position)
                return
            torch._dynamo.graph_break()  # nothing to order the weights' reads after
        self.begin(position, (args, kwargs))

    def after(self, position: int, module: nn.Module, args: Any, output: Any) -> None:
        """Forward hook of offloaded layer ``position`` (also called when it raised).

        Compiled, the operator takes the layer's weights too: every read of them runs before.
        """
        if torch.compiler.is_compiling() and not torch.is_grad_enabled():
            anchor = ops.first_tensor(output)
            if anchor is not None:
                weights = [entry.param for entry in self.layers[position].params]
                ops.layer_end(anchor, weights, self.ring_id, position)
                return
            torch._dynamo.graph_break()
        self.end(position, output)

    def _acquire(self, layer: _Layer) -> None:
        """Make the compute stream wait for the layer's weights, loading them if needed."""
        if not self.holds(layer):
            self.counters.stalls += 1
            self.load(layer, now=True)
        assert self.timer is not None
        self.timer.wait(self.runtime.current_stream(), layer.ready)
        if layer.on_host:
            assert self.backend is not None
            self.backend.params_to_slots(layer)

    def begin(self, position: int, inputs: Any = None) -> None:
        """Before the layer's forward: its weights in its slots; with gradients, a hook on
        its inputs that tells when its backward is done."""
        layer = self.layers[position]
        self._acquire(layer)
        if layer.in_backward:
            return  # a recomputation inside its backward (e.g. activation checkpointing)
        if self.trace is not None:
            self.trace.begin(position)
        if inputs is None or not torch.is_grad_enabled():
            return
        for tensor in _tensors(inputs):
            # Not on leaves: their gradient hook may run before the layer's last node.
            if tensor.requires_grad and tensor.grad_fn is not None:
                tensor.register_hook(partial(self._input_grad, layer))

    def end(self, position: int, output: Any = None) -> None:
        """After the layer's forward: mark its slots free and start the next copies."""
        layer = self.layers[position]
        if layer.in_backward:
            return  # a recomputation inside its own backward: the slots stay its own
        if self.trace is not None:
            self.trace.end(position)
        done = self.runtime.current_stream().record_event()
        for slot in layer.slots:
            slot.free = done
            slot.used = True
        self.runtime.forget_cached_casts()
        recorded = False
        if output is not None and torch.is_grad_enabled():
            for tensor in _tensors(output):
                if tensor.requires_grad and tensor.grad_fn is not None:
                    tensor.register_hook(partial(self._output_grad, layer))
                    recorded = True
        for upcoming in layer.next_users:
            if recorded and upcoming.position < position:
                # Backward starts from the end of the stack: keep these slots for it. If the
                # next forward comes first, it loads them as it starts.
                self.deferred.append(upcoming)
                continue
            if not self.holds(upcoming) and self.can_fill(upcoming):
                self.load(upcoming)

    def forward_started(self) -> None:
        """The model's forward starts: the copies a recorded forward held back for a
        backward that has not come are issued now."""
        deferred, self.deferred = self.deferred, []
        for layer in deferred:
            if not self.holds(layer) and self.can_fill(layer):
                self.load(layer)

    def _output_grad(self, layer: _Layer, grad: torch.Tensor) -> None:
        """Backward reached one of the layer's outputs: none of its nodes has run yet."""
        if layer.in_backward:
            return
        # Autograd runs the nodes of the latest forward call first, one call after the
        # other: any layer still marked in backward is done.
        for other in self.layers:
            if other.in_backward:
                self.end_backward(other)
        assert self.backend is not None
        self.backend.backward_started()
        self.deferred = []
        self._acquire(layer)
        layer.in_backward = True
        for slot in layer.slots:
            slot.used = False  # in use until its backward is done
        if self.trace is not None:
            self.trace.begin(layer.position, "backward")

    def _input_grad(self, layer: _Layer, grad: torch.Tensor) -> None:
        """The gradient of one of the layer's inputs is complete: its backward is done."""
        if layer.in_backward:
            self.end_backward(layer)

    def end_backward(self, layer: _Layer) -> None:
        """Free the layer's slots after its backward and copy in the layer before it."""
        layer.in_backward = False
        if self.trace is not None:
            self.trace.end(layer.position)
        done = self.runtime.current_stream().record_event()
        for slot in layer.slots:
            slot.free = done
            slot.used = True
        for earlier in layer.prev_users:
            later = earlier.position < layer.position  # the wrap-around is the next forward's
            if later and not self.holds(earlier) and self.can_fill(earlier):
                self.load(earlier)

    def backward_done(self) -> None:
        """The whole backward pass is over: no layer is in it any more."""
        for layer in self.layers:
            if layer.in_backward:
                self.end_backward(layer)

    def preload(self) -> None:
        """Fill the empty slots with the first offloaded layers, as the wrap-around would."""
        for layer in self.layers:
            if not self.holds(layer) and all(s.owner is None for s in layer.slots):
                self.load(layer)

    def invalidate(self, layer: _Layer) -> None:
        """Forget what ``layer``'s slots hold (their contents were overwritten or stale)."""
        done = self.runtime.current_stream().record_event()
        for slot in layer.slots:
            slot.owner = None
            slot.free = done

    def dismantle(self) -> None:
        """Drop every reference between the ring, its layers, parameters and slots, so their
        memory is released as soon as the backend lets go (no reference cycle is left for
        the garbage collector)."""
        ops.unregister_ring(self.ring_id)
        for layer in self.layers:
            for entry in layer.params:
                entry.layer = None
            layer.params = []
            layer.copies = []
            layer.slots = []
            layer.next_users = []
            layer.prev_users = []
            layer.ready = None
        self.layers = []
        self.deferred = []
        self.backend = None
        self.timer = None
        self.trace = None


def _tensors(value: Any) -> list[torch.Tensor]:
    return [leaf for leaf in tree_leaves(value) if isinstance(leaf, torch.Tensor)]


class PrefetchOffload(StagedOffload):
    """The installed prefetch offload of one model (see :func:`hydra_offload.apply_offload`).

    Implements :class:`~hydra_offload.backends.base.OffloadBackendBase` (through
    :class:`~hydra_offload.backends.base.StagedOffload`).
    """

    def __init__(
        self,
        model: nn.Module,
        plan: OffloadPlan,
        runtime: DeviceRuntime,
        counters: Counters,
        *,
        node: NodeGroup | None = None,
        partition: Partition | None = None,
    ) -> None:
        self.runtime = runtime
        self._partition = partition
        self.counters = counters
        self._hooks: list[RemovableHandle] = []
        self.rings: list[_Ring] = []
        self._params: dict[int, _Param] = {}
        self.grads: HostGradients | None = None
        self._patches: list[ModulePatch] = []
        self._staged: Staged = stage_to_host(
            model, plan.offloaded_params, runtime, node=node, trainable_shared=partition is not None
        )
        # An empty tensor holds no memory to copy (and may sit at the end of its range, or be
        # the whole of an empty buffer, where CUDA reports no page-locked memory).
        if runtime.is_cuda and not all(
            h.is_pinned() for e in self.staged.params for h in e.hosts if h.numel()
        ):
            self.staged.storage.free()
            raise RuntimeError("host storage is not page-locked: async copies would be unsafe")
        swapped = False
        try:
            # Point the parameters at host storage first, so their device memory is released
            # before the pool is allocated (peak = max, not sum).
            point_at([(e, e.hosts) for e in self.staged.params])
            swapped = True
            self.pool = BufferPool([(s.layouts, s.count) for s in plan.pool], runtime.device)
            self._install(model, plan)
            self._install_weights()
        except BaseException:
            self._uninstall(restore_params=swapped)
            raise

    def _install(self, model: nn.Module, plan: OffloadPlan) -> None:
        entry_of = {
            (s.stack, s.local_name, s.shape, s.stride, s.dtype, s.layouts): slots
            for s, slots in zip(plan.pool, self.pool.slots, strict=True)
        }
        host_of = {e.name: e for e in self.staged.params}
        by_layer: dict[tuple[str, int], list[Any]] = defaultdict(list)
        for p in plan.params:
            by_layer[(p.stack, p.layer)].append(p)
        copy_stream = self.copy_stream = self.runtime.new_stream()
        # The pool's memory may have been used by compute just before; copies go after it.
        copy_stream.wait_stream(self.runtime.current_stream())
        for stack_plan, schedule in zip(plan.stacks, schedules_of(plan), strict=True):
            stack = model.get_submodule(stack_plan.path) if stack_plan.path else model
            layers = []
            for position, index in enumerate(stack_plan.offloaded_layers):
                staged_params = []
                for p in by_layer[(stack_plan.path, index)]:
                    key = (p.stack, p.local_name, p.shape, p.stride, p.dtype, p.layouts)
                    staged_params.append((entry_of[key][p.slot or 0], host_of[p.name]))
                layer = _Layer(position, [(slot, staged.hosts) for slot, staged in staged_params])
                for slot, staged in staged_params:
                    staged.weights.use(slot.tensors)
                    layer.params.append(
                        _Param(staged.param, slot.tensors, staged.hosts, layer, staged.weights)
                    )
                layers.append(layer)
            ring = _Ring(layers, schedule, self.runtime, copy_stream, self.counters, self)
            self.rings.append(ring)
            for position, index in enumerate(stack_plan.offloaded_layers):
                module = stack[index]
                self._hook_layer(module, ring, position)
            ring.preload()
        # The preload belongs to setup, not to any forward: count from here.
        self.counters.loads = self.counters.h2d_bytes = 0
        for ring in self.rings:
            for layer in ring.layers:
                for entry in layer.params:
                    self._params[id(entry.param)] = entry
        # Whether a parameter trains is read now.
        self.grads = HostGradients(
            self.runtime,
            [e.param for e in self._params.values() if e.param.requires_grad],
            self.partition,
        )
        self.grads.on_received = self.backward_started
        self._optimizers: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()
        self._queued_for: int | None = None
        self._hooks += [
            register_optimizer_step_pre_hook(self._before_step),
            register_optimizer_step_post_hook(self._after_step),
        ]

    # -- training ---------------------------------------------------------------------------

    def forward_started(self) -> None:
        """Called by the handle as the model's forward starts: held-back copies are issued,
        and slots emptied since the last forward (a ``load_state_dict``, an optimizer step)
        are filled with the first layers before they are needed."""
        for ring in self.rings:
            if ring.deferred:
                ring.forward_started()
            ring.preload()

    def backward_started(self) -> None:
        """Arrange for :meth:`_backward_finished` to run when this backward pass ends."""
        self._queued_for = queue_once(self._backward_finished, self._queued_for)

    def _backward_finished(self) -> None:
        """After backward: host gradients complete, trained parameters pointed at host
        storage (where the optimizer updates them), every slot free again."""
        self._queued_for = None
        assert self.grads is not None
        received = self.grads.finish()
        if self.partition is not None:
            # No process may update a weight another still reads for its backward.
            self.copy_stream.synchronize()
            self.runtime.hand_over(self.staged.storage.tensors)
            self.partition.barrier()
        for ring in self.rings:
            ring.backward_done()
        for param, host_grad in received:
            entry = self._params[id(param)]
            self._to_host(entry)
            param.grad = host_grad

    def _to_host(self, entry: _Param) -> None:
        if not entry.on_host:
            entry.weights.use(entry.hosts)
            entry.on_host = True
            if entry.layer is not None:
                entry.layer.on_host = True

    def params_to_slots(self, layer: _Layer) -> None:
        """Point the layer's parameters back at its slots before it computes again.

        Their gradients stay in host memory until autograd accumulates the next ones
        (see :class:`~hydra_offload.runtime.grads.HostGradients`): ``zero_grad()`` may still
        come in between, as Lightning calls it after the forward of the first micro-batch.
        """
        for entry in layer.params:
            if entry.on_host:
                entry.weights.use(entry.slots)
                entry.on_host = False
        layer.on_host = False

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """An optimizer is about to step. Offloaded parameters it holds that have a gradient
        but still point at their slots (a gradient set by hand, or a forward since the last
        backward) are pointed at host storage, so the step updates their true weights; and
        the state of every offloaded parameter it steps is moved to host memory, where the
        step runs, if something (``load_state_dict``, Lightning's checkpoint restore) put it
        on the device. That includes trainable parameters still on their slots: with a
        closure (as Lightning steps), this hook runs before the closure's backward, which
        then points them at host storage for the step."""
        assert self.grads is not None
        stepping, held = [], []
        for group in optimizer.param_groups:
            for param in group["params"]:
                entry = self._params.get(id(param))
                if entry is None:
                    continue
                held.append(param)
                if not self._steps(param):
                    continue  # another process of the node steps it (see Partition)
                if not entry.on_host and param.grad is not None:
                    host_grad = self.grads.adopt(param)
                    self._to_host(entry)
                    param.grad = host_grad
                if entry.on_host or param in self.grads:
                    stepping.append(param)
        if held:
            self._remember(optimizer, held)
        if stepping:
            # The step writes host weights that a copy may still be reading (a preload).
            self.copy_stream.synchronize()
            runtime = self.runtime
            optimizer_state_to(optimizer, stepping, runtime.to_host, runtime.in_host_memory)

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """An optimizer updated parameters: whatever the slots hold of offloaded ones that
        it steps is stale. Reload from the host (under a partition: once every process of
        the node has stepped the parameters it owns)."""
        stepped = {
            id(p) for group in optimizer.param_groups for p in group["params"]
        } & self._params.keys()
        if self.partition is not None and any(
            self._params[key].param.requires_grad for key in stepped
        ):
            self.partition.barrier()
        elif not any(self._params[key].on_host for key in stepped):
            return
        for ring in self.rings:
            for layer in ring.layers:
                ring.invalidate(layer)
            ring.preload()

    # -- layers and checkpoints -------------------------------------------------------------

    def _hook_layer(self, module: nn.Module, ring: _Ring, position: int) -> None:
        layer = ring.layers[position]
        entry_of = {id(entry.param): entry for entry in layer.params}
        # Every name the layer has for an offloaded parameter: one tied inside the layer has
        # several, and each of its state_dict entries must be the true weights.
        hosts = [
            (local, entry_of[id(param)])
            for local, param in module.named_parameters(remove_duplicate=False)
            if id(param) in entry_of
        ]
        self._hooks += [
            module.register_forward_pre_hook(partial(ring.before, position), with_kwargs=True),
            module.register_forward_hook(partial(ring.after, position), always_call=True),
            module.register_state_dict_post_hook(partial(_true_weights, hosts)),
            module.register_load_state_dict_pre_hook(partial(self._before_load, hosts)),
            module.register_load_state_dict_post_hook(partial(self._after_load, ring, layer)),
        ]

    def _before_load(self, hosts: list[tuple[str, _Param]], *args: Any) -> None:
        # Copies from host storage may still be under way: let them finish first.
        self.runtime.synchronize()
        _load_into_host(hosts, *args)

    def _after_load(self, ring: _Ring, layer: _Layer, module: nn.Module, keys: Any) -> None:
        # The default loader also copied into the slots (which other layers may own): make
        # every layer sharing them reload from the host, after that copy (invalidate records
        # the event the next copy into the slots waits for).
        ring.invalidate(layer)

    def start_trace(self, trace: StepTrace, plan: OffloadPlan) -> bool:
        """Each ring records into ``trace``, under its stack's path (see
        :meth:`OffloadBackendBase.start_trace`)."""
        if any(ring.trace is not None for ring in self.rings):
            raise RuntimeError("this offload is already being traced: traces do not nest")
        for stack, ring in zip(plan.stacks, self.rings, strict=True):
            ring.trace = trace.stack(stack.path, ring.schedule.layers)
        return True

    def stop_trace(self) -> None:
        for ring in self.rings:
            ring.trace = None

    @property
    def wait_ms(self) -> float | None:
        """Time the compute stream waited for copies (where timing events exist)."""
        times = [ring.timer.read() for ring in self.rings if ring.timer is not None]
        measured = [t for t in times if t is not None]
        return sum(measured) if measured else None

    @property
    def pool_bytes(self) -> int:
        """Bytes of the device buffer pool (0 once it is released)."""
        return self.pool.nbytes if hasattr(self, "pool") else 0

    def remove(self, device: torch.device | None = None) -> None:
        """Restore the offloaded parameters (onto ``device``, or where each lived) with
        their gradients and optimizer state; release the pool and host memory."""
        self._uninstall(restore_params=True, device=device)

    def _uninstall(self, *, restore_params: bool, device: torch.device | None = None) -> None:
        self._remove_hooks()
        self.runtime.synchronize()  # no copy may still be writing into the pool
        entries = list(self._params.values())
        grads = {}
        for entry in entries:
            if entry.param.grad is not None:
                grads[id(entry.param)] = entry.param.grad
                entry.param.grad = None
        if restore_params:
            restore(self.staged.params, device)
        for entry in entries:
            grad = grads.get(id(entry.param))
            if grad is not None:  # a gradient in host storage leaves it with the parameter
                entry.param.grad = self.runtime.to_device(grad, entry.param.device, copy=True)
        # Optimizer state kept in host memory for the host step follows the parameters back.
        for optimizer in list(getattr(self, "_optimizers", ())):
            for entry in entries:
                target = entry.param.device
                optimizer_state_to(
                    optimizer,
                    [entry.param],
                    partial(self.runtime.to_device, device=target),
                    lambda t: t.dim() == 0 or not self.runtime.in_host_memory(t),
                )
        self.runtime.synchronize()  # the copies out of host storage are complete
        if self.grads is not None:
            self.grads.remove()
            self.grads = None
        if hasattr(self, "pool"):
            self.runtime.release([t for e in self.pool.slots for s in e for t in s.tensors])
            self.pool.release()
        for ring in self.rings:
            ring.dismantle()
        self.rings = []
        self._params = {}
        self.runtime.release(self.staged.storage.tensors)
        self.staged.storage.free()


def _true_weights(
    entries: list[tuple[str, _Param]], module: nn.Module, state: dict, prefix: str, meta: Any
) -> None:
    """The layer's state dict entries of offloaded weights, from host storage (``entries``:
    each name, relative to the layer, of each offloaded parameter, tied ones under each of
    their names)."""
    for local, entry in entries:
        path, _, leaf = local.rpartition(".")
        base = prefix + (path + "." if path else "")
        own = state.get(base + leaf)
        if own is None:
            continue
        keep_vars = isinstance(own, nn.Parameter)  # state_dict(keep_vars=True)
        weights = entry.weights
        for key, value in weights.state_entries(entry.hosts, keep_vars).items():
            full = base + (leaf if key == weights.attr else key)
            if full in state:
                state[full] = value


def _load_into_host(
    entries: list[tuple[str, _Param]],
    module: nn.Module,
    state: dict,
    prefix: str,
    meta: Any,
    strict: bool,
    missing: list,
    unexpected: list,
    errors: list,
) -> None:
    for local, entry in entries:
        path, _, leaf = local.rpartition(".")
        base = prefix + (path + "." if path else "")
        weights = entry.weights
        loading = state
        if leaf != weights.attr:  # a tied parameter under another name
            if base + leaf not in state:
                continue
            loading = {base + weights.attr: state[base + leaf]}
        weights.load(entry.hosts, loading, base)
