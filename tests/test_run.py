"""``run.py``, the main job, end to end in subprocesses, as a user runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    dirs = [f"hydra.run.dir={tmp_path / 'run'}", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    return subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *args, *dirs],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_default_run_runs_the_model_without_offload(tmp_path):
    result = run(tmp_path)
    assert result.returncode == 0, result.stderr
    assert "resolved backend: none" in result.stdout
    assert "config hash: " in result.stdout
    assert "Offload plan: none" in result.stdout
    assert "outputs identical to no offload: yes" in result.stdout


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ["offload=prefetch", "offload.prefetch.offload_group_size=8"],
            ["offload_group_size: 8", "2 of 16 layers offloaded: 7, 15", "prefetch stalls"],
        ),
        (
            ["offload=uva", "offload.uva.cpu_offload_gb=0.01"],
            ["Offload stats: uva", "device bytes saved"],
        ),
    ],
)
def test_each_backend_runs_the_model_with_identical_outputs(tmp_path, overrides, expected):
    result = run(tmp_path, *overrides, "run.steps=2")
    assert result.returncode == 0, result.stderr
    for fragment in expected:
        assert fragment in result.stdout
    assert "H2D bytes per forward" in result.stdout
    assert "outputs identical to no offload: yes" in result.stdout


def test_dry_run_only_plans(tmp_path):
    result = run(tmp_path, "+dry_run=true", "offload=prefetch")
    assert result.returncode == 0, result.stderr
    assert "Offload plan: prefetch" in result.stdout
    assert "Offload stats" not in result.stdout


def test_multirun_sweeps_the_three_options(tmp_path):
    result = run(tmp_path, "-m", "offload=none,uva,prefetch", "run.steps=1")
    assert result.returncode == 0, result.stderr
    for backend in ("none", "uva", "prefetch"):
        assert f"Offload plan: {backend}" in result.stdout
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir()) == ["0", "1", "2"]


def test_a_7b_llama_shaped_model_is_planned_on_meta(tmp_path):
    result = run(tmp_path, "model=llama_7b_meta", "offload=prefetch")
    assert result.returncode == 0, result.stderr
    assert "Offload stats" not in result.stdout
    # 6,738,415,616 bfloat16 parameters
    assert "(13,476,831,232 B)" in result.stdout
    assert "16 of 32 layers offloaded" in result.stdout


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
            ["offload=prefetch", "offload.layers=decoder.layers"],
            "error: offload.layers: 'decoder.layers' does not exist in DecoderLM; "
            "module lists found: layers (16 x DecoderBlock)",
        ),
    ],
)
def test_bad_settings_end_with_one_clear_line_and_exit_2(tmp_path, overrides, expected):
    result = run(tmp_path, *overrides)
    assert result.returncode == 2
    assert result.stderr.strip() == expected


def test_a_bad_override_type_fails_at_compose_time(tmp_path):
    result = run(tmp_path, "offload=prefetch", "offload.prefetch.offload_group_size=abc")
    assert result.returncode != 0
    assert "offload.prefetch.offload_group_size" in result.stderr
    assert "Traceback" not in result.stderr
