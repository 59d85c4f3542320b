"""The Lightning callback: offload a LightningModule's weights for fit, validate, test and
predict, and give the module back intact at the end.

When the offload is applied matters. Lightning runs, for every stage (``Trainer._run``):
callback ``setup`` -> ``configure_model`` -> ``strategy.setup`` (precision
``convert_module``, ``model_to_device``, the DDP wrapper, optimizers) -> the stage ->
``strategy.teardown`` (the module moves to the CPU) -> callback ``teardown``. So:

- ``setup`` validates and wraps the module's ``configure_model``: the offload is applied right
  after it, so layers built there are covered, and before the strategy moves anything, so
  offloaded weights never all reach the device: a model larger than the device works.
- A "true" half precision (``bf16-true``, ``16-true``, ``64-true``) is applied to the module
  just before offloading, so host storage already has the final dtype and the strategy's own
  conversion finds nothing left to convert (converting afterwards would re-materialise the
  weights on the device).
- Offloaded parameters then point at device memory the offload owns (slots, zero-copy views),
  so the strategy's ``module.to(device)`` leaves them where they are.
- Under DDP the offloaded parameters are listed in the module's
  ``_ddp_params_and_buffers_to_ignore``: DDP neither broadcasts into them nor syncs them, and
  each rank offloads its own replica.
- At the end of the stage (or on an exception) the offload is removed before the strategy's
  teardown, with the offloaded parameters restored on the CPU, where Lightning puts the whole
  module: code after ``trainer.fit()`` sees a normal module, and the device never has to hold
  the whole model.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.plugins.precision import DoublePrecision, HalfPrecision
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from hydra_offload.config import OffloadConfig
from hydra_offload.hydra import to_offload_config
from hydra_offload.offload import OffloadError, OffloadHandle, OffloadStats, apply_offload
from hydra_offload.plan import OffloadPlan, plan_offload

__all__ = ["OffloadCallback"]

_STAGE_FN = {
    "fit": TrainerFn.FITTING,
    "validate": TrainerFn.VALIDATING,
    "test": TrainerFn.TESTING,
    "predict": TrainerFn.PREDICTING,
}


class OffloadCallback(Callback):
    """Keeps part of a LightningModule's weights in host memory while the Trainer runs.

    Args:
        config: an :class:`~hydra_offload.OffloadConfig`, a Hydra ``DictConfig`` (e.g.
            ``cfg.offload``) or a ``dict``; validated here, so a bad config fails before any
            work starts.
        log_every_n_steps: how often (in training steps) to send the offload's statistics
            to the Trainer's loggers; they are also sent at the end of every stage. ``None``:
            the Trainer's ``log_every_n_steps``.

    Logged metrics (rank zero): ``offload/device_bytes_saved``, ``offload/offloaded_bytes``,
    ``offload/pool_bytes``, ``offload/host_bytes_pinned``, ``offload/h2d_bytes_per_forward``,
    ``offload/stalls`` and, where measured, ``offload/wait_ms``.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> from hydra_offload import OffloadCallback
        >>> callback = OffloadCallback({"prefetch": {"offload_group_size": 2}})
        >>> trainer = Trainer(callbacks=[callback], accelerator="cpu", logger=False,
        ...                   enable_progress_bar=False, enable_model_summary=False)
        >>> callback.config.resolved_backend
        'prefetch'
    """

    def __init__(
        self,
        config: OffloadConfig | dict[str, Any] | Any,
        log_every_n_steps: int | None = None,
    ) -> None:
        self.config: OffloadConfig = to_offload_config(config)
        if log_every_n_steps is not None and log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps must be >= 1 or None, got {log_every_n_steps}")
        self.log_every_n_steps = log_every_n_steps
        self.handle: OffloadHandle | None = None
        """The active offload, while a stage runs."""
        self.last_stats: OffloadStats | None = None
        """The statistics at the end of the last stage."""
        self.last_plan: OffloadPlan | None = None
        """The plan of the last stage's offload (it stays after the offload is removed)."""
        self._stage: str | None = None
        self._patched: LightningModule | None = None
        self._module: Any = None
        self._ddp_ignored_before: Any = None
        self._warned_cpu = False

    # ---------------------------------------------------------------- applying
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.config.resolved_backend == "none":
            return
        self._stage = stage
        original = pl_module.configure_model

        def configure_model_then_offload() -> None:
            original()
            self._apply(trainer, pl_module)

        # An instance attribute, so Lightning sees configure_model as overridden and calls it
        # (inside its device and precision contexts) even when the module does not define it.
        pl_module.configure_model = configure_model_then_offload  # type: ignore[method-assign]
        self._patched = pl_module

    def _apply(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._unpatch()
        device = trainer.strategy.root_device
        if device.type == "cpu" and not self._warned_cpu:
            self._warned_cpu = True
            rank_zero_warn(
                "OffloadCallback: the compute device is the CPU, so offloading saves no memory "
                "here; the offload mechanism still runs (useful for testing)."
            )
        if trainer.world_size > 1 and trainer.state.fn == TrainerFn.FITTING:
            self._refuse_trainable_offloaded(pl_module)
        precision = trainer.precision_plugin
        if isinstance(precision, (HalfPrecision, DoublePrecision)):
            precision.convert_module(pl_module)
        self.handle = apply_offload(
            pl_module, self.config, device, processes_per_node=trainer.num_devices
        )
        self._ddp_ignored_before = getattr(pl_module, "_ddp_params_and_buffers_to_ignore", None)
        ignored = list(self._ddp_ignored_before or [])
        ignored += [n for n in self.handle.plan.offloaded_params if n not in ignored]
        pl_module._ddp_params_and_buffers_to_ignore = ignored
        self._module = pl_module
        rank_zero_info(self.handle.plan.summary())

    def _refuse_trainable_offloaded(self, pl_module: LightningModule) -> None:
        """Offloaded parameters are kept out of DDP's gradient sync, so under several
        processes they must be frozen, or each rank would train its own copy."""
        params = dict(pl_module.named_parameters())
        trainable = [
            name
            for name in plan_offload(pl_module, self.config).offloaded_params
            if params[name].requires_grad
        ]
        if trainable:
            raise OffloadError(
                f"{len(trainable)} offloaded parameter(s) require grad, e.g. {trainable[0]}; "
                "under DDP offloaded parameters are not synchronized across processes, so "
                "freeze them (requires_grad_(False)) or train with one process"
            )

    def _unpatch(self) -> None:
        if self._patched is not None:
            self._patched.__dict__.pop("configure_model", None)
            self._patched = None

    # ---------------------------------------------------------------- logging
    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        every = self.log_every_n_steps or trainer.log_every_n_steps
        if self.handle is not None and trainer.global_step % every == 0:
            self._log(trainer)

    def _log(self, trainer: Trainer) -> None:
        if self.handle is None or not trainer.is_global_zero or not trainer.loggers:
            return
        stats = self.handle.stats
        metrics = {
            "offload/device_bytes_saved": float(stats.device_bytes_saved),
            "offload/offloaded_bytes": float(stats.offloaded_bytes),
            "offload/pool_bytes": float(stats.pool_bytes),
            "offload/host_bytes_pinned": float(stats.host_bytes_pinned),
            "offload/stalls": float(stats.stalls),
        }
        if stats.h2d_bytes_per_forward is not None:
            metrics["offload/h2d_bytes_per_forward"] = float(stats.h2d_bytes_per_forward)
        if stats.wait_ms is not None:
            metrics["offload/wait_ms"] = float(stats.wait_ms)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    # ---------------------------------------------------------------- removing
    def _finish(self, trainer: Trainer, stage: str) -> None:
        if self.handle is None or self._stage != stage or trainer.state.fn != _STAGE_FN[stage]:
            return
        self._log(trainer)
        self._remove()

    def _remove(self) -> None:
        self._unpatch()
        if self.handle is not None:
            self.last_stats = self.handle.stats
            self.last_plan = self.handle.plan
            self.handle.remove(device=torch.device("cpu"))
            self.handle = None
            module = self._module
            if self._ddp_ignored_before is None:
                module.__dict__.pop("_ddp_params_and_buffers_to_ignore", None)
            else:
                module._ddp_params_and_buffers_to_ignore = self._ddp_ignored_before

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Not on_fit_end: Lightning calls that after the strategy's teardown has already
        # moved the module to the CPU.
        self._finish(trainer, "fit")

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._finish(trainer, "validate")

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._finish(trainer, "test")

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._finish(trainer, "predict")

    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        self._remove()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._remove()

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The config that ran (for the record; checkpoints hold the true weights)."""
        return {
            "config": self.config.model_dump(mode="json"),
            "config_hash": self.config.compute_hash(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("config_hash") not in (None, self.config.compute_hash()):
            rank_zero_info(
                "OffloadCallback: resuming with a different offload config than the checkpoint "
                "was written with; the weights are unaffected."
            )
