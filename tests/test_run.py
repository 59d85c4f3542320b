"""``run.py``, the main job, end to end in subprocesses, as a user runs it."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["data.samples=8", "data.seq_len=32", "model.num_layers=4"]


def run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    dirs = [f"hydra.run.dir={tmp_path / 'run'}", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    return subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *args, *dirs],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )


def job_summary(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "run" / "job_summary.json").read_text())


def test_default_run_predicts_without_offload(tmp_path):
    result = run(tmp_path, *SMALL)
    assert result.returncode == 0, result.stderr
    assert "resolved backend: none" in result.stdout
    assert "config hash: " in result.stdout
    assert "Run summary" in result.stdout
    summary = job_summary(tmp_path)
    assert summary["backend"] == "none"
    assert summary["steps"] == 2
    assert summary["device_bytes_saved"] == 0


@pytest.mark.parametrize(
    ("overrides", "backend"),
    [
        (["offload=prefetch", "offload.prefetch.offload_group_size=2"], "prefetch"),
        (["offload=uva", "offload.uva.cpu_offload_gb=0.001"], "uva"),
    ],
)
def test_each_backend_runs_predict_under_the_trainer(tmp_path, overrides, backend):
    result = run(tmp_path, *SMALL, *overrides)
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert f"Offload plan: {backend}" in output
    assert "Predicting" in output  # Lightning's progress bar
    summary = job_summary(tmp_path)
    assert summary["backend"] == backend
    assert summary["device_bytes_saved"] > 0
    assert summary["step_ms"] > 0
    assert summary["stalls"] == 0


def test_fit_mode_trains_with_uva(tmp_path):
    result = run(tmp_path, *SMALL, "mode=fit", "trainer.max_steps=3", "offload=uva")
    assert result.returncode == 0, result.stderr
    summary = job_summary(tmp_path)
    assert summary["backend"] == "uva"
    assert summary["steps"] == 3


def test_multirun_writes_a_sweep_summary_and_plot(tmp_path):
    result = run(tmp_path, "-m", *SMALL, "offload=uva,prefetch",
                 "offload.prefetch.offload_group_size=2,4")  # fmt: skip
    assert result.returncode == 0, result.stderr
    sweep = tmp_path / "sweep"
    with (sweep / "sweep_summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4
    assert {row["backend"] for row in rows} == {"uva", "prefetch"}
    assert all(row["overrides"] and row["config_hash"] and row["step_ms"] for row in rows)
    markdown = (sweep / "sweep_summary.md").read_text().splitlines()
    assert markdown[0].startswith("| job | overrides | backend |")
    assert len(markdown) == 2 + 4
    assert (sweep / "sweep_summary.png").read_bytes().startswith(b"\x89PNG")


def test_a_7b_llama_shaped_model_is_planned_on_meta(tmp_path):
    result = run(tmp_path, "model=llama_7b_meta", "offload=prefetch")
    assert result.returncode == 0, result.stderr
    # 6,738,415,616 bfloat16 parameters
    assert "(13,476,831,232 B)" in result.stdout
    assert "16 of 32 layers offloaded" in result.stdout
    assert "Run summary" not in result.stdout


def test_dry_run_only_plans(tmp_path):
    result = run(tmp_path, "+dry_run=true", "offload=prefetch")
    assert result.returncode == 0, result.stderr
    assert "Offload plan: prefetch" in result.stdout
    assert "Run summary" not in result.stdout


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ["offload=prefetch", "offload.prefetch.offload_num_in_group=3"],
            "error: offload.prefetch.offload_num_in_group: got 3; "
            "offload_num_in_group (3) must be <= offload_group_size (2)",
        ),
        (
            ["offload=uva", "offload.uva.cpu_offload_gb=-1"],
            "error: offload.uva.cpu_offload_gb: got -1.0; expected a value >= 0",
        ),
        (
            ["+dry_run=true", "offload=prefetch", "offload.layers=decoder.layers"],
            "error: offload.layers: 'decoder.layers' does not exist in DecoderLM; "
            "module lists found: layers (16 x DecoderBlock)",
        ),
    ],
)
def test_bad_settings_end_with_one_clear_line_and_exit_2(tmp_path, overrides, expected):
    result = run(tmp_path, *overrides)
    assert result.returncode == 2
    assert result.stderr.strip() == expected


def test_a_bad_layers_path_fails_the_run_with_one_line(tmp_path):
    result = run(tmp_path, *SMALL, "offload=prefetch", "offload.layers=decoder.layers")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: offload.layers: 'decoder.layers' does not exist in LitDecoderLM; "
        "module lists found: model.layers (4 x DecoderBlock)"
    )


def test_a_bad_override_type_fails_at_compose_time(tmp_path):
    result = run(tmp_path, "offload=prefetch", "offload.prefetch.offload_group_size=abc")
    assert result.returncode != 0
    assert "offload.prefetch.offload_group_size" in result.stderr
    assert "Traceback" not in result.stderr


def test_fit_mode_trains_with_prefetch(tmp_path):
    result = run(tmp_path, *SMALL, "offload=prefetch", "mode=fit", "trainer.max_steps=4")
    assert result.returncode == 0, result.stderr
    summary = job_summary(tmp_path)
    assert summary["backend"] == "prefetch"
    assert summary["steps"] == 4
    assert summary["stalls"] == 0


def test_suggest_picks_settings_for_the_budget_and_runs_them(tmp_path):
    # 4 layers of 3.2 MB and 2 MB outside them: 8 MiB holds 1 layer plus a 2-slot pool.
    result = run(tmp_path, *SMALL, "suggest=true", "suggest_device_gb=0.0078125")
    assert result.returncode == 0, result.stderr
    assert "Offload suggestion: prefetch" in result.stdout
    overrides = next(line for line in result.stdout.splitlines() if line.startswith("overrides:"))
    assert "offload=prefetch" in overrides
    summary = job_summary(tmp_path)
    assert summary["backend"] == "prefetch"
    assert summary["predicted_step_ms"] > 0
    assert summary["step_ms"] > 0
    assert "predicted" in result.stdout
    assert "measured" in result.stdout


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["mode=fit"], "error: suggest: predicts the time of a forward; run it with mode=predict"),
        (["suggest_device_gb=0.0001"], "error: suggest: "),
    ],
)
def test_suggest_refuses_what_it_cannot_do_with_one_line(tmp_path, overrides, expected):
    result = run(tmp_path, *SMALL, "suggest=true", *overrides)
    assert result.returncode == 2
    assert result.stderr.strip().startswith(expected), result.stderr
