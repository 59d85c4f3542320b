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
  weights on the device). With ``BitsandbytesPrecision`` the linear layers are replaced and
  quantized first, one at a time, so host storage holds the quantized weights (see
  :mod:`hydra_offload.integrations.precision`).
- The host-memory check counts every process on the node (``trainer.num_devices``) against
  what was available before any of them offloaded: every rank reads ``MemAvailable``, the
  ranks exchange their readings (an all-gather, so none allocates before all have read) and
  all check against the least, so they refuse or go on together.
- Offloaded parameters then point at device memory the offload owns (slots, zero-copy views),
  so the strategy's ``module.to(device)`` leaves them where they are.
- Under DDP the offloaded parameters are listed in the module's
  ``_ddp_params_and_buffers_to_ignore``: DDP neither broadcasts into them nor syncs them. Each
  rank offloads its own replica, and the ranks of a node keep one host copy of the frozen
  offloaded weights, in memory they share (``offload.share_host_memory``). Strategies that
  shard parameters (FSDP, FSDP2, DeepSpeed) are refused at ``setup``
  (:mod:`hydra_offload.integrations.strategies`).
- At the end of the stage (or on an exception) the offload is removed before the strategy's
  teardown, with the offloaded parameters restored on the CPU, where Lightning puts the whole
  module: code after ``trainer.fit()`` sees a normal module, and the device never has to hold
  the whole model.

What it reports, on rank zero only:

- The plan, at INFO through the ``hydra_offload.integrations.lightning`` logger (so a Hydra
  app's job log, e.g. ``train.log``, has it; where logging is not configured at all it goes
  to stderr), once per ``fit``, and at ``validate``, ``test`` or ``predict`` only when the
  plan differs from the one last shown for the same module.
- The validated config (not the Hydra interpolation that built it) as hyperparameters of the
  Trainer's loggers, under ``offload``.
- Its statistics as metrics of the Trainer's loggers (``offload/...``).
- The plan's picture (:mod:`hydra_offload.pictures`) as an image of each of the Trainer's
  loggers that takes images (TensorBoard, W&B, MLflow), whenever the plan is shown; and under
  the prefetch backend the timeline of one step of each stage (its second, by default: forward,
  backward and optimizer step in ``fit``), traced with
  :meth:`~hydra_offload.offload.OffloadHandle.trace`.
- Inside a Hydra job (one with an output directory), four files in the job's output
  directory: ``offload_plan.txt`` and ``offload_plan.png`` (the plan last shown, as text and
  as a picture), ``offload_timeline.png`` (the fit's timeline, else the latest stage's) and
  ``job_summary.json`` (backend,
  config hash, device, peak device memory on CUDA, device bytes saved, time per step, ...,
  the format :class:`~hydra_offload.integrations.sweep.SweepSummary` gathers at the end of a
  multirun).
  Outside Hydra no file is written.
"""

from __future__ import annotations

import logging
import statistics
import sys
import time
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import Logger
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from hydra_offload import offload as _offload
from hydra_offload._format import format_bytes
from hydra_offload._warnings import warn_at_caller
from hydra_offload.config import OffloadConfig, to_offload_config
from hydra_offload.integrations.data_parallel import (
    check_optimizers,
    follow_partition,
    gather_checkpoint_state,
)
from hydra_offload.integrations.precision import (
    apply_precision,
    lift_module_init_context,
    restore_precision,
)
from hydra_offload.integrations.strategies import check_strategy
from hydra_offload.integrations.sweep import job_output_dir, write_job_summary
from hydra_offload.offload import OffloadHandle, OffloadStats, apply_offload
from hydra_offload.pictures import (
    PLAN_PICTURE,
    TIMELINE_PICTURE,
    figure_pixels,
    plan_figure,
    timeline_figure,
)
from hydra_offload.plan import OffloadPlan, OffloadPlanWarning
from hydra_offload.weights import ModulePatch

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "PLAN_FILE",
    "PLAN_IMAGE_TAG",
    "PLAN_PICTURE",
    "TIMELINE_IMAGE_TAG",
    "TIMELINE_PICTURE",
    "OffloadCallback",
]

log = logging.getLogger(__name__)

PLAN_FILE = "offload_plan.txt"
"""The plan's text, written into the Hydra job's output directory."""

PLAN_IMAGE_TAG = "offload/plan"
"""The name the plan's picture is logged under (TensorBoard's tag, W&B's key); MLflow takes it
as the artifact :data:`~hydra_offload.pictures.PLAN_PICTURE`."""

TIMELINE_IMAGE_TAG = "offload/timeline"
"""The name the timeline's picture is logged under; MLflow takes it as the artifact
:data:`~hydra_offload.pictures.TIMELINE_PICTURE`."""

_STAGE_FN = {
    "fit": TrainerFn.FITTING,
    "validate": TrainerFn.VALIDATING,
    "test": TrainerFn.TESTING,
    "predict": TrainerFn.PREDICTING,
}


def _info(message: str) -> None:
    """``message`` at INFO on this module's logger; where logging is not configured at all
    (no handler between this logger and the root), on stderr instead, as Lightning shows its
    own messages, so it is not silently dropped."""
    if log.hasHandlers():
        log.info(message)
    else:
        print(message, file=sys.stderr)


def _error_line(exception: BaseException) -> str:
    text = str(exception).strip().splitlines()
    return type(exception).__name__ + (f": {text[0]}" if text else "")


class _StageRecord:
    """One stage's figures for ``job_summary.json``: the wall time of each step (from the
    batch's start to its end, synchronized with a CUDA device) and the CUDA memory peak since
    the stage was set up (the peak counter is reset then)."""

    def __init__(self, stage: str, device: torch.device) -> None:
        self.stage = stage
        self.device = device
        self.times_ms: list[float] = []
        self._start: float | None = None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def begin_step(self) -> None:
        self._sync()
        self._start = time.perf_counter()

    def end_step(self) -> None:
        if self._start is not None:
            self._sync()
            self.times_ms.append((time.perf_counter() - self._start) * 1e3)
            self._start = None

    def figures(
        self, config: OffloadConfig, stats: OffloadStats | None, error: str | None
    ) -> dict[str, Any]:
        timed = self.times_ms[1:] or self.times_ms  # the first step warms up
        step_ms = statistics.median(timed) if timed else None
        per_forward = stats.h2d_bytes_per_forward if stats is not None else None
        cuda = self.device.type == "cuda"
        peak = int(torch.cuda.max_memory_allocated(self.device)) if cuda else None
        figures: dict[str, Any] = {
            "stage": self.stage,
            "backend": config.resolved_backend,
            "config_hash": config.compute_hash(),
            "device": str(self.device),
            "peak_device_bytes": peak,
            "device_bytes_saved": stats.device_bytes_saved if stats is not None else 0,
            "device_bytes_saved_measured": stats.measured if stats is not None else False,
            "offloaded_bytes": stats.offloaded_bytes if stats is not None else 0,
            "pool_bytes": stats.pool_bytes if stats is not None else 0,
            "host_bytes_pinned": stats.host_bytes_pinned if stats is not None else 0,
            "host_bytes_shared": stats.host_bytes_shared if stats is not None else 0,
            "host_shared_by": stats.shared_by if stats is not None else 1,
            "h2d_bytes_per_forward": per_forward,
            "stalls": stats.stalls if stats is not None else 0,
            "wait_ms": stats.wait_ms if stats is not None else None,
            "steps": len(self.times_ms),
            "step_ms": step_ms,
            "h2d_gb_s": (per_forward / step_ms / 1e6) if per_forward and step_ms else None,
        }
        if error is not None:
            figures["error"] = error
        return figures


def _timed_batch(stage: str, edge: Literal["begins", "ends"]) -> Callable[..., None]:
    """A Lightning batch hook that starts or ends the timing of one step of ``stage``."""

    def hook(self: OffloadCallback, trainer: Trainer, *args: Any) -> None:
        if edge == "begins":
            self._step_begins(trainer, stage)
        else:
            self._step_ends(trainer, stage)

    return override(hook)


def _stage_end(stage: str) -> Callable[..., None]:
    """A Lightning ``on_*_end`` hook that finishes ``stage``: offload removed, record written."""

    def hook(self: OffloadCallback, trainer: Trainer, pl_module: LightningModule) -> None:
        self._finish(trainer, stage)

    return override(hook)


class OffloadCallback(Callback):
    """Keeps part of a LightningModule's weights in host memory while the Trainer runs.

    Args:
        config: an :class:`~hydra_offload.OffloadConfig`, a Hydra ``DictConfig`` (e.g.
            ``cfg.offload``) or a ``dict``; validated here, so a bad config fails before any
            work starts.
        log_every_n_steps: how often (in training steps) to send the offload's statistics
            to the Trainer's loggers; they are also sent at the end of every stage. ``None``:
            the Trainer's ``log_every_n_steps``.
        timeline_step: the step of each stage (counted from 0; the first one warms up) whose
            timeline is traced and drawn under the prefetch backend
            (:func:`~hydra_offload.pictures.timeline_figure`): logged to the loggers that
            take images and, in a Hydra job, written as ``offload_timeline.png``. ``None``:
            no timeline.

    Logged metrics (rank zero): ``offload/device_bytes_saved``, ``offload/offloaded_bytes``,
    ``offload/pool_bytes``, ``offload/host_bytes_pinned``, ``offload/h2d_bytes_per_forward``,
    ``offload/stalls`` and, where measured, ``offload/wait_ms``. Logged hyperparameters:
    :attr:`hparams`. Logged images: the plan's picture (``offload/plan``) and the timeline of
    one step (``offload/timeline``). Inside a Hydra job it also writes ``offload_plan.txt``,
    ``offload_plan.png``, ``offload_timeline.png`` and ``job_summary.json`` into the job's
    output directory (see the module's description).

    Checkpoints keep its state under :attr:`state_key`, which carries the config's hash, so
    several OffloadCallbacks of one Trainer keep separate entries.

    Raises:
        hydra_offload.OffloadConfigError: ``config`` is not a valid configuration; one line
            per problem, each naming the dotted key.
        ValueError: ``log_every_n_steps`` is below 1, or ``timeline_step`` below 0.

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
        timeline_step: int | None = 1,
    ) -> None:
        self.config: OffloadConfig = to_offload_config(config)
        if log_every_n_steps is not None and log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps must be >= 1 or None, got {log_every_n_steps}")
        if timeline_step is not None and timeline_step < 0:
            raise ValueError(f"timeline_step must be >= 0 or None, got {timeline_step}")
        self.log_every_n_steps = log_every_n_steps
        self.timeline_step = timeline_step
        self.handle: OffloadHandle | None = None
        """The active offload, while a stage runs."""
        self.last_stats: OffloadStats | None = None
        """The statistics at the end of the last stage."""
        self.last_plan: OffloadPlan | None = None
        """The plan of the last stage's offload (it stays after the offload is removed)."""
        self._stage: str | None = None
        self._patched: LightningModule | None = None
        self._lifted: Precision | None = None
        """The precision whose module_init_context is left out of the configure_model call
        this callback makes happen (see lift_module_init_context)."""
        self._wrapped_load: tuple[LightningModule, Any] | None = None
        self._module: Any = None
        self._ddp_ignored_before: Any = None
        self._split: list[ModulePatch] = []
        """The precision plugin's clipping and scaling, patched while offloaded weights train
        split among data-parallel processes (see :mod:`.data_parallel`)."""
        self._warned_cpu = False
        self._shown_plan: tuple[weakref.ref[LightningModule], str] | None = None
        self._hparams_sent: weakref.WeakSet[Logger] = weakref.WeakSet()
        self._plan_warnings: set[str] = set()
        self._record: _StageRecord | None = None
        self._summary_dir: str | None = None
        self._stages: dict[str, dict[str, Any]] = {}
        self._steps = 0
        """Steps begun in the current stage."""
        self._tracing: Any = None
        """The open ``handle.trace()`` context and its trace, while the timeline's step runs."""
        self._timelines: set[str] = set()
        """The stages whose timeline this Hydra job's output directory got."""

    def __getstate__(self) -> dict[str, Any]:
        """The callback's state for pickling (Lightning's ``ddp_spawn`` pickles the Trainer
        with its callbacks into each process): its weak references (the module whose plan
        was shown, the loggers given the hyperparameters) cannot be pickled and describe this
        process only, so the copy starts without them."""
        state = dict(self.__dict__)
        state["_shown_plan"] = None
        state["_hparams_sent"] = None
        state["_tracing"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._hparams_sent = weakref.WeakSet()

    @property
    def hparams(self) -> dict[str, Any]:
        """What the callback sends to the Trainer's loggers as hyperparameters: the validated
        config with its resolved backend and hash, under ``offload``.

        Example:
            >>> from omegaconf import OmegaConf
            >>> cfg = OmegaConf.create({"size": 2, "offload": {"prefetch": {
            ...     "offload_group_size": "${size}"}}})
            >>> hparams = OffloadCallback(cfg.offload).hparams["offload"]
            >>> hparams["prefetch"]["offload_group_size"], hparams["resolved_backend"]
            (2, 'prefetch')
        """
        return {
            "offload": {
                **self.config.model_dump(mode="json"),
                "resolved_backend": self.config.resolved_backend,
                "config_hash": self.config.compute_hash(),
            }
        }

    @property
    @override
    def state_key(self) -> str:
        """The key of this callback's entry in a checkpoint's ``callbacks``: the class name and
        the config's hash, so two OffloadCallbacks with different configs in one Trainer do not
        overwrite each other's entry.

        Example:
            >>> OffloadCallback({}).state_key
            "OffloadCallback{'config_hash': '...'}"
        """
        return self._generate_state_key(config_hash=self.config.compute_hash())

    # ---------------------------------------------------------------- applying
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Start the stage's record and wrap the module's ``configure_model`` so that the
        offload is applied (:meth:`_apply`) right after it; errors of the offload surface from
        that call, when Lightning makes it. Also wrap its ``on_load_checkpoint`` (see
        :meth:`_claim_checkpoint_entry`)."""
        self._stage = stage
        self._steps = 0
        self._send_hparams(trainer)
        self._begin_record(trainer, stage)
        self._wrap_on_load_checkpoint(trainer, pl_module)
        if self.config.resolved_backend == "none":
            return
        check_strategy(trainer.strategy)
        original = pl_module.configure_model
        if lift_module_init_context(trainer.precision_plugin, pl_module):
            self._lifted = trainer.precision_plugin

        def configure_model_then_offload() -> None:
            original()
            self._apply(trainer, pl_module)

        # An instance attribute, so Lightning sees configure_model as overridden and calls it
        # (inside its device and precision contexts) even when the module does not define it.
        pl_module.configure_model = configure_model_then_offload  # type: ignore[method-assign]
        self._patched = pl_module

    def _apply(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Offload ``pl_module`` for the stage: after its ``configure_model``, before the
        strategy moves it to the device.

        Raises:
            OffloadError: the module already carries an offload (e.g. another
                OffloadCallback's), a parameter cannot be offloaded, or host memory is short.
            hydra_offload.LayerStackError: prefetch cannot find or use the layer stack.
        """
        self._unpatch()
        device = trainer.strategy.root_device
        if device.type == "cpu" and not self._warned_cpu:
            self._warned_cpu = True
            if trainer.is_global_zero:  # in a spawned process: said once, in the log
                warn_at_caller(
                    "OffloadCallback: the compute device is the CPU, so offloading saves no "
                    "memory here; the offload mechanism still runs (useful for testing).",
                    UserWarning,
                    fallback=_info,
                )
        apply_precision(trainer.precision_plugin, pl_module, device)
        available = self._host_bytes_before_offloading(trainer)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            self.handle = apply_offload(
                pl_module,
                self.config,
                device,
                processes_per_node=trainer.num_devices,
                host_bytes_available=available,
                training=trainer.state.fn == TrainerFn.FITTING,
                process_group=_data_parallel_group(trainer),
            )
        self._pass_on(caught)
        if trainer.state.fn == TrainerFn.FITTING:
            self._split = follow_partition(trainer, self.handle)
        self._ddp_ignored_before = getattr(pl_module, "_ddp_params_and_buffers_to_ignore", None)
        ignored = list(self._ddp_ignored_before or [])
        ignored += [n for n in self.handle.plan.offloaded_params if n not in ignored]
        pl_module._ddp_params_and_buffers_to_ignore = ignored
        self._module = pl_module
        self._show_plan(trainer, pl_module, self.handle.plan)

    def _pass_on(self, caught: list[warnings.WarningMessage]) -> None:
        """Issue again the warnings applying the offload gave, where they were first
        attributed, except a plan warning this callback has issued already: the stages
        after a fit (its validation, the test) plan the same module again, and the plan is
        shown once, so its warnings are too."""
        for item in caught:
            text = str(item.message)
            if issubclass(item.category, OffloadPlanWarning):
                if text in self._plan_warnings:
                    continue
                self._plan_warnings.add(text)
            warnings.warn_explicit(item.message, item.category, item.filename, item.lineno)

    def _host_bytes_before_offloading(self, trainer: Trainer) -> int | None:
        """The host memory each rank's offload is checked against: read on every rank
        before any of them allocates, and the same figure on all of them (``None`` where it
        cannot be read).

        Every rank reads ``MemAvailable``, then the ranks exchange their readings (an
        all-gather: no rank leaves it before every rank has read) and all take the least (on
        several nodes, that of the node with the least: a node short of memory stops every
        rank alike).
        So no rank checks against a reading already lowered by another rank's offload, which
        the check, counting every process on the node, would count twice; and all ranks
        refuse or go on together, rather than one raising while the others wait for it in the
        strategy's next collective. Every rank gets here (Lightning calls ``configure_model``
        on each), and what is refused before (trainable offloaded weights under DDP) is
        refused on all. With one process the exchange returns the reading as it is.
        """
        readings = _exchange_readings(trainer, _offload.available_host_bytes())
        known = [reading for reading in readings if reading is not None]
        return min(known) if known else None

    def _unpatch(self) -> None:
        if self._patched is not None:
            self._patched.__dict__.pop("configure_model", None)
            self._patched = None
        if self._lifted is not None:
            restore_precision(self._lifted)
            self._lifted = None

    def _wrap_on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Lightning calls the module's ``on_load_checkpoint`` before it hands callbacks their
        checkpoint entries (and warns about entries no callback claims): the one moment to
        re-key an entry this callback should take."""
        original = pl_module.on_load_checkpoint

        def claim_then_load(checkpoint: dict[str, Any]) -> None:
            self._unwrap_on_load_checkpoint()
            self._claim_checkpoint_entry(trainer, checkpoint)
            original(checkpoint)

        self._unwrap_on_load_checkpoint()
        pl_module.on_load_checkpoint = claim_then_load  # type: ignore[method-assign]
        self._wrapped_load = (pl_module, claim_then_load)

    def _unwrap_on_load_checkpoint(self) -> None:
        if self._wrapped_load is not None:
            module, wrapper = self._wrapped_load
            if module.__dict__.get("on_load_checkpoint") is wrapper:
                del module.__dict__["on_load_checkpoint"]
            self._wrapped_load = None

    def _claim_checkpoint_entry(self, trainer: Trainer, checkpoint: dict[str, Any]) -> None:
        """Move to :attr:`state_key` the one OffloadCallback entry of ``checkpoint`` that no
        callback of this Trainer claims, when there is none under that key.

        That is the entry of a run with another offload config (evaluating a prefetch run's
        checkpoint with ``offload=uva``), or of a checkpoint written before the key carried
        the config's hash (its entry is under the bare class name). Lightning then hands it
        to :meth:`load_state_dict` (which notes the changed config) and has nothing to warn
        about; with several unclaimed entries, none is taken.
        """
        states = checkpoint.get("callbacks")
        if not isinstance(states, dict) or self.state_key in states:
            return
        name = type(self).__qualname__
        claimed = {callback.state_key for callback in trainer.callbacks}
        unclaimed = [
            key
            for key in states
            if isinstance(key, str)
            and key not in claimed
            and (key == name or key.startswith(name + "{"))
        ]
        if len(unclaimed) == 1:
            states[self.state_key] = states.pop(unclaimed[0])

    # ---------------------------------------------------------------- reporting
    def _show_plan(self, trainer: Trainer, pl_module: LightningModule, plan: OffloadPlan) -> None:
        """Log the plan (and write it into the Hydra output directory) on rank zero: at every
        fit; at other stages only when it differs from the plan last shown for this module."""
        if not trainer.is_global_zero:
            return
        text = "\n".join(line.rstrip() for line in plan.summary().rstrip().splitlines())
        handle = self.handle
        if handle is not None and handle.shared_by > 1:
            shared = handle.stats.host_bytes_shared
            text += (
                f"\nhost memory: {format_bytes(shared)} of it shared by {handle.shared_by} "
                "processes of this node (one copy per node)"
            )
        if self._stage != "fit" and self._shown_plan is not None:
            module_ref, shown = self._shown_plan
            if module_ref() is pl_module and shown == text:
                return
        self._shown_plan = (weakref.ref(pl_module), text)
        _info(text)
        folder = job_output_dir()
        if folder is not None:
            (folder / PLAN_FILE).write_text(text + "\n")
        self._show_picture(trainer, plan, folder)

    def _show_picture(self, trainer: Trainer, plan: OffloadPlan, folder: Path | None) -> None:
        """The plan's picture (:func:`~hydra_offload.pictures.plan_figure`): written next to
        :data:`PLAN_FILE` inside a Hydra job, and logged to each of the Trainer's loggers that
        takes images (:func:`_picture_sink`)."""
        path = folder / PLAN_PICTURE if folder is not None else None
        _publish(trainer, lambda: plan_figure(plan), path, PLAN_IMAGE_TAG, "plan's")

    def _show_timeline(self, trainer: Trainer, stage: str, trace: Any) -> None:
        """The timeline's picture (:func:`~hydra_offload.pictures.timeline_figure`), on rank
        zero: logged to each logger that takes images, and written as
        :data:`~hydra_offload.pictures.TIMELINE_PICTURE` inside a Hydra job, unless the file
        already holds this job's fit's timeline."""
        path = self._timeline_path(stage)
        if path is not None:
            self._timelines.add(stage)
        _publish(trainer, lambda: timeline_figure(trace), path, TIMELINE_IMAGE_TAG, "timeline's")

    def _timeline_path(self, stage: str) -> Path | None:
        """Where ``stage``'s timeline is written: inside a Hydra job, unless the file already
        holds this job's fit's timeline; else ``None``."""
        folder = job_output_dir()
        if folder is None or (stage != "fit" and "fit" in self._timelines):
            return None
        return folder / TIMELINE_PICTURE

    def _send_hparams(self, trainer: Trainer) -> None:
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if logger not in self._hparams_sent:
                logger.log_hyperparams(self.hparams)
                self._hparams_sent.add(logger)

    def _begin_record(self, trainer: Trainer, stage: str) -> None:
        self._record = None
        folder = job_output_dir()
        if not trainer.is_global_zero or folder is None:
            return
        output_dir = str(folder)
        if output_dir != self._summary_dir:  # a new Hydra job: forget the last one's stages
            self._summary_dir, self._stages, self._timelines = output_dir, {}, set()
        self._record = _StageRecord(stage, trainer.strategy.root_device)

    def _write_summary(self, stats: OffloadStats | None, error: str | None = None) -> None:
        """Add the stage's figures to ``job_summary.json``; its top level holds the fit's
        figures when the job fitted, else the latest stage's, and ``stages`` holds each."""
        record, self._record = self._record, None
        if record is None or job_output_dir() is None:
            return
        self._stages[record.stage] = record.figures(self.config, stats, error)
        top = self._stages.get("fit", self._stages[record.stage])
        write_job_summary({**top, "stages": dict(self._stages)}, self._summary_dir)

    def _in_stage(self, trainer: Trainer, stage: str) -> bool:
        return self._stage == stage and trainer.state.fn == _STAGE_FN[stage]

    def _step_begins(self, trainer: Trainer, stage: str) -> None:
        # Any checkpoint was restored before the first batch: the module gets its own
        # on_load_checkpoint back (and pickles as it did).
        self._unwrap_on_load_checkpoint()
        if not self._in_stage(trainer, stage):
            return
        self._steps += 1
        if self._record is not None:
            self._record.begin_step()
        if (
            self.handle is not None
            and self._steps - 1 == self.timeline_step
            and trainer.is_global_zero
            and (self._timeline_path(stage) is not None or _takes_images(trainer))
        ):
            opened = self.handle.trace()
            self._tracing = (opened, opened.__enter__())

    def _step_ends(self, trainer: Trainer, stage: str) -> None:
        if not self._in_stage(trainer, stage):
            return
        trace = self._close_trace()  # before the time is taken: it synchronizes the device
        if self._record is not None:
            self._record.end_step()
        if trace is not None and trace.spans:
            self._show_timeline(trainer, stage, trace)

    def _close_trace(self) -> Any:
        """End the open trace, if any, and return it (its spans resolved)."""
        tracing, self._tracing = self._tracing, None
        if tracing is None:
            return None
        opened, trace = tracing
        opened.__exit__(None, None, None)
        return trace

    # Each batch of the stage being recorded is one timed step (fit's end also logs, below).
    on_train_batch_start = _timed_batch("fit", "begins")
    on_validation_batch_start = _timed_batch("validate", "begins")
    on_validation_batch_end = _timed_batch("validate", "ends")
    on_test_batch_start = _timed_batch("test", "begins")
    on_test_batch_end = _timed_batch("test", "ends")
    on_predict_batch_start = _timed_batch("predict", "begins")
    on_predict_batch_end = _timed_batch("predict", "ends")

    # ---------------------------------------------------------------- logging
    @override
    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        self._step_ends(trainer, "fit")
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
        if not self._in_stage(trainer, stage):
            return
        stats = self.handle.stats if self.handle is not None else None
        if self.handle is not None:
            self._log(trainer)
            if stage == "fit":  # the parameters go back with their optimizers' full state
                for optimizer in trainer.optimizers:
                    self.handle.gather_optimizer_state(getattr(optimizer, "_optimizer", optimizer))
            self._remove()
        self._write_summary(stats)

    def _remove(self) -> None:
        self._close_trace()  # a stage that ended inside the traced step: its trace is dropped
        self._unpatch()
        for patch in self._split:
            patch.remove()
        self._split = []
        self._unwrap_on_load_checkpoint()
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

    # Each stage ends the offload and writes its record. Not on_fit_end for fit: Lightning
    # calls that after the strategy's teardown has already moved the module to the CPU.
    on_train_end = _stage_end("fit")
    on_validation_end = _stage_end("validate")
    on_test_end = _stage_end("test")
    on_predict_end = _stage_end("predict")

    @override
    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        stats = self.handle.stats if self.handle is not None else None
        self._remove()
        self._write_summary(stats, error=_error_line(exception))

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._remove()

    # ---------------------------------------------------------------- checkpoints
    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Refuse an optimizer that cannot step offloaded weights split among the processes
        (on every process alike, before the first step)."""
        if self.handle is not None:
            check_optimizers(trainer, self.handle)

    @override
    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """The checkpoint gets the optimizers' full state, as without offload, also where
        each process keeps the state of the offloaded parameters it steps only."""
        if self.handle is not None:
            gather_checkpoint_state(trainer, self.handle, checkpoint)

    @override
    def state_dict(self) -> dict[str, Any]:
        """The config that ran (for the record; checkpoints hold the true weights).

        Empty when nothing is offloaded: Lightning then stores no entry for the callback, so
        a checkpoint of a run without offload loads without the callback and without
        Lightning's "Please add the following callbacks" warning.

        Example:
            >>> OffloadCallback({}).state_dict()
            {}
            >>> sorted(OffloadCallback({"uva": {"cpu_offload_gb": 1}}).state_dict())
            ['config', 'config_hash']
        """
        if self.config.resolved_backend == "none":
            return {}
        return {
            "config": self.config.model_dump(mode="json"),
            "config_hash": self.config.compute_hash(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Note (at INFO, rank zero) when the checkpoint was written with another config;
        nothing else depends on it."""
        if state_dict.get("config_hash") not in (None, self.config.compute_hash()):
            rank_zero_info(
                "OffloadCallback: resuming with a different offload config than the checkpoint "
                "was written with; the weights are unaffected."
            )


_ARTIFACTS = {PLAN_IMAGE_TAG: PLAN_PICTURE, TIMELINE_IMAGE_TAG: TIMELINE_PICTURE}
"""The file name MLflow stores each picture under, by its tag."""


def _publish(
    trainer: Trainer, draw: Callable[[], Figure], path: Path | None, tag: str, what: str
) -> None:
    """Draw a picture (``draw()``) only when someone wants it: write it to ``path`` (unless
    ``None``) and log it under ``tag`` to each of the Trainer's loggers that takes images
    (:func:`_picture_sink`). A logger that fails to take it gets a warning on this module's
    logger naming ``what`` picture it was; the stage goes on."""
    sinks: list[tuple[Logger, Callable[[Figure], None]]] = []
    for logger in trainer.loggers:
        try:
            sink = _picture_sink(logger, trainer.global_step, tag)
        except Exception as err:  # a report must not end the stage
            _picture_not_logged(logger, err, what)
            continue
        if sink is not None:
            sinks.append((logger, sink))
    if path is None and not sinks:
        return
    figure = draw()
    if path is not None:
        figure.savefig(path, dpi=110)
    for logger, sink in sinks:
        try:
            sink(figure)
        except Exception as err:
            _picture_not_logged(logger, err, what)


def _takes_images(trainer: Trainer) -> bool:
    """Whether one of the Trainer's loggers takes images (:func:`_picture_sink`; a logger that
    fails to say counts as one: :func:`_publish` then warns about it)."""
    for logger in trainer.loggers:
        try:
            if _picture_sink(logger, trainer.global_step, TIMELINE_IMAGE_TAG) is not None:
                return True
        except Exception:
            return True
    return False


def _picture_sink(logger: Logger, step: int, tag: str) -> Callable[[Figure], None] | None:
    """How ``logger`` takes a picture logged under ``tag``, or ``None`` where it takes no
    images.

    Duck-typed, so no logger's library is imported here: a ``log_image(key, images, step)``
    method (W&B's ``WandbLogger``) gets the picture as an RGB array under ``tag``; an
    ``experiment`` with ``add_figure`` (TensorBoard's ``SummaryWriter``) gets the figure under
    ``tag`` at ``step``; an ``experiment`` with ``log_figure`` and a ``run_id`` (MLflow's
    client) gets it as the artifact named in :data:`_ARTIFACTS` (``offload_plan.png``,
    ``offload_timeline.png``). Any other logger (``CSVLogger``) is skipped.
    """
    log_image = getattr(logger, "log_image", None)
    if callable(log_image):
        return lambda figure: log_image(key=tag, images=[figure_pixels(figure)], step=step)
    experiment = logger.experiment
    add_figure = getattr(experiment, "add_figure", None)
    if callable(add_figure):
        return lambda figure: add_figure(tag, figure, global_step=step, close=False)
    run_id = getattr(logger, "run_id", None)
    log_figure = getattr(experiment, "log_figure", None)
    if run_id is not None and callable(log_figure):
        return lambda figure: log_figure(run_id, figure, _ARTIFACTS[tag])
    return None


def _picture_not_logged(logger: Logger, err: Exception, what: str) -> None:
    log.warning(
        "OffloadCallback: could not log the %s picture to %s: %s",
        what,
        type(logger).__name__,
        _error_line(err),
    )


def _exchange_readings(trainer: Trainer, reading: int | None) -> list[int | None]:
    """Every rank's ``reading`` (a collective of the data-parallel group: every rank gets
    all of them), or this rank's alone outside one. ``torch.distributed``'s own object
    gather, not the strategy's ``all_gather`` (its autograd-aware gather is deprecated)."""
    group = _data_parallel_group(trainer)
    if group is None:
        return [reading]
    readings: list[int | None] = [None] * torch.distributed.get_world_size(group)
    torch.distributed.all_gather_object(readings, reading, group=group)
    return readings


def _data_parallel_group(trainer: Trainer) -> Any:
    """The process group whose processes offload the module alike (each its own replica),
    which the offload meets and shares host memory in: the default group under a
    data-parallel strategy with several processes, else ``None``."""
    if trainer.world_size <= 1:
        return None
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    return torch.distributed.group.WORLD
