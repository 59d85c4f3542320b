"""What any Hydra app that selects the ``offload`` group gets at job start and job end, with no
code of its own: a bad ``offload`` stops the job before its task runs, with one line; a
selected backend that no ``OffloadCallback`` applied is reported once when the job ends.

The subprocess tests run ``tests/hydra_lightning_app``, which names hydra-offload only in its
defaults list and its callbacks config. They start together (module fixture), so their
imports of torch and Lightning overlap.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from hydra_offload.integrations.hydra_callback import (
    APPLIED_FILE_ENV,
    OffloadJobCallback,
    OffloadNotAppliedWarning,
    note_applied,
)

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
