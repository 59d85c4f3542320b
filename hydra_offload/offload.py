"""Applying an offload to a live model, and taking it off again.

Example:
    >>> import torch
    >>> from hydra_offload import apply_offload
    >>> from hydra_offload.models import DecoderLM
    >>> model = DecoderLM(num_layers=4).eval()
    >>> ids = torch.randint(0, 1024, (2, 16))
    >>> expected = model(ids)
    >>> with apply_offload(model, {"prefetch": {"offload_group_size": 2}}) as handle:
    ...     torch.equal(model(ids), expected)
    True
    >>> handle.stats.stalls, handle.active
    (0, False)
    >>> get_offload_handle(model) is None
    True
"""

from __future__ import annotations

import hashlib
import os
import threading
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from hydra_offload._applied import note_applied
from hydra_offload._warnings import warn_at_caller
from hydra_offload.backends import NoOffload, OffloadBackendBase, create_backend
from hydra_offload.config import OffloadConfig, to_offload_config
from hydra_offload.errors import OffloadError
from hydra_offload.plan import OffloadPlan, OffloadPlanWarning, plan_offload
from hydra_offload.runtime import DeviceRuntime
from hydra_offload.runtime.counters import Counters
from hydra_offload.runtime.device import runtime_for
from hydra_offload.runtime.host import proc_bytes
from hydra_offload.runtime.params import MoveGuard, PickleGuard
from hydra_offload.runtime.partition import Partition
from hydra_offload.runtime.shared import can_share, join_node, release_freed_memory
from hydra_offload.runtime.trace import StepTrace
from hydra_offload.stats import OffloadStats
from hydra_offload.weights import offload_problem

__all__ = [
    "OffloadError",
    "OffloadHandle",
    "OffloadStats",
    "apply_offload",
    "available_host_bytes",
    "get_offload_handle",
]

# Every module of every model with an active offload, so a second apply is refused (and
# get_offload_handle finds the handle).
_ACTIVE: weakref.WeakKeyDictionary[nn.Module, OffloadHandle] = weakref.WeakKeyDictionary()


class OffloadHandle:
    """An offload applied to a model: its plan, its live statistics, and ``remove()``.

    Also a context manager: leaving the ``with`` block removes the offload. The installed
    backend is reached only through :class:`~hydra_offload.backends.base.OffloadBackendBase`.

    Raises:
        TypeError: ``installed`` does not implement ``OffloadBackendBase``.
    """

    def __init__(
        self,
        model: nn.Module,
        plan: OffloadPlan,
        runtime: DeviceRuntime,
        installed: OffloadBackendBase,
        counters: Counters,
        saved: int | None,
        shared_by: int = 1,
    ) -> None:
        if not isinstance(installed, OffloadBackendBase):
            raise TypeError(
                f"an offload backend must implement OffloadBackendBase, got "
                f"{type(installed).__name__}"
            )
        self.plan = plan
        self.device = runtime.device
        self._runtime = runtime
        self._model_ref = weakref.ref(model)
        self._installed: OffloadBackendBase | None = installed
        self._counters = counters
        self._saved = saved
        self.shared_by = shared_by
        """How many processes of this node share the host copy of the frozen offloaded
        weights (1: this process keeps its own)."""
        self._running: int | None = None  # the thread inside the model's forward, if any
        root = _forward_root(model, plan.offloaded_params)
        self._root_hooks = [
            root.register_forward_pre_hook(self._enter_forward),
            root.register_forward_hook(self._leave_forward, always_call=True),
        ]
        staged = installed.staged
        self._guard = (
            MoveGuard(model, staged.params, runtime.device) if staged is not None else None
        )
        # Pickling and deep copies give the plain model with its true weights.
        self._pickling = PickleGuard(
            model,
            staged.params if staged is not None else [],
            [*installed.hooks, *self._root_hooks],
            runtime,
            [*(self._guard.patches if self._guard is not None else []), *installed.patches],
        )

    def _enter_forward(self, module: nn.Module, args: Any) -> None:
        # The slots are shared state: two threads in one forward at once could overwrite
        # weights the other is computing with. Taking turns is fine; overlapping is refused.
        # (Not traced by torch.compile: compiled forwards are neither counted nor checked.)
        if torch.compiler.is_compiling():
            return
        me = threading.get_ident()
        if self._running not in (None, me):
            raise OffloadError(
                "this offloaded model is already running a forward in another thread; an "
                "offloaded model is not thread-safe: run it from one thread at a time (or "
                "give each thread its own model)"
            )
        self._running = me
        self._counters.forwards += 1
        installed = self._installed
        if installed is not None:
            installed.forward_started()

    def _leave_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        if torch.compiler.is_compiling():
            return
        # Casts autocast cached during this forward (e.g. of zero-copy weights) do not
        # outlive it; the backends drop those of their layers as each one ends.
        self._runtime.forget_cached_casts()
        if self._running == threading.get_ident():
            self._running = None

    @property
    def active(self) -> bool:
        """Whether the offload is still applied."""
        return self._installed is not None

    @property
    def stats(self) -> OffloadStats:
        """What the offload costs and has done so far (a snapshot)."""
        c = self._counters
        # Once removed, the offload holds nothing: the figures of an empty backend.
        installed = self._installed if self._installed is not None else NoOffload()
        return OffloadStats(
            backend=self.plan.backend,
            offloaded_bytes=self.plan.offloaded_bytes,
            device_bytes_saved=(
                self._saved if self._saved is not None else self.plan.device_bytes_saved
            ),
            measured=self._saved is not None,
            host_bytes=installed.host_bytes,
            host_bytes_pinned=installed.host_bytes_pinned,
            pool_bytes=installed.pool_bytes,
            forwards=c.forwards,
            h2d_bytes=c.h2d_bytes,
            h2d_bytes_per_forward=c.h2d_bytes / c.forwards if c.forwards else None,
            loads=c.loads,
            stalls=c.stalls,
            wait_ms=installed.wait_ms,
            host_bytes_shared=installed.host_bytes_shared,
            shared_by=self.shared_by if installed.host_bytes_shared else 1,
        )

    @property
    def partition(self) -> Partition | None:
        """Under data parallelism with trainable offloaded weights, which process of the
        node steps which of them (:class:`~hydra_offload.runtime.partition.Partition`);
        ``None`` otherwise, and once removed."""
        installed = self._installed
        return installed.partition if installed is not None else None

    def clip_grad_norm_(
        self,
        parameters: Iterable[torch.Tensor] | torch.Tensor,
        max_norm: float,
        norm_type: float = 2.0,
        error_if_nonfinite: bool = False,
    ) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` for a model whose offloaded weights train
        split among data-parallel processes: the norm counts the gradients every process of
        the node holds for the parameters it steps, as plain DDP's norm counts all of them
        (a collective then: every process calls it). Without a partition it is
        ``torch.nn.utils.clip_grad_norm_`` itself.
        :class:`~hydra_offload.OffloadCallback` makes Lightning's gradient clipping use it.

        Returns:
            The total norm of the gradients (before clipping).

        Example:
            >>> import torch
            >>> from hydra_offload import apply_offload
            >>> from hydra_offload.models import DecoderLM
            >>> model = DecoderLM(num_layers=2)
            >>> handle = apply_offload(model, {"uva": {"cpu_offload_gb": 1}})
            >>> model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
            >>> float(handle.clip_grad_norm_(model.parameters(), 1e9)) > 0
            True
            >>> handle.remove()
        """
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        params = [p for p in parameters if p.grad is not None]
        partition = self.partition
        if partition is None:
            return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type, error_if_nonfinite)
        grads = [p.grad for p in params if p.grad is not None]
        owned = [p.grad for p in params if p in partition and p.grad is not None]
        others = [p.grad for p in params if p not in partition and p.grad is not None]
        total = torch.tensor(partition.total_norm(owned, others, norm_type))
        if error_if_nonfinite and not bool(torch.isfinite(total)):
            raise RuntimeError(
                f"the total norm of order {norm_type} for gradients is non-finite, so it "
                "cannot be clipped (error_if_nonfinite=True)"
            )
        if grads:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return total

    def gather_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        """Give ``optimizer`` on every process the full state of the offloaded parameters
        (a collective under a partition: every process calls it). Where the offloaded
        weights train split among the processes of a node, each process's optimizer keeps
        the state of the parameters it steps only; after this call each holds all of it, as
        without offload: what a checkpoint saves, and what the parameters take back at
        :meth:`remove`. Does nothing otherwise.
        :class:`~hydra_offload.OffloadCallback` calls it before a checkpoint is saved and at
        the end of a fit.

        Example:
            >>> import torch
            >>> from hydra_offload import apply_offload
            >>> from hydra_offload.models import DecoderLM
            >>> model = DecoderLM(num_layers=2)
            >>> with apply_offload(model, {"uva": {"cpu_offload_gb": 1}}) as handle:
            ...     handle.gather_optimizer_state(torch.optim.AdamW(model.parameters()))
        """
        if self.partition is not None:
            self.partition.gather_state(optimizer)

    @contextmanager
    def trace(self) -> Iterator[StepTrace]:
        """Record the timeline of what runs inside the ``with`` block (usually one forward):
        per offloaded layer, when it computed and when its weights were copied into its
        slots, and which copies were loads on demand (stalls).

        Yields a :class:`~hydra_offload.runtime.trace.StepTrace`; its ``spans`` fill in when
        the block ends (the device is synchronized then, outside the forward), in
        milliseconds from the trace's start, and its ``clock`` says how they were measured:
        ``"device timing events"`` on an accelerator, ``"wall clock (CPU: copies are
        synchronous)"`` on the CPU, ``"simulated device clock"`` on the simulated device.
        :func:`hydra_offload.pictures.timeline_figure` draws it.

        Only the prefetch backend records: under another backend, or once the offload is
        removed, the trace stays empty. Traces do not nest (``RuntimeError``). Without an
        active trace nothing is recorded and the forward costs what it did.

        Example:
            >>> import torch
            >>> from hydra_offload import apply_offload
            >>> from hydra_offload.models import DecoderLM
            >>> model = DecoderLM(num_layers=4).eval()
            >>> ids = torch.randint(0, 1024, (2, 16))
            >>> with apply_offload(model, {"prefetch": {"offload_group_size": 2}}) as handle:
            ...     _ = model(ids)  # a warm-up forward
            ...     with torch.no_grad(), handle.trace() as trace:
            ...         _ = model(ids)
            >>> [s.label for s in trace.lane("compute")], len(trace.stalls)
            (['layers.1', 'layers.3'], 0)
        """
        installed = self._installed
        trace = StepTrace(self._runtime) if installed is not None else StepTrace()
        if installed is None or not installed.start_trace(trace, self.plan):
            yield trace  # nothing records: the trace stays empty
            return
        try:
            yield trace
        finally:
            installed.stop_trace()
            trace.finish()

    def remove(self, device: torch.device | str | None = None) -> None:
        """Restore the model: same parameter objects, values, devices and dtypes; no hooks.

        Args:
            device: where to put the offloaded parameters back; ``None``: the device each
                lived on before offloading.

        Calling it again does nothing.
        """
        if self._installed is None:
            return
        for hook in self._root_hooks:
            hook.remove()
        if self._guard is not None:
            self._guard.remove()
        self._pickling.remove()
        self._installed.remove(torch.device(device) if device is not None else None)
        self._installed = None
        release_freed_memory()  # host storage's small blocks, which glibc would keep
        model = self._model_ref()
        if model is not None:
            for module in model.modules():
                if _ACTIVE.get(module) is self:
                    del _ACTIVE[module]

    def __enter__(self) -> OffloadHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"OffloadHandle({self.plan.backend}, {len(self.plan.params)} params, {state})"


def apply_offload(
    model: nn.Module,
    config: OffloadConfig | Any,
    device: torch.device | str | None = None,
    *,
    zero_copy: bool | None = None,
    processes_per_node: int | None = None,
    host_bytes_available: int | None = None,
    training: bool = True,
    process_group: Any = None,
) -> OffloadHandle:
    """Offload part of ``model``'s weights to host memory, as ``config`` says.

    Args:
        model: the model; offloaded parameters may be on the compute device or on the CPU.
        config: an :class:`OffloadConfig`, ``DictConfig`` or ``dict``.
        device: the compute device layers run on; ``None``: the device of the model's first
            parameter. Parameters that are not offloaded are left where they are.
        zero_copy: UVA only. ``None``: zero-copy views on CUDA, per-forward copies on other
            accelerators; ``False``: always per-forward copies; ``True``: zero-copy or error.
        processes_per_node: how many processes on this machine offload a replica at once
            (data parallel ranks): the host memory check counts them all. ``None``:
            ``LOCAL_WORLD_SIZE`` from the environment (torchrun sets it), else 1.
        host_bytes_available: the host memory, in bytes, that the check compares with: what
            was available before any of those processes offloaded. ``None``: ``MemAvailable``
            read now (no check where it cannot be read). Ranks that apply one after another
            must pass a figure every rank read before any of them applied (read, barrier,
            apply, as :class:`~hydra_offload.OffloadCallback` does): read later, it already
            lacks what earlier ranks took, which the check, counting every process, would
            count twice.
        training: whether backward passes will run through the offload. Gradients of
            offloaded weights are made in host memory at the first backward, so the host
            memory check counts them only when ``True`` (for the weights that require grad);
            pass ``False`` for inference, where the weights alone must fit
            (:class:`~hydra_offload.OffloadCallback` does outside ``fit``).
        process_group: the data-parallel processes that offload this model alike, each its
            own replica (a ``torch.distributed`` process group, e.g.
            ``torch.distributed.group.WORLD``). Every process of the group must call
            ``apply_offload`` together: it is a collective. The processes check that they
            planned the same offload (one line on every process if not, before any
            allocates) and, with ``config.share_host_memory`` (the default), the processes of
            each node keep one host copy of the frozen offloaded weights, in memory they
            share (:mod:`hydra_offload.runtime.shared`), instead of one each. ``None``: this
            process alone, with its own copy. :class:`~hydra_offload.OffloadCallback` passes
            it under DDP.

    Returns:
        The handle: ``plan``, ``stats``, ``remove()``; a context manager.

    Raises:
        OffloadError: the model already carries an offload (this one's or another
            library's), a parameter to offload cannot be (meta, sparse, a tensor subclass no
            adapter takes apart, a quantized weight that requires grad or is not quantized
            yet), or host memory is short. The model is not modified.
        hydra_offload.OffloadConfigError: the configuration is invalid.
        hydra_offload.LayerStackError: prefetch cannot find or use the layer stack.
        ValueError: ``processes_per_node`` is below 1 or ``host_bytes_available`` below 0.

    A failure half-way (host or device memory exhausted) restores the model before raising.
    While the offload is active, ``.to()`` / ``.cuda()`` / ``.half()``... that would move or
    convert an offloaded parameter raise :class:`OffloadError` without changing anything;
    moves that leave offloaded parameters where they are (onto the compute device) work.

    The host memory check counts the offloaded weights and, when ``training``, the
    gradients of the trainable ones, in each process on the node. Training may need more
    that it cannot know in advance (gradient accumulation's staging buffers, optimizer state
    kept in host memory): the refusal's message says how much.

    Example (8 data parallel ranks; each rank read the same figure before any applied):
        >>> from hydra_offload.models import DecoderLM
        >>> model = DecoderLM(num_layers=4).requires_grad_(False)
        >>> config = {"prefetch": {"offload_group_size": 2}}
        >>> apply_offload(model, config, processes_per_node=8,
        ...               host_bytes_available=64 << 30).remove()
        >>> apply_offload(model, config, processes_per_node=8, host_bytes_available=1 << 20)
        Traceback (most recent call last):
        hydra_offload.errors.OffloadError: offloading needs ... of the 8 processes ...
    """
    config = to_offload_config(config)
    compute = _compute_device(model, device)
    plan = plan_offload(model, config, device=compute)
    params = dict(model.named_parameters())
    sharing = process_group is not None and config.share_host_memory and can_share()
    problem: BaseException | None = None
    try:
        for module in model.modules():
            if module in _ACTIVE:
                raise OffloadError(
                    f"{type(model).__name__} already has an offload applied "
                    f"({_ACTIVE[module]!r}); call remove() on that handle first"
                )
        _check_offloadable(
            model, plan, params, _processes_on_node(processes_per_node), host_bytes_available,
            training, shared=sharing,
        )  # fmt: skip
    except (OffloadError, ValueError) as err:
        if process_group is None:
            raise
        problem = err
    node = None
    if process_group is not None:
        # Every process of the group meets here, also one that cannot go on: none is left
        # waiting for it in a collective, and all refuse together.
        try:
            node = join_node(
                process_group,
                _signature(plan, params),
                None if problem is None else str(problem),
                share=sharing,
            )
        except OffloadError:
            if problem is not None:
                raise problem from None
            raise
    runtime = runtime_for(compute)
    trainable = [params[name] for name in plan.offloaded_params if params[name].requires_grad]
    partition = None
    if process_group is not None and trainable:
        # Every process of the group gets here (a refusal above is raised on all of them).
        partition = Partition(process_group, trainable, node, device=runtime.device)
    counters = Counters()
    saved = None
    if not plan.params:
        if plan.backend != "none":
            warn_at_caller(
                "the offload plan selects no parameter: nothing is offloaded "
                f"({'; '.join(plan.notes) or 'empty selection'})",
                OffloadPlanWarning,
            )
        installed = create_backend(model, plan, runtime, counters)  # NoOffload
    else:
        on_device = all(params[p.name].device == runtime.device for p in plan.params)
        before = runtime.memory_allocated()
        installed = create_backend(
            model, plan, runtime, counters, zero_copy=zero_copy, node=node, partition=partition
        )
        after = runtime.memory_allocated()
        if on_device and before is not None and after is not None:
            saved = before - after
        # The parameters' own memory is free now (this process's copy of shared weights, or
        # weights that started in host memory): give it back to the operating system, which
        # glibc would otherwise keep in its heap for blocks below its mmap threshold.
        release_freed_memory()
    shared_by = node.size if node is not None else 1
    handle = OffloadHandle(model, plan, runtime, installed, counters, saved, shared_by)
    for module in model.modules():
        _ACTIVE[module] = handle
    note_applied()
    return handle


def get_offload_handle(model: nn.Module) -> OffloadHandle | None:
    """The handle of the offload active on ``model``, or ``None`` when it has none.

    An offload applied to a model containing ``model`` counts too: each module has at most
    one active offload (docs/spec.md §6.2). A removed offload is forgotten at once.

    Example:
        >>> import torch
        >>> from hydra_offload import apply_offload, get_offload_handle
        >>> from hydra_offload.models import DecoderLM
        >>> model = DecoderLM(num_layers=4).eval()
        >>> get_offload_handle(model) is None
        True
        >>> handle = apply_offload(model, {"prefetch": {"offload_group_size": 2}})
        >>> get_offload_handle(model) is handle, get_offload_handle(model.layers[1]) is handle
        (True, True)
        >>> handle.remove()
        >>> get_offload_handle(model) is None
        True
    """
    return _ACTIVE.get(model)


# Attributes other offloading libraries leave on the modules they manage.
_FOREIGN_HOOKS = {
    "_hf_hook": "Hugging Face accelerate (cpu_offload / dispatch_model)",
    "_diffusers_hook": "diffusers (enable_model_cpu_offload / group offloading)",
}


def _check_offloadable(
    model: nn.Module,
    plan: OffloadPlan,
    params: dict[str, nn.Parameter],
    processes: int,
    host_bytes_available: int | None = None,
    training: bool = True,
    *,
    shared: bool = False,
) -> None:
    """Refuse, before anything is modified, what the backends cannot serve correctly.

    Host memory: the offloaded weights and, when ``training``, the gradients of the
    trainable ones, times ``processes``, against ``host_bytes_available`` (``None``:
    ``MemAvailable`` now); with ``shared``, the weights (and the gradients of the trainable
    ones, which one process of the node keeps each) once for the node.
    """
    if host_bytes_available is not None and host_bytes_available < 0:
        raise ValueError(
            f"host_bytes_available must be >= 0 or None, got {host_bytes_available}: pass the "
            "bytes of host memory available before any process offloaded, or None to read "
            "MemAvailable now"
        )
    for module_name, module in model.named_modules():
        for attribute, owner in _FOREIGN_HOOKS.items():
            if getattr(module, attribute, None) is not None:
                raise OffloadError(
                    f"{module_name or type(model).__name__} carries {owner} hooks "
                    f"({attribute}); two offloaders would fight over the same weights: remove "
                    "the other library's hooks first"
                )
    meta = [p.name for p in plan.params if params[p.name].is_meta]
    if meta:
        raise OffloadError(
            f"{len(meta)} parameter(s) to offload are on the meta device (not materialized), "
            f"e.g. {meta[0]}; load the weights (or to_empty() and initialize) first"
        )
    weights = grads = once = 0
    for planned in plan.params:
        param = params[planned.name]
        problem = offload_problem(model, planned.name, param)
        if problem:
            raise OffloadError(f"{planned.name} {problem}")
        if shared:
            once += planned.nbytes  # one copy for the node, shared by its processes
            if training and param.requires_grad:
                once += planned.nbytes  # its gradient, kept by the one process that steps it
            continue
        weights += planned.nbytes
        if training and param.requires_grad:
            grads += planned.nbytes  # its gradient lives in host memory too
    given = host_bytes_available is not None
    available = host_bytes_available if given else available_host_bytes()
    needed = once + (weights + grads) * processes
    if available is not None and needed > available:
        what = f"{weights:,} bytes of weights" + (
            f" and {grads:,} of gradients of the trainable ones" if grads else ""
        )
        if once:
            what = f"{once:,} bytes shared by the node's processes, " + what
        each = f" in each of the {processes} processes on this node" if processes > 1 else ""
        when = "were available before offloading began" if given else "are available"
        raise OffloadError(
            f"offloading needs {needed:,} bytes of host memory ({what}{each}) but only "
            f"{available:,} {when}; lower cpu_offload_gb or offload fewer layers"
            + _training_extra(plan.backend, grads)
        )


def _training_extra(backend: str, grads: int) -> str:
    """What training adds in host memory that the check cannot count, as the end of its
    message: nothing without trainable offloaded weights.

    Where the optimizer steps on host weights (prefetch, UVA in copy mode), a gradient that
    arrives while the last one is still held (gradient accumulation, ``zero_grad(
    set_to_none=False)``) is staged in a second buffer as large as the gradients, and the
    optimizer makes its state there. Neither is known when the offload is applied, and
    counting them always would refuse runs that never need them. UVA's zero-copy views
    accumulate in place and leave the optimizer's state on the device.
    """
    if not grads:
        return ""
    where = "prefetch" if backend == "prefetch" else "UVA in copy mode"
    return (
        f". Training needs more host memory, which this check cannot know in advance: with "
        f"{where}, gradient accumulation stages each new gradient in a second buffer (as large "
        f"as the gradients: {grads:,} bytes per process) and the optimizer keeps its state for "
        f"these weights in host memory (AdamW's two moments: {2 * grads:,} bytes per process)"
    )


def _processes_on_node(processes: int | None) -> int:
    """How many processes on this machine offload at once: given, or ``LOCAL_WORLD_SIZE``
    (set by torchrun), else 1."""
    if processes is not None:
        if processes < 1:
            raise ValueError(f"processes_per_node must be >= 1, got {processes}")
        return processes
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def available_host_bytes() -> int | None:
    """The host memory available now: ``MemAvailable`` from ``/proc/meminfo`` (Linux), or
    ``None`` where it cannot be read.

    Processes on one node that offload one after another (``torchrun`` ranks) read it on
    every rank before any of them applies, and pass it as ``apply_offload``'s
    ``host_bytes_available``; otherwise a later rank sees the memory the earlier ones took and
    counts it twice. ``OffloadCallback`` does this itself.

    Example (in each ``torchrun`` rank, the process group initialized)::

        reading = available_host_bytes()
        torch.distributed.barrier()  # every rank has read before any allocates
        handle = apply_offload(model, config, host_bytes_available=reading)

    >>> available_host_bytes() is None or available_host_bytes() > 0
    True
    """
    return proc_bytes("/proc/meminfo", "MemAvailable")


def _forward_root(model: nn.Module, names: tuple[str, ...]) -> nn.Module:
    """The innermost called module that contains every offloaded parameter: one forward of
    the model, however it is entered (``module(x)`` or ``module.model(x)``), is one call."""
    prefixes = [name.split(".")[:-1] for name in names]
    common: list[str] = []
    for parts in zip(*prefixes, strict=False):  # up to the shortest prefix
        if any(part != parts[0] for part in parts):
            break
        common.append(parts[0])
    while common:
        module = model.get_submodule(".".join(common))
        if not isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            return module
        common.pop()
    return model


def _compute_device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    if device is not None:
        resolved = torch.device(device)
        if resolved.type == "cuda" and resolved.index is None:
            resolved = torch.device("cuda", torch.cuda.current_device())
        return resolved
    for param in model.parameters():
        if not param.is_meta:
            return param.device
    return torch.device("cpu")


def _signature(plan: OffloadPlan, params: dict[str, nn.Parameter]) -> str:
    """What a process is about to offload, as text every process of a data-parallel group
    must share: the config, and each offloaded parameter's name, layouts and whether it
    trains (which decides whether it is shared)."""
    lines = [plan.backend, plan.config_hash]
    lines += [f"{p.name} {p.layouts} {params[p.name].requires_grad} {p.slot}" for p in plan.params]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()
