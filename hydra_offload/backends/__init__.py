"""The backends: each turns an :class:`~hydra_offload.plan.OffloadPlan` into an installed
offload, using only the primitives in :mod:`hydra_offload.runtime`.

Every backend implements :class:`~hydra_offload.backends.base.OffloadBackendBase`, and
:func:`~hydra_offload.backends.base.create_backend` picks one from a plan."""

from hydra_offload.backends.base import NoOffload, OffloadBackendBase, create_backend

__all__ = ["NoOffload", "OffloadBackendBase", "create_backend"]
