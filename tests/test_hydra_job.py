"""What any Hydra app that selects the ``offload`` group gets at job start and job end, with no
code of its own: a bad ``offload`` stops the job before its task runs, with one line; a
selected backend that no ``OffloadCallback`` applied is reported once when the job ends.

The subprocess tests run ``tests/hydra_lightning_app``, which names hydra-offload only in its
defaults list and its callbacks config. They start together (module fixture), so their
imports of torch and Lightning overlap.
"""

from __future__ import annotations

import importlib.metadata
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import DictConfig, open_dict

from hydra_offload import LayerStackError, OffloadConfigError, OffloadError
from hydra_offload.integrations.hydra_callback import (
    APPLIED_FILE_ENV,
    OffloadJobCallback,
    OffloadNotAppliedWarning,
    note_applied,
)
from hydra_offload.integrations.sweep import JOB_FILE, write_job_summary
from hydra_offload.integrations.trial import InfeasibleTrial

APP = Path(__file__).parent / "hydra_lightning_app"
PLAIN_APP = Path(__file__).parent / "hydra_app"
MARK = "task started"

CROSS_FIELD = (
    "error: offload.prefetch.offload_num_in_group: got 5; "
    "offload_num_in_group (5) must be <= offload_group_size (2)"
)
TYPO = (
    "error: offload.prefetch.offload_group_sise: unknown key; did you mean "
    "'offload_group_size'? allowed keys: offload_group_size, offload_num_in_group, "
    "offload_prefetch_step, offload_params"
)
NOT_APPLIED = re.compile(
    r"app\.py:\d+: OffloadNotAppliedWarning: offload=prefetch selects the prefetch backend, "
    r"but no OffloadCallback applied it during this job"
)

RUNS = {
    "cross-field": ["offload=prefetch", "offload.prefetch.offload_num_in_group=5"],
    "cross-field-multirun": ["-m", "offload=prefetch", "offload.prefetch.offload_num_in_group=5"],
    "typo": ["offload=prefetch", "offload.prefetch.offload_group_sise=3"],
    # Four jobs in one process (one import of Lightning); only the second has a backend and
    # no OffloadCallback. Every warning is shown, so a false report cannot hide behind
    # Python's once-per-line filter.
    "sweep": ["-m", "offload=prefetch,none", "callbacks=default,none"],
    # Lightning's ddp_spawn pickles the Trainer, the OffloadCallback included, into two new
    # processes, which apply the offload there.
    "spawn": ["offload=prefetch", "+trainer.strategy=ddp_spawn", "trainer.devices=2"],
}
SWEEP_JOBS = [
    "offload=prefetch callbacks=default",
    "offload=prefetch callbacks=none",
    "offload=none callbacks=default",
    "offload=none callbacks=none",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, str, str]]:
    """``name -> (exit code, stdout, stderr)`` for each entry of ``RUNS``, and ``"help"``."""
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="always::UserWarning")
    started = {}
    for name, overrides in RUNS.items():
        app = tmp_path_factory.mktemp(name) / "app"  # outside the source tree
        shutil.copytree(APP, app, ignore=shutil.ignore_patterns("__pycache__", "outputs"))
        dirs = [f"hydra.run.dir={app / 'run'}", f"hydra.sweep.dir={app / 'sweep'}"]
        started[name] = subprocess.Popen(
            [sys.executable, str(app / "app.py"), *overrides, *dirs],
            cwd=app, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
    started["help"] = subprocess.Popen(
        [sys.executable, str(PLAIN_APP / "app.py"), "--help"],
        cwd=tmp_path_factory.mktemp("help"), env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    results = {}
    for name, process in started.items():
        try:
            stdout, stderr = process.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
        results[name] = (process.returncode, stdout, stderr)
    return results


# --- job start ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("run", "line"),
    [("cross-field", CROSS_FIELD), ("cross-field-multirun", CROSS_FIELD), ("typo", TYPO)],
)
def test_a_bad_offload_stops_the_job_before_its_task_with_one_line(runs, run, line):
    code, stdout, stderr = runs[run]
    assert code == 2, stdout + stderr
    assert stderr.splitlines() == [line]
    assert MARK not in stdout


def test_a_typo_is_never_answered_with_a_plus(runs):
    _, _, stderr = runs["typo"]
    assert "+" not in stderr
    assert "Schema" not in stderr


# --- job end -----------------------------------------------------------------------------


def warning_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "OffloadNotAppliedWarning" in line]


def test_a_backend_nothing_applied_is_reported_once_at_the_users_line(runs):
    code, stdout, stderr = runs["sweep"]
    assert code == 0, stderr
    started = [line.split(": ", 1)[1] for line in stdout.splitlines() if line.startswith(MARK)]
    assert started == SWEEP_JOBS
    assert "Offload plan: prefetch" in stdout + stderr  # the first job applied it
    (line,) = warning_lines(stderr)  # the second job only
    assert NOT_APPLIED.search(line), line
    assert "hydra_offload.OffloadCallback" in line
    assert "callbacks: null" in line
    assert "offload=none" in line
    assert "/hydra/" not in line.split(": ", 1)[0]  # attributed to the app, not to Hydra


def test_under_ddp_spawn_the_offload_applied_in_the_spawned_processes_counts(runs):
    code, stdout, stderr = runs["spawn"]
    assert code == 0, stdout[-3000:] + stderr[-3000:]
    assert "predicted" in stdout
    assert "Offload plan: prefetch" in stdout + stderr  # shown by rank zero
    assert warning_lines(stderr) == []


# --- the group's options -----------------------------------------------------------------


def test_help_lists_only_the_group_files_as_options(runs):
    code, stdout, stderr = runs["help"]
    assert code == 0, stderr
    assert "offload: none, prefetch, uva\n" in stdout


# --- the callback in-process: relocated nodes, processes the job starts ---------------------


def composed(*overrides: str, conf: Path = APP / "conf") -> DictConfig:
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


def test_a_node_placed_elsewhere_is_validated_under_its_own_key(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text(
        "defaults:\n  - offload@model.offload: prefetch\n  - _self_\n"
    )
    cfg = composed("model.offload.prefetch.offload_group_size=-1", conf=tmp_path)
    with pytest.raises(SystemExit) as info:
        OffloadJobCallback().on_job_start(config=cfg, task_function=print)
    assert info.value.code == 2
    assert capsys.readouterr().err == (
        "error: model.offload.prefetch.offload_group_size: got -1; expected a value >= 0\n"
    )


@pytest.mark.parametrize("applied", [True, False])
def test_an_offload_applied_by_a_process_the_job_started_counts(applied, monkeypatch):
    monkeypatch.delenv(APPLIED_FILE_ENV, raising=False)  # restored whatever happens below
    cfg = composed("offload=uva")
    callback = OffloadJobCallback()
    callback.on_job_start(config=cfg, task_function=print)
    assert os.environ.get(APPLIED_FILE_ENV)
    if applied:  # as under Lightning's ddp_spawn
        # The target comes from the installed package: a spawned child cannot import this
        # test file (the suite imports it by path).
        child = multiprocessing.get_context("spawn").Process(target=note_applied)
        child.start()
        child.join(60)
        assert child.exitcode == 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        callback.on_job_end(config=cfg, job_return=None)
    reported = [w for w in caught if issubclass(w.category, OffloadNotAppliedWarning)]
    assert len(reported) == (0 if applied else 1)
    assert APPLIED_FILE_ENV not in os.environ


def test_a_trial_of_a_searching_sweeper_is_left_to_the_app(capsys):
    # Optuna proposes the settings: a bad combination is a failed trial for the app to report
    # (run.py returns an InfeasibleTrial), not a reason to end the whole study.
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    bad = "offload.prefetch.offload_num_in_group=5"
    callback = OffloadJobCallback()
    cfg = composed("offload=prefetch", bad, "hydra/sweeper=optuna", "hydra.mode=MULTIRUN")
    callback.on_job_start(config=cfg, task_function=print)
    assert capsys.readouterr().err == ""
    with pytest.raises(SystemExit):  # the same job under Hydra's basic sweeper
        callback.on_job_start(
            config=composed("offload=prefetch", bad, "hydra.mode=MULTIRUN"), task_function=print
        )


# --- job end of a trial whose settings cannot run ------------------------------------------


def failed_job(error: BaseException) -> JobReturn:
    job = JobReturn(overrides=["offload.prefetch.offload_num_in_group=5"])
    job.return_value = error
    job.status = JobStatus.FAILED
    return job


@pytest.fixture
def trial_dir(tmp_path):
    """A Hydra trial of the Optuna sweeper, its output directory ``tmp_path``."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    cfg = composed("offload=prefetch", "hydra/sweeper=optuna", "hydra.mode=MULTIRUN")
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path)
    HydraConfig.instance().set_config(cfg)
    yield cfg
    HydraConfig.instance().cfg = None


def wrapped(error: BaseException) -> BaseException:
    """``error`` as ``hydra.utils.instantiate`` hands it on: raised from inside another."""
    try:
        try:
            raise error
        except BaseException as inner:
            raise RuntimeError("Error in call to target 'hydra_offload.OffloadCallback'") from inner
    except RuntimeError as outer:
        return outer


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (
            OffloadConfigError([("offload.prefetch.offload_num_in_group", "got 5; too many")]),
            "offload.prefetch.offload_num_in_group: got 5; too many",
        ),
        (OffloadError("the plan selects nothing"), "the plan selects nothing"),
        (
            LayerStackError("offload.layers: 'x' does not exist"),
            "offload.layers: 'x' does not exist",
        ),
        (
            torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore"),
            "out of memory: CUDA out of memory. Tried to allocate 2.00 GiB",
        ),
    ],
    ids=["config", "offload", "layer-stack", "out-of-memory"],
)
def test_a_trial_whose_settings_cannot_run_is_a_failed_trial_and_the_study_goes_on(
    trial_dir, capsys, error, reason
):
    job = failed_job(wrapped(error))
    OffloadJobCallback().on_job_end(config=trial_dir, job_return=job)
    # The sweeper reads a completed job whose value float() refuses: a failed trial.
    assert job.status == JobStatus.COMPLETED
    assert job.return_value == InfeasibleTrial(reason)
    with pytest.raises(ValueError, match="infeasible: "):
        float(job.return_value)
    assert capsys.readouterr().err.splitlines() == [
        f"error: {reason}",
        "the trial is recorded as failed; the study goes on",
    ]
    summary = json.loads((Path(HydraConfig.get().runtime.output_dir) / JOB_FILE).read_text())
    assert summary["error"] == reason


def test_a_failed_trials_summary_keeps_what_the_task_wrote(trial_dir):
    write_job_summary({"backend": "prefetch", "config_hash": "abc"})
    OffloadJobCallback().on_job_end(config=trial_dir, job_return=failed_job(OffloadError("no")))
    summary = json.loads((Path(HydraConfig.get().runtime.output_dir) / JOB_FILE).read_text())
    assert (summary["backend"], summary["config_hash"], summary["error"]) == (
        "prefetch",
        "abc",
        "no",
    )


def test_other_errors_of_a_trial_are_left_as_they_are(trial_dir, capsys):
    bug = KeyError("a bug in the task")
    job = failed_job(bug)
    OffloadJobCallback().on_job_end(config=trial_dir, job_return=job)
    assert job.status == JobStatus.FAILED
    with pytest.raises(KeyError):
        job.return_value  # noqa: B018
    assert "error:" not in capsys.readouterr().err


def test_under_the_basic_sweeper_a_failed_job_stays_failed():
    # Its values came from the command line: the sweep ends at the job, as without the group.
    job = failed_job(OffloadError("the plan selects nothing"))
    cfg = composed("offload=prefetch", "hydra.mode=MULTIRUN")
    OffloadJobCallback().on_job_end(config=cfg, job_return=job)
    assert job.status == JobStatus.FAILED


def test_with_an_optuna_sweeper_before_1_3_the_trial_stays_failed_and_says_why(
    trial_dir, capsys, monkeypatch
):
    # hydra-optuna-sweeper 1.2.0 (lightning-hydra-template pins it) raises on a return value
    # it cannot read as a number, ending the study: converting would only hide the error.
    real_version = importlib.metadata.version
    monkeypatch.setattr(
        importlib.metadata,
        "version",
        lambda name: "1.2.0" if name == "hydra-optuna-sweeper" else real_version(name),
    )
    job = failed_job(OffloadError("the plan selects nothing"))
    OffloadJobCallback().on_job_end(config=trial_dir, job_return=job)
    assert job.status == JobStatus.FAILED
    assert capsys.readouterr().err.splitlines() == [
        "error: the plan selects nothing",
        "hydra-optuna-sweeper 1.2.0 ends the study at a failed trial; from 1.3.0 it records "
        "the trial as failed and goes on: pip install 'hydra-optuna-sweeper>=1.3'",
    ]
