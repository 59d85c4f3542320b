"""The benchmark scripts run end to end on a tiny model and report what they measured.

Not timed tests: the figures depend on the machine. What is checked is the harness itself:
it runs every configuration, checks outputs, counts host-to-device bytes correctly and
writes its JSON, Markdown and plot.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def _run(script: str, *args: str | Path) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@pytest.fixture(scope="module")
def offload_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    _run("offload_bench.py", "--preset", "tiny", "--steps", "2", "--warmup", "1",
         "--setup-gb", "0.02", "--out", out)  # fmt: skip
    report = json.loads((out / "offload-cpu-tiny.json").read_text())
    return out, report, {row["name"]: row for row in report["rows"]}


def test_offload_bench_writes_json_markdown_and_plot(offload_report):
    out, report, _ = offload_report
    assert report["device"] == "cpu"
    assert report["torch"]
    assert report["date"]
    markdown = (out / "offload-cpu-tiny.md").read_text()
    assert "| configuration | step ms (median) |" in markdown
    assert (out / "offload-cpu-tiny.png").read_bytes()[:4] == b"\x89PNG"


def test_offload_bench_measures_bandwidth_first(offload_report):
    _, report, _ = offload_report
    assert report["bandwidth"]["kind"] == "host memory copy"
    assert report["bandwidth"]["gb_per_s"] > 0


def test_offload_bench_runs_ours_with_unchanged_outputs(offload_report):
    _, _, rows = offload_report
    ours = [row for row in rows.values() if row["family"] == "ours"]
    assert len(ours) == 5
    for row in ours:
        assert row["max_abs_diff"] == 0.0, row["name"]
        assert row["stalls"] == 0, row["name"]
        assert row["step_ms"] > 0
        assert row["overlap_efficiency"] > 0


def test_offload_bench_counts_every_prefetched_byte_once_per_step(offload_report):
    _, _, rows = offload_report
    # Group size 1: every layer is offloaded and copied in exactly once per forward.
    row = rows["ours: prefetch G=1 K=1 S=1"]
    assert row["h2d_bytes_per_step"] == row["offloaded_bytes"] > 0
    half = rows["ours: prefetch G=2 K=1 S=1"]
    assert half["h2d_bytes_per_step"] == half["offloaded_bytes"] == row["offloaded_bytes"] // 2


def test_offload_bench_says_uva_reads_in_place(offload_report):
    _, _, rows = offload_report
    row = rows["ours: uva, all layers"]
    assert row["host_reads"] == "read in place"
    assert row["h2d_bytes_per_step"] == row["offloaded_bytes"] > 0


@pytest.mark.parametrize(
    ("name", "module"),
    [
        ("diffusers group offloading (block, stream)", "diffusers"),
        ("accelerate cpu_offload", "accelerate"),
    ],
)
def test_offload_bench_runs_or_skips_the_alternatives(offload_report, name, module):
    _, _, rows = offload_report
    if _installed(module):
        assert "skipped" not in rows[name]
        assert rows[name]["max_abs_diff"] == 0.0
    else:
        assert rows[name]["skipped"].startswith("not installed")


def test_offload_bench_times_setup_against_one_copy(offload_report):
    _, report, _ = offload_report
    setup = report["setup"]
    assert setup["weights_bytes"] > 0
    assert setup["apply_uva_s"] > 0
    assert setup["apply_uva_vs_copy"] > 0


def test_hook_overhead_reports_microseconds_per_layer(tmp_path):
    _run("hook_overhead.py", "--layers", "4", "--rounds", "1", "--out", tmp_path)
    report = json.loads((tmp_path / "hook_overhead-cpu.json").read_text())
    rows = {row["name"]: row for row in report["results"]}
    assert rows["hydra-offload prefetch"]["forward_us"] > 0
    assert "overhead_us_per_layer" in rows["hydra-offload uva (copy mode)"]


def test_offload_bench_times_fit_steps_with_identical_losses(tmp_path):
    _run("offload_bench.py", "--preset", "tiny", "--train", "--steps", "2", "--warmup", "1",
         "--setup-gb", "0", "--out", tmp_path)  # fmt: skip
    report = json.loads((tmp_path / "offload-cpu-tiny-train.json").read_text())
    assert report["step"].startswith("fit step")
    for row in report["rows"]:
        if row["family"] == "other":
            assert row["skipped"].startswith("inference only")
        else:
            assert row["max_abs_diff"] == 0.0, row["name"]  # the same losses, step for step
