"""The contract every backend keeps, the backend of an empty plan, and the factory.

An :class:`~hydra_offload.OffloadHandle` talks to its installed offload only through
:class:`OffloadBackendBase`: what was staged in host memory, the hooks registered, the bytes
held (device pool, host memory, page-locked host memory), the time spent waiting for copies,
the start of each forward, and removal. Every member is abstract, so a backend that forgets
one cannot be instantiated, and the handle never guesses a default for a missing member.

:func:`create_backend` picks the backend a plan names (``"uva"``:
:class:`~hydra_offload.backends.uva.UVAOffload`, ``"prefetch"``:
:class:`~hydra_offload.backends.prefetch.PrefetchOffload`) and installs it; a plan that
offloads nothing (backend ``"none"``, or an empty selection) gets :class:`NoOffload`.

Example:
    >>> import torch
    >>> from hydra_offload.plan import plan_offload
    >>> from hydra_offload.runtime import DeviceRuntime
    >>> model = torch.nn.Linear(4, 4)
    >>> plan = plan_offload(model, {"uva": {"cpu_offload_gb": 1}})
    >>> backend = create_backend(model, plan, DeviceRuntime(torch.device("cpu")))
    >>> isinstance(backend, OffloadBackendBase), type(backend).__name__
    (True, 'UVAOffload')
    >>> [entry.name for entry in backend.staged.params]
    ['weight', 'bias']
    >>> backend.host_bytes > 0, backend.pool_bytes, backend.wait_ms
    (True, 0, None)
    >>> backend.remove()
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from hydra_offload.plan import OffloadPlan
from hydra_offload.runtime import DeviceRuntime
from hydra_offload.runtime.counters import Counters
from hydra_offload.runtime.params import Staged

__all__ = ["NoOffload", "OffloadBackendBase", "create_backend"]


class OffloadBackendBase(abc.ABC):
    """The installed offload of one model, as its :class:`~hydra_offload.OffloadHandle`
    sees it.

    A backend installs itself when constructed (staging weights in host memory, registering
    hooks) and undoes all of it in :meth:`remove`. It reports what it holds through the
    properties below, which :attr:`OffloadHandle.stats <hydra_offload.OffloadHandle.stats>`
    reads as they are, with no fallback: every member is abstract and must be implemented.

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
    @abc.abstractmethod
    def pool_bytes(self) -> int:
        """Bytes of device memory the backend allocated for weights in flight (the
        prefetch buffer pool); 0 when it allocates none."""

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
    @abc.abstractmethod
    def wait_ms(self) -> float | None:
        """Milliseconds the compute stream waited for copies, measured with device timing
        events; ``None`` where the backend does not measure it."""

    @abc.abstractmethod
    def forward_started(self) -> None:
        """Called by the handle as each (eager) forward of the model starts, before any
        offloaded layer runs; a backend with nothing to do then does nothing."""

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
    def pool_bytes(self) -> int:
        return 0

    @property
    def host_bytes(self) -> int:
        return 0

    @property
    def host_bytes_pinned(self) -> int:
        return 0

    @property
    def wait_ms(self) -> None:
        return None

    def forward_started(self) -> None:
        return None

    def remove(self, device: torch.device | None = None) -> None:
        return None


def create_backend(
    model: nn.Module,
    plan: OffloadPlan,
    runtime: DeviceRuntime,
    counters: Counters | None = None,
    *,
    zero_copy: bool | None = None,
) -> OffloadBackendBase:
    """Install the backend ``plan`` names on ``model``, the one place a backend is chosen.

    Args:
        model: the model ``plan`` was made for (:func:`~hydra_offload.plan.plan_offload`).
        plan: what to offload; ``plan.backend`` picks the backend.
        runtime: the compute device's runtime: every stream, event, copy and host allocation
            goes through it.
        counters: where the backend counts loads, copied bytes and stalls (the handle reads
            them for its statistics); ``None``: fresh counters.
        zero_copy: UVA only (see :func:`hydra_offload.apply_offload`); ignored otherwise.

    Returns:
        :class:`NoOffload` when the plan offloads no parameter (backend ``"none"`` or an
        empty selection), else a :class:`~hydra_offload.backends.uva.UVAOffload` or
        :class:`~hydra_offload.backends.prefetch.PrefetchOffload`, installed.

    Raises:
        ValueError: ``plan.backend`` names no known backend.

    A backend that fails while installing restores the model before the error propagates.
    Most code wants :func:`hydra_offload.apply_offload`, which checks the model first and
    wraps the backend in a handle.
    """
    if counters is None:
        counters = Counters()
    if plan.backend == "none" or not plan.params:
        return NoOffload()
    # Imported here: the backends import this module for the base class.
    if plan.backend == "uva":
        from hydra_offload.backends.uva import UVAOffload

        return UVAOffload(model, plan, runtime, counters, zero_copy=zero_copy)
    if plan.backend == "prefetch":
        from hydra_offload.backends.prefetch import PrefetchOffload

        return PrefetchOffload(model, plan, runtime, counters)
    raise ValueError(f"no backend is called {plan.backend!r}; expected 'none', 'uva' or 'prefetch'")
