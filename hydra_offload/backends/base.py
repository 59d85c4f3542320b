"""The contract every backend keeps, and the backend of an empty plan.

An :class:`~hydra_offload.OffloadHandle` talks to its installed offload only through
:class:`OffloadBackendBase`: what was staged in host memory, the hooks registered, the bytes
held (device pool, host memory, page-locked host memory), the time spent waiting for copies,
the start of each forward, and removal. What every backend must say (what it staged, its
hooks, its host bytes, how it is removed) is abstract, so a backend that forgets one cannot be
instantiated; the rest has a default here, in one place (no device pool, no timing, nothing
to do as a forward starts), and the handle never guesses a value for a missing member.
A plan that offloads nothing gets :class:`NoOffload`; the factory that picks a backend is
:func:`hydra_offload.backends.create_backend`.

A new backend is a module next to this one with a subclass of :class:`OffloadBackendBase`,
and one branch in :func:`~hydra_offload.backends.create_backend`.

Example:
    >>> backend = NoOffload()
    >>> isinstance(backend, OffloadBackendBase), backend.staged, backend.pool_bytes
    (True, None, 0)
"""

from __future__ import annotations

import abc
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from hydra_offload.runtime.grads import HostGradients
from hydra_offload.runtime.host import HostStorage
from hydra_offload.runtime.params import Staged
from hydra_offload.runtime.partition import Partition, check_optimizer
from hydra_offload.runtime.trace import StepTrace
from hydra_offload.weights import ModulePatch

if TYPE_CHECKING:
    from hydra_offload.plan import OffloadPlan

__all__ = ["NoOffload", "OffloadBackendBase", "StagedOffload"]


class OffloadBackendBase(abc.ABC):
    """The installed offload of one model, as its :class:`~hydra_offload.OffloadHandle`
    sees it.

    A backend installs itself when constructed (staging weights in host memory, registering
    hooks) and undoes all of it in :meth:`remove`. It reports what it holds through the
    properties below, which :attr:`OffloadHandle.stats <hydra_offload.OffloadHandle.stats>`
    reads as they are: the abstract members must be implemented, the others have a default.

    Example:
        >>> class Incomplete(OffloadBackendBase):
        ...     def remove(self, device=None):
        ...         pass
        >>> Incomplete()  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        TypeError: Can't instantiate abstract class Incomplete ...
    """

    @property
    @abc.abstractmethod
    def staged(self) -> Staged | None:
        """The offloaded parameters and the host storage holding their true weights;
        ``None`` when nothing is staged (:class:`NoOffload`)."""

    @property
    @abc.abstractmethod
    def hooks(self) -> Sequence[RemovableHandle]:
        """The handles of every hook the backend registered (on modules, parameters and
        optimizers), which pickling and deep copies of the model leave out."""

    @property
    def patches(self) -> Sequence[ModulePatch]:
        """Module attributes the backend replaced while installed (see
        :class:`~hydra_offload.weights.ModulePatch`), which pickling and deep copies of the
        model leave out. Default: none."""
        return ()

    @property
    def pool_bytes(self) -> int:
        """Bytes of device memory the backend allocated for weights in flight (the
        prefetch buffer pool). Default: 0, a backend without a device pool."""
        return 0

    @property
    @abc.abstractmethod
    def host_bytes(self) -> int:
        """Bytes of host memory allocated: offloaded weights, host gradients of trainable
        offloaded weights and their staging buffers, alignment padding included."""

    @property
    @abc.abstractmethod
    def host_bytes_pinned(self) -> int:
        """Of :attr:`host_bytes`, the bytes page-locked with the device runtime (0 on the
        CPU)."""

    @property
    def host_bytes_shared(self) -> int:
        """Of :attr:`host_bytes`, the bytes in memory the processes of this node share (see
        :mod:`hydra_offload.runtime.shared`). Default: 0, nothing shared."""
        return 0

    @property
    def wait_ms(self) -> float | None:
        """Milliseconds the compute stream waited for copies, measured with device timing
        events. Default: ``None``, not measured."""
        return None

    @property
    def partition(self) -> Partition | None:
        """Under data parallelism, which process of the node steps which trainable
        offloaded parameter (:mod:`hydra_offload.runtime.partition`). Default: ``None``,
        this process steps every parameter it holds."""
        return None

    def start_trace(self, trace: StepTrace, plan: OffloadPlan) -> bool:
        """Record copies and layer computes into ``trace`` until :meth:`stop_trace` (see
        :meth:`OffloadHandle.trace <hydra_offload.OffloadHandle.trace>`); ``plan`` is the plan
        the backend was installed from. Returns whether anything will be recorded.
        Default: ``False``, a backend without copies to show.

        Raises:
            RuntimeError: a trace is already recording (traces do not nest).
        """
        return False

    def stop_trace(self) -> None:
        """Stop recording into the trace :meth:`start_trace` began. Default: nothing."""
        return None

    def forward_started(self) -> None:
        """Called by the handle as each (eager) forward of the model starts, before any
        offloaded layer runs. Default: nothing to do."""
        return None

    @abc.abstractmethod
    def remove(self, device: torch.device | None = None) -> None:
        """Undo the install: every hook removed, each offloaded parameter (the same object)
        back on ``device``, or where it lived before when ``None``, with its values and
        gradient; host and device memory of the backend released. Called once, by
        :meth:`OffloadHandle.remove <hydra_offload.OffloadHandle.remove>`."""


class NoOffload(OffloadBackendBase):
    """The backend of a plan that offloads nothing: it holds nothing and changes nothing.

    Example:
        >>> backend = NoOffload()
        >>> backend.staged, list(backend.hooks), backend.pool_bytes, backend.wait_ms
        (None, [], 0, None)
        >>> backend.forward_started(); backend.remove()  # both do nothing
    """

    @property
    def staged(self) -> None:
        return None

    @property
    def hooks(self) -> Sequence[RemovableHandle]:
        return ()

    @property
    def host_bytes(self) -> int:
        return 0

    @property
    def host_bytes_pinned(self) -> int:
        return 0

    def remove(self, device: torch.device | None = None) -> None:
        return None


class StagedOffload(OffloadBackendBase):
    """What the backends that move weights share: parameters staged in host memory
    (``_staged``), the hooks they registered (``_hooks``), and host gradients of trainable
    offloaded weights (``grads``). Host memory is counted here once, from
    :meth:`_host_storages` and ``grads``.

    Example:
        >>> from hydra_offload.backends import PrefetchOffload, UVAOffload
        >>> issubclass(UVAOffload, StagedOffload), issubclass(PrefetchOffload, StagedOffload)
        (True, True)
    """

    _staged: Staged
    _hooks: list[RemovableHandle]
    _patches: list[ModulePatch]
    _optimizers: weakref.WeakSet[torch.optim.Optimizer]
    grads: HostGradients | None
    _partition: Partition | None

    @property
    def partition(self) -> Partition | None:
        """Which process of the node steps which trainable offloaded parameter; ``None``:
        this process steps all (see :mod:`hydra_offload.runtime.partition`)."""
        return self._partition

    @property
    def staged(self) -> Staged:
        """The offloaded parameters and the host storage of their true weights."""
        return self._staged

    @property
    def hooks(self) -> list[RemovableHandle]:
        """The handles of every hook this offload registered (on modules, parameters and
        optimizers), those of the weight adapters included."""
        return list(self._hooks)

    @property
    def patches(self) -> list[ModulePatch]:
        """Module attributes the weight adapters replaced (see
        :meth:`WeightAdapter.install <hydra_offload.weights.WeightAdapter.install>`)."""
        return list(self._patches)

    def _steps(self, param: nn.Parameter) -> bool:
        """Whether this process steps ``param``: not when a partition gives it to another
        process of the node."""
        return self.partition is None or self.partition.steps(param)

    def _remember(self, optimizer: torch.optim.Optimizer, held: list[nn.Parameter]) -> None:
        """``optimizer`` holds offloaded parameters (``held``): remember it (its state
        follows the parameters back at removal); under a partition, refuse it if it cannot
        be split, and forget the state of parameters another process steps (a loaded
        checkpoint gives every process all of it)."""
        if self.partition is not None:
            if optimizer not in self._optimizers:
                check_optimizer(optimizer)
            self.partition.drop_state(optimizer, held)
        self._optimizers.add(optimizer)

    def _install_weights(self) -> None:
        """What each offloaded parameter's adapter needs while offloaded (hooks, patches),
        installed after the backend's own hooks (an adapter's forward pre-hook goes first,
        so it sees the layer before the backend serves it)."""
        for entry in self._staged.params:
            for handle in entry.weights.install(entry.hosts):
                if isinstance(handle, ModulePatch):
                    self._patches.append(handle)
                else:
                    self._hooks.append(handle)

    def _remove_hooks(self) -> None:
        """Remove every hook and patch of the backend and of the weight adapters."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        for patch in getattr(self, "_patches", ()):
            patch.remove()
        self._patches = []

    def _host_storages(self) -> list[HostStorage]:
        """The host storage the backend holds besides ``grads``: the staged weights, and
        whatever a backend adds."""
        return [self._staged.storage]

    @property
    def host_bytes(self) -> int:
        """Host memory allocated: weights, gradients of trainable offloaded weights and their
        staging buffers."""
        grads = self.grads.nbytes if self.grads is not None else 0
        return sum(s.nbytes for s in self._host_storages()) + grads

    @property
    def host_bytes_pinned(self) -> int:
        """Of :attr:`host_bytes`, the page-locked bytes (0 on the CPU)."""
        grads = self.grads.pinned_bytes if self.grads is not None else 0
        return sum(s.pinned_bytes for s in self._host_storages()) + grads

    @property
    def host_bytes_shared(self) -> int:
        """Of :attr:`host_bytes`, the bytes the node's processes share."""
        return sum(s.shared_bytes for s in self._host_storages())
