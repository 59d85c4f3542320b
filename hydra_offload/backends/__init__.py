"""The backends: each turns an :class:`~hydra_offload.plan.OffloadPlan` into an installed
offload, using only the primitives in :mod:`hydra_offload.runtime`.

Every backend implements :class:`~hydra_offload.backends.base.OffloadBackendBase` (``base.py``);
:func:`create_backend` is the one place a backend is picked from a plan (``"uva"``:
:class:`~hydra_offload.backends.uva.UVAOffload`, ``"prefetch"``:
:class:`~hydra_offload.backends.prefetch.PrefetchOffload`; a plan that offloads nothing, backend
``"none"`` or an empty selection, gets :class:`~hydra_offload.backends.base.NoOffload`).

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

from torch import nn

from hydra_offload.backends.base import NoOffload, OffloadBackendBase
from hydra_offload.backends.prefetch import PrefetchOffload
from hydra_offload.backends.uva import UVAOffload
from hydra_offload.plan import OffloadPlan
from hydra_offload.runtime import DeviceRuntime
from hydra_offload.runtime.counters import Counters
from hydra_offload.runtime.partition import Partition
from hydra_offload.runtime.shared import NodeGroup

__all__ = ["NoOffload", "OffloadBackendBase", "PrefetchOffload", "UVAOffload", "create_backend"]


def create_backend(
    model: nn.Module,
    plan: OffloadPlan,
    runtime: DeviceRuntime,
    counters: Counters | None = None,
    *,
    zero_copy: bool | None = None,
    node: NodeGroup | None = None,
    partition: Partition | None = None,
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
        node: the processes of this node that share the frozen offloaded weights' host
            memory (:func:`~hydra_offload.runtime.shared.join_node`); ``None``: this
            process keeps its own copy. With a node, every process of its group must call
            this with the same plan.
        partition: under data parallelism, which process steps which trainable offloaded
            parameter (:class:`~hydra_offload.runtime.partition.Partition`): their gradients
            are averaged over the group, and with a ``node`` their weights are shared too.
            ``None``: this process trains alone; with a ``node``, trainable weights then stay
            in each process's own memory.

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
    if plan.backend == "uva":
        return UVAOffload(
            model, plan, runtime, counters, zero_copy=zero_copy, node=node, partition=partition
        )
    if plan.backend == "prefetch":
        return PrefetchOffload(model, plan, runtime, counters, node=node, partition=partition)
    raise ValueError(f"no backend is called {plan.backend!r}; expected 'none', 'uva' or 'prefetch'")
