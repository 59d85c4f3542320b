"""Training state of offloaded parameters in host memory: their gradients, and the optimizer
state of parameters whose optimizer step runs on the host.

Gradients. A trainable offloaded parameter's gradient is produced on the device by its
backward. :class:`HostGradients` moves it to host memory as soon as autograd has accumulated
it: the copy runs on a side stream (the gradient stream) while backward goes on, and the
device copy is released. Before autograd accumulates the next gradient into the parameter,
the host gradient is taken off it, so autograd never adds a device tensor to a host one; the
new gradient then adds to the host gradient (through a page-locked staging buffer) unless
``zero_grad()`` dropped it in between. When the backward pass ends, :meth:`finish` waits for
the copies and hands the host gradients back to the backend, which puts them on the
parameters.

Example (the CPU runtime: copies are synchronous, the mechanism is the same):
    >>> import torch
    >>> from hydra_offload.runtime.device import DeviceRuntime
    >>> weight = torch.nn.Parameter(torch.ones(3))
    >>> grads = HostGradients(DeviceRuntime(torch.device("cpu")), [weight])
    >>> finished = []
    >>> queued = [None]
    >>> def received():
    ...     queued[0] = queue_once(lambda: finished.extend(grads.finish()), queued[0])
    >>> grads.on_received = received
    >>> for _ in range(2):  # two micro-batches: the gradients add up in host memory
    ...     (weight * 2).sum().backward()
    ...     for param, host_grad in finished:
    ...         param.grad = host_grad
    ...     finished.clear()
    >>> weight.grad.tolist()
    [4.0, 4.0, 4.0]
    >>> grads.remove()
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from hydra_offload.runtime.device import DeviceRuntime
from hydra_offload.runtime.host import HostStorage
from hydra_offload.runtime.partition import Partition

__all__ = ["HostGradients", "optimizer_state_to", "queue_once"]


class _Grad:
    __slots__ = ("accumulate", "host", "param", "staging")

    def __init__(self, param: nn.Parameter) -> None:
        self.param = param
        self.host: torch.Tensor | None = None
        """Where the gradient is accumulated (host memory), made on first use."""
        self.staging: torch.Tensor | None = None
        """Page-locked buffer a new gradient lands in before it is added to :attr:`host`."""
        self.accumulate = False
        """Whether the gradient being produced adds to :attr:`host`."""


class HostGradients:
    """Gradients of some parameters, kept in host memory (see the module docstring).

    Args:
        runtime: the compute device's runtime (streams, copies, host memory).
        params: the parameters (trainable, offloaded) whose gradients live in host memory.

    Attributes:
        on_received: called (with no argument) each time a gradient has been received during
            a backward pass; the backend queues its end-of-backward callback there, which
            must call :meth:`finish`.
    """

    def __init__(
        self,
        runtime: DeviceRuntime,
        params: Sequence[nn.Parameter],
        partition: Partition | None = None,
    ) -> None:
        self.runtime = runtime
        self.partition = partition
        self._grads = {id(p): _Grad(p) for p in params}
        # Host memory only for the gradients this process keeps (all, without a partition).
        self._order = [self._grads[id(p)] for p in params if partition is None or partition.owns(p)]
        self._kept = {id(g) for g in self._order}
        self.stream = runtime.new_stream() if params else None
        self._reducing: list[tuple[_Grad, torch.Tensor, Any]] = []
        self._storage: HostStorage | None = None
        self._staging: HostStorage | None = None
        self._pending: list[_Grad] = []
        self._received: dict[int, _Grad] = {}
        self.on_received: Callable[[], Any] = lambda: None
        self._hooks: list[RemovableHandle] = []
        for grad in self._grads.values():
            self._hooks += [
                grad.param.register_hook(partial(self._before_accumulate, grad)),
                grad.param.register_post_accumulate_grad_hook(partial(self._accumulated, grad)),
            ]

    def __contains__(self, param: object) -> bool:
        """Whether ``param``'s gradient is kept in host memory by this process (with a
        partition: whether it owns the parameter)."""
        grad = self._grads.get(id(param))
        return grad is not None and id(grad) in self._kept

    @property
    def nbytes(self) -> int:
        """Host bytes allocated for gradients and staging buffers."""
        return sum(s.nbytes for s in (self._storage, self._staging) if s is not None)

    @property
    def pinned_bytes(self) -> int:
        """Of :attr:`nbytes`, the bytes page-locked for the device."""
        return sum(s.pinned_bytes for s in (self._storage, self._staging) if s is not None)

    def host_grad(self, param: nn.Parameter) -> torch.Tensor:
        """The host gradient of ``param`` (the memory for all of them is made at once)."""
        if self._storage is None:
            self._storage = self.runtime.host_storage([_layout(g.param) for g in self._order])
            for grad, tensor in zip(self._order, self._storage.tensors, strict=True):
                grad.host = tensor
        host = self._grads[id(param)].host
        assert host is not None
        return host

    def _staging_for(self, grad: _Grad) -> torch.Tensor:
        if self._staging is None:
            self._staging = self.runtime.host_storage([_layout(g.param) for g in self._order])
            for entry, tensor in zip(self._order, self._staging.tensors, strict=True):
                entry.staging = tensor
        assert grad.staging is not None
        return grad.staging

    def adopt(self, param: nn.Parameter) -> torch.Tensor:
        """Take whatever gradient ``param`` has (e.g. set by hand) into its host gradient,
        leave ``param.grad`` unset, and return the host gradient."""
        host = self.host_grad(param)
        grad = param.grad
        if grad is not None and grad is not host:
            with torch.no_grad():
                host.copy_(grad)
        param.grad = None
        return host

    def _before_accumulate(self, grad: _Grad, incoming: torch.Tensor) -> None:
        """Autograd is about to accumulate a gradient into the parameter: take the host
        gradient off it (a device gradient cannot be added to it); the new gradient adds to
        it unless ``zero_grad()`` has dropped it."""
        current = grad.param.grad
        if current is None or id(grad) not in self._kept:
            grad.param.grad = None  # not kept here: the owner accumulates the averages
            grad.accumulate = False
            return
        self.adopt(grad.param)
        grad.accumulate = True

    def _accumulated(self, grad: _Grad, param: torch.Tensor) -> None:
        """A gradient is complete on the device: copy it to host memory on the gradient
        stream and release the device copy."""
        device_grad = param.grad
        if device_grad is None:
            return
        if self.partition is not None:
            # Averaged over the processes first (asynchronously); the copy waits for it.
            work = self.partition.reduce(device_grad)
            param.grad = None
            self._reducing.append((grad, device_grad, work))
            self._copy_reduced(wait=False)
            self.on_received()
            return
        host = self.host_grad(grad.param)
        if device_grad is not host:
            assert self.stream is not None
            self.stream.wait_stream(self.runtime.current_stream())  # the gradient is computed
            self._to_host(grad, device_grad)
            param.grad = None
        grad.accumulate = True
        self._received[id(grad.param)] = grad
        self.on_received()

    def _to_host(self, grad: _Grad, device_grad: torch.Tensor) -> None:
        """Queue the copy of a complete device gradient into host memory (the stream has
        been made to wait for it)."""
        assert self.stream is not None
        if grad.accumulate:
            self.runtime.copy(self.stream, self._staging_for(grad), device_grad)
            self._pending.append(grad)
        else:
            self.runtime.copy(self.stream, self.host_grad(grad.param), device_grad)

    def _copy_reduced(self, *, wait: bool) -> None:
        """Copy the averaged gradients whose reductions are done (all of them, waiting, with
        ``wait``) to host memory, in the order they were started; on an accelerator the
        gradient stream waits for each reduction on the device, so none is waited for here.
        A gradient this process does not own is dropped once its reduction is done."""
        assert self.stream is not None
        assert self.partition is not None
        while self._reducing:
            grad, device_grad, work = self._reducing[0]
            if not (wait or self.runtime.is_accelerator or work is None or work.is_completed()):
                return
            self._reducing.pop(0)
            self.stream.wait_stream(self.runtime.current_stream())  # the gradient is computed
            self.runtime.wait_work(self.stream, work)
            if id(grad) in self._kept:
                self._to_host(grad, device_grad)
                grad.accumulate = True
                self._received[id(grad.param)] = grad
            elif self.runtime.is_accelerator:
                device_grad.record_stream(self.stream)  # read by the reduction until then

    def finish(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """After a backward pass: wait for the copies, add the staged gradients, and return
        each parameter that received a gradient with its host gradient."""
        if self._reducing:
            self._copy_reduced(wait=True)
        if self.stream is not None:
            self.stream.synchronize()
        with torch.no_grad():
            for grad in self._pending:
                assert grad.host is not None
                assert grad.staging is not None
                grad.host.add_(grad.staging)
        self._pending = []
        received = [(g.param, self.host_grad(g.param)) for g in self._received.values()]
        self._received = {}
        return received

    def remove(self) -> None:
        """Remove the hooks and release the host memory (after :meth:`finish`)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self.stream is not None:
            self.stream.synchronize()
        for storage in (self._storage, self._staging):
            if storage is not None:
                self.runtime.release(storage.tensors)
                storage.free()
        self._storage = self._staging = None
        for grad in self._order:
            grad.host = grad.staging = None
        self._grads = {}
        self._order = []
        self._kept = set()
        self._pending = []
        self._reducing = []
        self._received = {}
        self.on_received = lambda: None


def optimizer_state_to(
    optimizer: torch.optim.Optimizer,
    params: Iterable[torch.Tensor],
    move: Callable[[torch.Tensor], torch.Tensor],
    keep: Callable[[torch.Tensor], bool],
) -> None:
    """Replace each state tensor of ``params`` in ``optimizer`` that ``keep`` rejects with
    ``move(tensor)``.

    Whoever loaded the state (``Optimizer.load_state_dict`` casts it to where the parameter
    is at that moment; Lightning then moves it to the root device) may have put it on the
    device while the step runs in host memory.
    """
    for param in params:
        state = optimizer.state.get(param)
        if not isinstance(state, dict):
            continue
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and not keep(value):
                state[key] = move(value)


def queue_once(callback: Callable[[], None], queued_for: int | None) -> int:
    """Queue ``callback`` to run when the current backward pass ends, unless it was queued
    for this very pass; returns the pass's id, to pass in again next time.

    Keyed by the pass (autograd's graph task), not by a flag: a backward that raised never
    runs its callbacks, and the next pass must still get one.
    """
    task = torch._C._current_graph_task_id()
    if task != queued_for:
        torch.autograd.Variable._execution_engine.queue_callback(callback)
    return task


def _layout(param: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...], torch.dtype]:
    return tuple(param.shape), tuple(param.stride()), param.dtype
