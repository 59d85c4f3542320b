"""Lightning's training loop around offloaded weights that train split among data-parallel
processes (see :mod:`hydra_offload.runtime.partition`).

Under DDP each process of a node steps only the offloaded parameters it owns, so what
Lightning does around a step must count the others' too. While a fit runs,
:func:`follow_partition` makes the precision plugin

- clip gradients by norm with the norm of every process's parameters together
  (:meth:`OffloadHandle.clip_grad_norm_ <hydra_offload.OffloadHandle.clip_grad_norm_>`), equal
  to DDP's; clipping by value needs nothing (each element on its own);
- with ``16-mixed``, skip a step on every process when any found an inf or NaN in the
  gradients it unscaled (each process unscales only its own), so that all skip or step alike
  and the loss scale stays the same everywhere.

:func:`gather_checkpoint_state` gives a checkpoint the optimizers' full state (each process
keeps only its own parameters'), so the checkpoint is the one a run without offload writes,
loadable with another number of processes; the callback calls it as a checkpoint is saved,
and :meth:`OffloadHandle.gather_optimizer_state
<hydra_offload.OffloadHandle.gather_optimizer_state>` at the end of a fit, before the
parameters go back with their state.

Example (one process: nothing is split, nothing is patched):
    >>> from lightning.pytorch import Trainer
    >>> from hydra_offload import apply_offload
    >>> from hydra_offload.models import DecoderLM
    >>> trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    >>> model = DecoderLM(num_layers=2)
    >>> with apply_offload(model, {"uva": {"cpu_offload_gb": 1}}) as handle:
    ...     follow_partition(trainer, handle)
    []
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Trainer

from hydra_offload.offload import OffloadHandle
from hydra_offload.runtime.partition import Partition, check_optimizer
from hydra_offload.weights import ModulePatch

__all__ = ["check_optimizers", "follow_partition", "gather_checkpoint_state"]


def follow_partition(trainer: Trainer, handle: OffloadHandle) -> list[ModulePatch]:
    """Make ``trainer``'s precision plugin clip and scale gradients across the partition
    of ``handle`` (see the module docstring); returns the patches, to remove when the fit
    ends (none without a partition)."""
    partition = handle.partition
    if partition is None:
        return []
    precision = trainer.precision_plugin

    def clip_grad_by_norm(optimizer: Any, clip_val: float) -> None:
        handle.clip_grad_norm_(precision.main_params(optimizer), clip_val)

    patches = [ModulePatch(precision, "clip_grad_by_norm", clip_grad_by_norm)]  # type: ignore[arg-type]
    scaler = getattr(precision, "scaler", None)
    if isinstance(scaler, torch.amp.GradScaler):
        unscale = scaler.unscale_

        def unscale_then_agree(optimizer: Any) -> None:
            unscale(optimizer)
            _agree_on_found_inf(scaler, optimizer, partition)

        patches.append(ModulePatch(scaler, "unscale_", unscale_then_agree))  # type: ignore[arg-type]
    return patches


def _agree_on_found_inf(
    scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer, partition: Partition
) -> None:
    """After ``scaler`` unscaled ``optimizer``'s gradients here: if any process found an inf
    or NaN, every process records one, so every process skips the step (a collective)."""
    state = scaler._per_optimizer_states[id(optimizer)]
    found = state["found_inf_per_device"]
    if partition.any(any(bool(v.item()) for v in found.values())):
        for value in found.values():
            value.fill_(1.0)


def check_optimizers(trainer: Trainer, handle: OffloadHandle) -> None:
    """Refuse, on every process alike, an optimizer of the fit that the partition of
    ``handle`` cannot split (see :func:`~hydra_offload.runtime.partition.partition_problem`).

    Raises:
        OffloadError: one cannot be split; the message names it and what to use instead.
    """
    if handle.partition is None:
        return
    for optimizer in trainer.optimizers:
        check_optimizer(getattr(optimizer, "_optimizer", optimizer))


def gather_checkpoint_state(
    trainer: Trainer, handle: OffloadHandle, checkpoint: dict[str, Any]
) -> None:
    """Put the optimizers' full state into ``checkpoint`` (being saved; every process calls
    this, a collective under a partition): each process's optimizer gets the state of the
    parameters the others own, and the checkpoint's ``optimizer_states`` are read again.
    The state of parameters a process does not own is forgotten again at its next step."""
    if handle.partition is None or "optimizer_states" not in checkpoint:
        return
    states = []
    for optimizer in trainer.optimizers:
        handle.gather_optimizer_state(getattr(optimizer, "_optimizer", optimizer))
        states.append(trainer.strategy.optimizer_state(optimizer))
    checkpoint["optimizer_states"] = states
