"""The Hydra callback that comes with the ``offload`` config group.

Every option of the group (``none``, ``uva``, ``prefetch``, and any option of an app that
extends one of them) extends the hidden config ``hydra_offload_callback``, which adds
:class:`OffloadJobCallback` to the app's ``hydra.callbacks``. So every ``hydra.main`` job that
selects the group, single run or ``--multirun``, gets two checks without code of its own:

- **At job start**, before the task function runs, each node the group composed is validated
  with :func:`~hydra_offload.config.to_offload_config`. A bad one ends the job with one line per
  problem on stderr (``error: offload.prefetch.offload_num_in_group: got 5; ...``) and exit
  status 2, as ``run.py`` does. In a ``--multirun`` with Hydra's basic sweeper that ends the
  sweep at the bad job (its values came from the command line). A sweeper that searches
  (Optuna, Ax, Nevergrad) proposes the settings itself, and ending the process would end the
  whole study, so there the trial runs and fails where the app validates the settings (its
  ``OffloadCallback``), which the job end turns into a failed trial.
- **At job end of a trial of a searching sweeper** whose task raised because its settings
  cannot run (a refused setting, a layer stack the model lacks, out of memory: see
  :func:`~hydra_offload.integrations.trial.infeasible_reason`), the error is reported in one
  line and written into the job's ``job_summary.json``, and the trial returns an
  :class:`~hydra_offload.integrations.trial.InfeasibleTrial`: the sweeper records a failed
  trial and goes on with the study. Other errors are left as they are.
- **At job end**, when a node selects a backend (its resolved backend is not ``none``) and no
  :class:`~hydra_offload.OffloadCallback` applied an offload during the job, one
  :class:`OffloadNotAppliedWarning` says so and how to fix it. The usual causes: a config that
  sets ``callbacks: null`` (debug configs often do), ``callbacks=none``, or an entry point that
  builds no callbacks (an evaluation script).

Applications record themselves: :func:`~hydra_offload.apply_offload` (which
``OffloadCallback`` calls) calls :func:`note_applied` when it applies an offload. The record
is also kept in a file named by the environment variable
:data:`APPLIED_FILE_ENV` while a job runs, so processes the job starts (Lightning's
``ddp_spawn``) count too.

Compose-API users (``hydra.compose``) run no job, so neither check runs; they validate with
``to_offload_config(cfg.offload)`` or by constructing the ``OffloadCallback``.

This module imports neither torch nor Lightning: Hydra instantiates the callback in every app
that selects the group.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import importlib.metadata
import json
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass
from typing import Any, NoReturn

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from packaging.version import Version

from hydra_offload._applied import APPLIED_FILE_ENV, applied_count, note_applied
from hydra_offload._warnings import warn_at_caller
from hydra_offload.config import OffloadConfigError, to_offload_config
from hydra_offload.integrations.sweep import JOB_FILE, job_output_dir, write_job_summary
from hydra_offload.integrations.trial import InfeasibleTrial, infeasible_reason

__all__ = [
    "APPLIED_FILE_ENV",
    "OffloadJobCallback",
    "OffloadNotAppliedWarning",
    "applied_count",
    "note_applied",
]

GROUP = "offload"

BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"

# Environment variables that hold the process's global rank, in Lightning's order.
_RANK_ENV = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


class OffloadNotAppliedWarning(UserWarning):
    """The ``offload`` config selects a backend, but nothing applied it during the job."""


@dataclass(frozen=True)
class _Selected:
    """One node of the ``offload`` group that selects a backend."""

    key: str  # the node's dotted key in the app's config, e.g. "offload"
    group: str  # the group as the app names it: "offload", or "offload@model.offload"
    option: str  # the option chosen, e.g. "prefetch"
    backend: str  # the resolved backend, e.g. "prefetch"


class OffloadJobCallback(Callback):
    """Validates the ``offload`` settings when a job starts; warns at its end when a selected
    backend was never applied (see the module's documentation).

    Hydra builds one per run or sweep from ``hydra.callbacks.hydra_offload``; the group's
    options add that entry, so apps do not name this class.
    """

    def __init__(self) -> None:
        self._selected: list[_Selected] = []
        self._applied_before = 0
        self._marker: str | None = None
        self._env_before: str | None = None
        atexit.register(self._stop_watching)

    # ---------------------------------------------------------------- job start
    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._stop_watching()
        self._selected = []
        problems: list[tuple[str, str]] = []
        for key, group, option in _group_nodes(config):
            node = OmegaConf.select(config, key, throw_on_missing=False)
            if node is None:
                continue
            try:
                with warnings.catch_warnings():
                    # The app's own validation (OffloadCallback) warns about conflicts, at
                    # its line; warning here too would say everything twice.
                    warnings.simplefilter("ignore")
                    offload = to_offload_config(node, key=key)
            except OffloadConfigError as err:
                problems += err.problems
                continue
            except Exception:  # e.g. an interpolation only the task can resolve
                continue  # (a resolver it registers): the task will find what is wrong
            if option == "none" and offload.resolved_backend != "none":
                problems.append((key, _none_turned_on(config, key, offload.resolved_backend)))
                continue
            if offload.resolved_backend != "none":
                self._selected.append(_Selected(key, group, option, offload.resolved_backend))
        if problems and not _searching_sweep(config):
            _fail(problems)
        if self._selected:
            self._watch()

    # ---------------------------------------------------------------- job end
    def on_job_end(
        self, config: DictConfig, job_return: JobReturn | None = None, **kwargs: Any
    ) -> None:
        failed = job_return is not None and job_return.status == JobStatus.FAILED
        if failed and _searching_sweep(config):
            _fail_trial_if_infeasible(job_return, config)
        if not self._selected:
            return
        applied = applied_count() > self._applied_before or _written(self._marker)
        self._stop_watching()
        selected, self._selected = self._selected, []
        if applied or failed or not _rank_zero():
            return
        for item in selected:
            warn_at_caller(_not_applied_message(item), OffloadNotAppliedWarning)

    # ---------------------------------------------------------------- the record
    def _watch(self) -> None:
        """Start recording applications: in this process, and through a file for the
        processes the job starts."""
        self._applied_before = applied_count()
        try:
            handle, path = tempfile.mkstemp(prefix="hydra-offload-", suffix=".applied")
        except OSError:
            return
        os.close(handle)
        self._marker = path
        self._env_before = os.environ.get(APPLIED_FILE_ENV)
        os.environ[APPLIED_FILE_ENV] = path

    def _stop_watching(self) -> None:
        if self._marker is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self._marker)
        if os.environ.get(APPLIED_FILE_ENV) == self._marker:
            if self._env_before is None:
                del os.environ[APPLIED_FILE_ENV]
            else:
                os.environ[APPLIED_FILE_ENV] = self._env_before
        self._marker = self._env_before = None


def _group_nodes(config: DictConfig) -> list[tuple[str, str, str]]:
    """``(dotted key, group, option)`` of each node the ``offload`` group composed.

    Hydra lists the choice of a group under ``group`` or, when the app places it elsewhere
    (``- offload@model.offload: prefetch``), under ``group@package``.
    """
    choices = OmegaConf.select(config, "hydra.runtime.choices")
    if not isinstance(choices, DictConfig):
        return []
    nodes = []
    for name, option in choices.items():
        group, _, package = str(name).partition("@")
        if group != GROUP or option is None or package == "_global_":
            continue
        nodes.append((package or GROUP, str(name), str(option)))
    return nodes


def _none_turned_on(config: DictConfig, key: str, backend: str) -> str:
    """The one line refusing an ``offload=none`` node whose other settings (overrides, or a
    sweep crossing ``none`` with another option's keys) turn ``backend`` on: ``none`` means no
    offload, and running ``backend`` under its name would mislabel the run."""
    task = OmegaConf.select(config, "hydra.overrides.task") or []
    given = [str(o) for o in task if str(o).lstrip("+~").startswith(f"{key}.")]
    settings = " ".join(given) if given else f"the {key} node's settings"
    return (
        f"offload=none means no offload, but {settings} turns {backend} on; drop that, or "
        f"choose offload={backend} (in a sweep, give each option's keys to its own run, e.g. "
        f"-m offload={backend} {key}.{backend}.<key>=a,b, and run offload=none apart)"
    )


def _searching_sweep(config: DictConfig) -> bool:
    """Whether this job is a trial of a sweeper other than Hydra's basic one."""
    if OmegaConf.select(config, "hydra.mode") != RunMode.MULTIRUN:
        return False
    return OmegaConf.select(config, "hydra.sweeper._target_") != BASIC_SWEEPER


def _fail(problems: list[tuple[str, str]]) -> NoReturn:
    """End the job as ``run.py`` does: one ``error:`` line per problem, exit status 2.

    A ``SystemExit`` passes through Hydra's callback dispatch, which turns exceptions into
    warnings and lets the job run.
    """
    for key, message in problems:
        print(f"error: {key}: {message}", file=sys.stderr)
    sys.stderr.flush()
    raise SystemExit(2)


def _fail_trial_if_infeasible(job_return: JobReturn, config: DictConfig) -> None:
    """Turn a trial that raised because its settings cannot run into a completed job that
    returns an :class:`~hydra_offload.integrations.trial.InfeasibleTrial`, which the sweeper
    records as a failed trial before it goes on; other errors are left as they are.

    The error is reported in one line and recorded in the job's ``job_summary.json`` (for
    :class:`~hydra_offload.integrations.sweep.SweepSummary`). The exception, whose traceback
    holds the trial's model, is dropped and the memory it held released, so the next trial
    in this process starts from free memory.
    """
    # The exception is JobReturn's ``_return_value`` field (a dataclass field, as Hydra 1.3
    # builds it); reading ``return_value`` would raise it and print "Error executing job".
    error = job_return._return_value
    reason = infeasible_reason(error) if isinstance(error, BaseException) else None
    del error
    if reason is None:
        return
    print("error: " + reason.replace("\n", "\nerror: "), file=sys.stderr)
    too_old = _optuna_sweeper_too_old(config)
    if too_old is not None:
        # That sweeper ends the study at any trial it cannot read a number from: the job
        # stays failed, with its own error.
        print(
            f"hydra-optuna-sweeper {too_old} ends the study at a failed trial; from 1.3.0 it "
            "records the trial as failed and goes on: pip install 'hydra-optuna-sweeper>=1.3'",
            file=sys.stderr,
        )
        sys.stderr.flush()
        return
    print("the trial is recorded as failed; the study goes on", file=sys.stderr)
    sys.stderr.flush()
    job_return.return_value = InfeasibleTrial(reason)
    job_return.status = JobStatus.COMPLETED
    with contextlib.suppress(OSError, ValueError):
        _record_error(reason)
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _optuna_sweeper_too_old(config: DictConfig) -> str | None:
    """The installed hydra-optuna-sweeper's version when this job is its trial and that
    version ends the study at a failed trial (before 1.3.0, it re-raises what it cannot read
    as a number); ``None`` otherwise."""
    target = str(OmegaConf.select(config, "hydra.sweeper._target_", default=""))
    if not target.endswith(".OptunaSweeper"):
        return None
    try:
        version = importlib.metadata.version("hydra-optuna-sweeper")
    except importlib.metadata.PackageNotFoundError:
        return None
    return version if Version(version) < Version("1.3") else None


def _record_error(reason: str) -> None:
    """Add ``error`` to the job's summary file, written or not by the task before it failed."""
    folder = job_output_dir()
    if folder is None:
        return
    path = folder / JOB_FILE
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        summary = {}
    write_job_summary({**summary, "error": reason}, folder)


def _written(path: str | None) -> bool:
    try:
        return path is not None and os.path.getsize(path) > 0
    except OSError:
        return False


def _rank_zero() -> bool:
    """Whether this process is global rank zero (as Lightning reads it from the environment);
    the other ranks of a multi-process job run the same Hydra job and stay quiet."""
    for name in _RANK_ENV:
        value = os.environ.get(name)
        if value is not None:
            return value.strip() == "0"
    return True


def _not_applied_message(item: _Selected) -> str:
    return (
        f"{item.group}={item.option} selects the {item.backend} backend, but no "
        "OffloadCallback applied it during this job, so nothing was offloaded. Give the "
        f"Trainer hydra_offload.OffloadCallback(config=cfg.{item.key}), e.g. from a callbacks "
        f"entry {{_target_: hydra_offload.OffloadCallback, config: ${{{item.key}}}}}, and check "
        f"that no config sets callbacks: null (debug configs often do); or select "
        f"{item.group}=none."
    )
