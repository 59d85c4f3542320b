"""The UVA backend: selected weights live in host memory and kernels read them there.

Three ways to serve a module its offloaded weights, chosen at apply time:

- ``zero_copy`` (CUDA): the parameter's ``.data`` becomes a CUDA tensor whose address is the
  page-locked host memory (unified virtual addressing). Kernels read the weights over the
  interconnect; module code is untouched and nothing is copied per forward.
- ``host`` (CPU compute device): the parameter's ``.data`` is the host tensor itself; the CPU
  reads it directly, which is the same arrangement without a device in between.
- ``copy``: where no zero-copy view can be made (another accelerator) or when asked with
  ``zero_copy=False``: between forwards ``.data`` points at host memory (page-locked, so the
  copies are asynchronous); a pre-forward hook on each module that owns offloaded weights
  gives them a fresh device copy on the compute stream, and the post-forward hook points them
  back at host memory, releasing the copy.

In every mode, casts ``torch.autocast`` caches (with its cache on) are dropped after each
module that owns offloaded weights, so no lower-precision copy of them outlives its module.

Training. Zero-copy: gradients are accumulated into zero-copy views of page-locked host
memory. Copy mode: gradients go to host memory as autograd produces them
(:class:`~hydra_offload.runtime.grads.HostGradients`), and the optimizer steps on the host
weights, its state in host memory too, wherever a loaded checkpoint put it.

Tied parameters are offloaded once; every module that shares them sees the same parameter.
Pickles and deep copies of the model hold the weights from host storage, in CPU memory
(see :class:`~hydra_offload.runtime.params.PickleGuard`).
"""

from __future__ import annotations

import weakref
from functools import partial
from typing import Any, Literal

import torch
from torch import nn
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)
from torch.utils.hooks import RemovableHandle

from hydra_offload._warnings import warn_at_caller
from hydra_offload.backends.base import StagedOffload
from hydra_offload.plan import OffloadPlan
from hydra_offload.runtime import DeviceRuntime
from hydra_offload.runtime.counters import Counters
from hydra_offload.runtime.grads import HostGradients, optimizer_state_to, queue_once
from hydra_offload.runtime.host import HostStorage
from hydra_offload.runtime.params import OffloadedParam, Staged, point_at, restore, stage_to_host
from hydra_offload.runtime.partition import Partition
from hydra_offload.runtime.shared import NodeGroup
from hydra_offload.weights import ModulePatch, PlainTensor, layout_of

__all__ = ["UVAMode", "UVAOffload"]

UVAMode = Literal["zero_copy", "host", "copy"]


class UVAOffload(StagedOffload):
    """The installed UVA offload of one model (see :func:`hydra_offload.apply_offload`).

    Implements :class:`~hydra_offload.backends.base.OffloadBackendBase`; it allocates no
    device pool and does not time copies.
    """

    def __init__(
        self,
        model: nn.Module,
        plan: OffloadPlan,
        runtime: DeviceRuntime,
        counters: Counters,
        *,
        zero_copy: bool | None = None,
        node: NodeGroup | None = None,
        partition: Partition | None = None,
    ) -> None:
        self.runtime = runtime
        self._partition = partition
        self.counters = counters
        self._hooks: list[RemovableHandle] = []
        self._saving: list[tuple[nn.Module, Any]] = []
        self._grad_storage: HostStorage | None = None
        self.grads: HostGradients | None = None
        self._queued_for: int | None = None
        self._optimizers: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()
        self._patches: list[ModulePatch] = []
        self.mode: UVAMode = _choose_mode(runtime, zero_copy, split=partition is not None)
        self._staged: Staged = stage_to_host(
            model, plan.offloaded_params, runtime, node=node, trainable_shared=partition is not None
        )
        try:
            views = self._zero_copy_views(zero_copy) if self.mode == "zero_copy" else None
            if views is not None:
                point_at(list(zip(self.staged.params, views, strict=True)))
            else:
                point_at([(e, e.hosts) for e in self.staged.params])
            self._hook_owners(model)
            if self.mode != "host" or partition is not None:
                self._hook_grads()
            self._install_weights()
        except BaseException:
            self.remove()
            raise

    def _zero_copy_views(self, required: bool | None) -> list[list[torch.Tensor]] | None:
        """Zero-copy views of host storage (one per part of each offloaded parameter),
        checked to read the same bytes; on failure, switch to copy mode (or raise, when
        zero-copy was required)."""
        try:
            flat = self.staged.storage.device_views(self.runtime.device)
            first = self.staged.params[0].hosts[0]
            if not torch.equal(flat[0].cpu(), first):
                raise RuntimeError("the zero-copy view does not read the host bytes")
            views, position = [], 0
            for entry in self.staged.params:
                views.append(flat[position : position + len(entry.hosts)])
                position += len(entry.hosts)
        except (RuntimeError, TypeError, ValueError) as err:
            if required:
                raise
            warn_at_caller(
                f"UVA zero-copy views are unavailable on {self.runtime.device} ({err}); "
                "falling back to per-forward copies",
                RuntimeWarning,
            )
            self.mode = "copy"
            return None
        return views

    def _hook_owners(self, model: nn.Module) -> None:
        """Hooks on each module that owns offloaded weights. Copy mode: a device copy before
        its forward, released after it. Every mode: autocast's cached casts dropped after
        it (see :meth:`DeviceRuntime.forget_cached_casts`), so no cast of a weight in host
        memory (or read through a zero-copy view) outlives the module that used it."""
        entry_of = {id(e.param): e for e in self.staged.params}
        for module in model.modules():
            owned = [entry_of[id(p)] for p in module._parameters.values() if id(p) in entry_of]
            if not owned:
                continue
            if self.mode == "copy":
                self._hooks += [
                    module.register_forward_pre_hook(partial(self._fetch, owned)),
                    module.register_forward_hook(partial(self._release, owned), always_call=True),
                    module.register_load_state_dict_pre_hook(self._before_load),
                ]
            else:
                self._hooks.append(
                    module.register_forward_hook(self._forget_casts, always_call=True)
                )

    def _fetch(self, owned: list[OffloadedParam], module: nn.Module, args: Any) -> None:
        device = self.runtime.device
        stream = self.runtime.current_stream()
        copies: dict[int, torch.Tensor] = {}
        for entry in owned:
            parts = []
            for host in entry.hosts:
                copy = torch.empty_strided(
                    host.shape, host.stride(), dtype=host.dtype, device=device
                )
                self.runtime.copy(stream, copy, host)
                parts.append(copy)
                self.counters.h2d_bytes += host.numel() * host.element_size()
            entry.weights.use(parts)
            if isinstance(entry.weights, PlainTensor):
                copies[id(entry.param)] = parts[0]
        self.counters.loads += 1
        if torch.is_grad_enabled():
            # Autograd may save a parameter itself (not a view of its data), and read its
            # .data in backward, when it points at host storage again: save the copy.
            saving = torch.autograd.graph.saved_tensors_hooks(partial(_pack, copies), _unpack)
            saving.__enter__()
            self._saving.append((module, saving))

    def _release(self, owned: list[OffloadedParam], module: nn.Module, args: Any, out: Any) -> None:
        recorded = bool(self._saving) and self._saving[-1][0] is module
        if recorded:
            self._saving.pop()[1].__exit__(None, None, None)
        for entry in owned:
            if recorded and not isinstance(entry.weights, PlainTensor):
                # A quantized weight's autograd function may read it again in backward
                # through the layer itself (bitsandbytes keeps the quantization state
                # object), which no saved-tensor hook can redirect: it keeps its device
                # copy, as autograd keeps a plain weight's, until the next forward fetches
                # it again or the offload is removed.
                continue
            entry.weights.use(entry.hosts)
        self.runtime.forget_cached_casts()

    def _forget_casts(self, module: nn.Module, args: Any, out: Any) -> None:
        """After a module that owns offloaded weights (zero-copy and host modes)."""
        if not torch.compiler.is_compiling():  # compiled casts are not cached
            self.runtime.forget_cached_casts()

    def _before_load(self, *args: Any) -> None:
        # A copy out of host storage may still be under way: let it finish before the
        # loader writes there.
        self.runtime.synchronize()

    def _hook_grads(self) -> None:
        """Gradients of trainable offloaded parameters live in host memory too.

        Zero-copy: the gradient becomes a zero-copy view of page-locked host memory, so
        autograd accumulates into host memory and the optimizer's update (through the
        parameter's view) lands there; the optimizer's own state (e.g. Adam's moments) is
        allocated by the optimizer on the device. Copy mode: between forwards the parameter
        is its host tensor; its gradient is copied to host memory as autograd produces it,
        and the optimizer steps there.
        """
        trainable = [e for e in self.staged.params if e.param.requires_grad]
        if not trainable:
            return
        self._ids = {id(e.param) for e in self.staged.params}  # what the step hooks look for
        if self.mode != "zero_copy":  # copy mode, or the host under a partition
            params = [e.param for e in trainable]
            self.grads = HostGradients(self.runtime, params, self.partition)
            self.grads.on_received = self._backward_started
            self._hooks.append(register_optimizer_step_pre_hook(self._before_step))
            if self.partition is not None:
                self._hooks.append(register_optimizer_step_post_hook(self._after_step))
            return
        layouts = [layout_of(e.hosts[0]) for e in trainable]
        self._grad_storage = self.runtime.host_storage(layouts)
        grads = self._grad_storage.device_views(self.runtime.device)
        for home, entry in zip(grads, trainable, strict=True):
            self._hooks.append(
                entry.param.register_post_accumulate_grad_hook(partial(_grad_home, home))
            )

    def _backward_started(self) -> None:
        self._queued_for = queue_once(self._backward_finished, self._queued_for)

    def _backward_finished(self) -> None:
        """After backward (copy mode): the host gradients are complete; give them to the
        parameters, which point at their host weights between forwards."""
        self._queued_for = None
        assert self.grads is not None
        for param, host_grad in self.grads.finish():
            param.grad = host_grad
        if self.partition is not None:
            # No process may update a weight another still reads for its backward: the
            # copies out of host memory ran on the compute stream before the gradients,
            # which finish() waited for.
            self.runtime.hand_over(self.staged.storage.tensors)
            self.partition.barrier()

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Copy mode (and the host under a partition): the step of offloaded parameters
        runs in host memory; their state goes there if something put it on the device (a
        loaded checkpoint)."""
        assert self.grads is not None
        held = [
            p for group in optimizer.param_groups for p in group["params"] if id(p) in self._ids
        ]
        stepping = [p for p in held if p in self.grads]
        if held:
            self._remember(optimizer, held)
        if stepping:
            # The step writes host weights that a per-forward copy may still be reading.
            self.runtime.current_stream().synchronize()
            runtime = self.runtime
            optimizer_state_to(optimizer, stepping, runtime.to_host, runtime.in_host_memory)

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Under a partition: no process reads an offloaded weight before every process of
        the node has stepped the ones it owns."""
        assert self.partition is not None
        assert self.grads is not None
        if any(p in self.partition for group in optimizer.param_groups for p in group["params"]):
            self.partition.barrier()

    def _host_storages(self) -> list[HostStorage]:
        """The staged weights, and in copy mode the host gradients' storage."""
        extra = [self._grad_storage] if self._grad_storage is not None else []
        return [*super()._host_storages(), *extra]

    def remove(self, device: torch.device | None = None) -> None:
        """Restore the offloaded parameters (onto ``device``, or where each lived) with
        their gradients and optimizer state, and release host memory."""
        self._remove_hooks()
        self.runtime.synchronize()
        entries = self.staged.params
        grads = {id(e.param): e.param.grad for e in entries}
        for entry in entries:
            entry.param.grad = None
        restore(entries, device)
        for entry in entries:
            grad = grads[id(entry.param)]
            if grad is not None:  # out of host storage, onto the parameter's device
                entry.param.grad = self.runtime.to_device(grad, entry.param.device, copy=True)
        for optimizer in list(self._optimizers):
            for entry in entries:
                optimizer_state_to(
                    optimizer,
                    [entry.param],
                    partial(self.runtime.to_device, device=entry.param.device),
                    lambda t: t.dim() == 0 or not self.runtime.in_host_memory(t),
                )
        # The copies above read host memory (or zero-copy views of it) on the device: they
        # must be complete before that memory is released.
        self.runtime.synchronize()
        if self.grads is not None:
            self.grads.remove()
            self.grads = None
        self.runtime.release(self.staged.storage.tensors)
        self.staged.storage.free()
        if self._grad_storage is not None:
            self.runtime.release(self._grad_storage.tensors)
            self._grad_storage.free()
            self._grad_storage = None


def _grad_home(home: torch.Tensor, param: torch.Tensor) -> None:
    """After autograd accumulated a gradient (zero-copy): keep it in ``home`` (a zero-copy
    view of host memory), so the next accumulations add there and no gradient stays in
    device memory."""
    grad = param.grad
    if grad is None or grad is home:
        return
    home.copy_(grad)
    param.grad = None
    param.grad = home


def _pack(copies: dict[int, torch.Tensor], tensor: torch.Tensor) -> torch.Tensor:
    return copies.get(id(tensor), tensor)


def _unpack(saved: torch.Tensor) -> torch.Tensor:
    return saved


def _choose_mode(runtime: DeviceRuntime, zero_copy: bool | None, split: bool = False) -> UVAMode:
    """The UVA mode for ``runtime``; ``split``: trainable offloaded weights step split among
    data-parallel processes, which needs their gradients averaged on the device and copied
    out (copy mode), not accumulated through a zero-copy view."""
    if not runtime.is_accelerator:
        return "copy" if zero_copy is False else "host"
    if split and zero_copy:
        raise ValueError(
            "zero_copy=True cannot train offloaded weights under data parallelism: their "
            "gradients are averaged over the processes on the device before they go to host "
            "memory; use zero_copy=None or False (per-forward copies)"
        )
    if runtime.is_cuda and zero_copy is not False and not split:
        return "zero_copy"
    if zero_copy:
        raise ValueError(
            f"zero_copy=True needs a CUDA device; {runtime.device} has no zero-copy view of "
            "host memory (use zero_copy=None to fall back to per-forward copies)"
        )
    return "copy"
