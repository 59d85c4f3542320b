"""The backends: each turns an :class:`~hydra_offload.plan.OffloadPlan` into an installed
offload, using only the primitives in :mod:`hydra_offload.runtime`."""
