"""The OffloadCallback in an app built like lightning-hydra-template (``tests/template_app/``):
Lightning imported before Hydra sets up logging, a fit followed by a test of the checkpoint,
a CSV logger, and an evaluation script whose Trainer has no callbacks. Each test runs the
app's scripts in subprocesses, as a user does."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from hydra_offload import to_offload_config

APP = Path(__file__).parent / "template_app"

pytestmark = pytest.mark.slow


def run(script: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    dirs = [f"hydra.run.dir={tmp_path / 'run'}", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    tmp_path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [sys.executable, str(APP / script), *args, *dirs],
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_fit_then_test_leaves_the_plan_once_in_train_log_and_the_results_beside_it(tmp_path):
    run("train.py", tmp_path, "offload=prefetch")
    out = tmp_path / "run"
    log = (out / "train.log").read_text()
    assert log.count("Offload plan: prefetch") == 1  # at fit; the test's plan is the same
    assert "[hydra_offload.lightning][INFO] - Offload plan: prefetch" in log
    assert "2 of 4 layers offloaded: 1, 3" in log
    plan = (out / "offload_plan.txt").read_text()
    assert plan.startswith("Offload plan: prefetch")
    assert "2 of 4 layers offloaded: 1, 3" in plan

    summary = json.loads((out / "job_summary.json").read_text())
    assert summary["backend"] == "prefetch"
    assert summary["overrides"] == "offload=prefetch"
    assert summary["stage"] == "fit"
    assert set(summary["stages"]) == {"fit", "test"}
    assert summary["steps"] == 4
    assert summary["step_ms"] > 0
    assert summary["device_bytes_saved"] > 0

    # The app logs its config with `config: ${offload}` unresolved; the callback adds the
    # validated config itself.
    hparams_file = out / "csv" / "version_0" / "hparams.yaml"
    assert "config: ${offload}" in hparams_file.read_text()
    hparams = OmegaConf.load(hparams_file)
    expected = to_offload_config(
        {"offload_backend": "prefetch", "prefetch": {"offload_group_size": 2}}
    )
    assert hparams.offload.resolved_backend == "prefetch"
    assert hparams.offload.config_hash == expected.compute_hash()
    assert hparams.offload.prefetch.offload_group_size == 2


def test_a_multirun_of_the_app_gets_the_sweep_summary(tmp_path):
    run("train.py", tmp_path, "-m", "offload=none,prefetch")
    sweep = tmp_path / "sweep"
    with (sweep / "sweep_summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["job"], row["backend"]) for row in rows] == [("0", "none"), ("1", "prefetch")]
    assert all(float(row["step_ms"]) > 0 for row in rows)
    assert [int(row["device_bytes_saved"]) > 0 for row in rows] == [False, True]
    assert (sweep / "sweep_summary.png").read_bytes().startswith(b"\x89PNG")


def test_eval_without_the_callback_loads_a_checkpoint_of_a_run_without_offload(tmp_path):
    run("train.py", tmp_path / "train", "offload=none")
    checkpoint = tmp_path / "train" / "run" / "checkpoints" / "last.ckpt"
    saved = torch.load(checkpoint, weights_only=False)
    assert not any("OffloadCallback" in str(key) for key in saved["callbacks"])
    result = run("eval.py", tmp_path / "eval", f"ckpt_path={checkpoint}")
    assert "test_loss=" in result.stdout + result.stderr
    assert "Please add the following callbacks" not in result.stdout + result.stderr
