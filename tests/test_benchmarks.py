"""The benchmark scripts run end to end on a tiny model and report what they measured.

Not timed tests: the figures depend on the machine. What is checked is the harness itself:
it runs every configuration, checks outputs, counts host-to-device bytes correctly and
writes its JSON, Markdown and plot. ``gpu_check.sh``, the one command run on a GPU machine,
is checked here in its CPU dry run: its steps, their recorded statuses and its bundle.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from hydra_offload.runtime.shared import can_share

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


OPTIONS = ("off", "per-rank", "shared")


@pytest.mark.slow
@pytest.mark.skipif(
    not (can_share() and Path("/proc/self/smaps_rollup").exists()),
    reason="needs Linux memfd_create, /proc and smaps_rollup",
)
def test_shared_host_bench_reports_one_copy_per_node(tmp_path):
    # 1 and 2 ranks, 4 MiB: about 20 s on 2 cores (six launches of fresh processes).
    _run("shared_host_bench.py", "--ranks", "1", "2", "--mib", "4", "--forwards", "2",
         "--out", tmp_path)  # fmt: skip
    report = json.loads((tmp_path / "shared_host-cpu.json").read_text())
    assert report["torch"]
    assert report["date"]
    assert report["machine"]["cpus"]
    assert report["command"].startswith("python benchmarks/shared_host_bench.py --ranks 1 2")
    markdown = (tmp_path / "shared_host-cpu.md").read_text()
    assert "| ranks | option | node Pss MiB | expected MiB | saving vs off MiB |" in markdown
    assert (tmp_path / "shared_host-cpu.png").read_bytes()[:4] == b"\x89PNG"
    rows = {(row["ranks"], row["option"]): row for row in report["rows"]}
    assert list(rows) == [(ranks, option) for ranks in (1, 2) for option in OPTIONS]
    weights = report["model"]["offloaded_bytes"]
    for (ranks, option), row in rows.items():
        assert row["outputs_equal"], (ranks, option)
        assert len(row["per_rank"]) == ranks
        assert [r["rank"] for r in row["per_rank"]] == list(range(ranks))
        assert len({r["pid"] for r in row["per_rank"]}) == ranks
        assert row["node_pss_bytes"] == max(row["node_pss_readings_bytes"]) > 0
        assert row["expected_node_bytes"] > 0
        if option == "off":
            assert row["setup_s_median"] is None
            assert row["shared_by"] == 1
            continue
        assert 0 < row["setup_s_median"] <= row["setup_s_max"]
        assert row["offloaded_bytes"] == weights > 0
        shared = option == "shared" and ranks == 2  # one process shares with nobody
        assert row["shared_by"] == (2 if shared else 1), (ranks, option)
        for rank in row["per_rank"]:
            assert rank["host_bytes_shared"] == (rank["host_bytes"] if shared else 0)
            assert rank["host_bytes"] >= weights
    # Memory, loosely (4 MiB is close to the noise between launches): measured in the same
    # processes, the node gains less over the setup with one shared copy than with a copy each.
    change = {option: rows[(2, option)]["node_pss_change_bytes"] for option in OPTIONS[1:]}
    assert change["shared"] < change["per-rank"], change


# --- benchmarks/gpu_check.sh: the GPU check's plumbing, in its CPU dry run ----------------------

GPU_CHECK = BENCHMARKS / "gpu_check.sh"
STEP_NAMES = ["install", "env", "pytest", "bench-compute", "bench-bandwidth", "bench-train",
              "hook-overhead"]  # fmt: skip


def _gpu_check(out: Path | None, *args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "OUT" and not k.startswith("GPU_CHECK")}
    environ["PYTHON"] = sys.executable
    if out is not None:
        environ["OUT"] = str(out)
    environ.update(env)
    return subprocess.run(
        ["bash", str(GPU_CHECK), *args],
        capture_output=True,
        text=True,
        env=environ,
        timeout=900,
    )


def _member(out: Path, name: str) -> bytes:
    """A file of the bundle ``gpu_check.sh`` wrote to ``out``."""
    with tarfile.open(out / "gpu_results.tar.gz") as tar:
        member = tar.extractfile(f"gpu_results/{name}")
        assert member is not None, name
        return member.read()


def _steps(out: Path) -> dict[str, dict[str, str]]:
    lines = _member(out, "steps.tsv").decode().splitlines()
    header = lines[0].split("\t")
    assert header == ["step", "rc", "seconds", "limit_s", "status"]
    rows = [line.split("\t") for line in lines[1:]]
    return {row[0]: dict(zip(header, row, strict=True)) for row in rows}


@pytest.fixture(scope="module")
def gpu_check_dry_run(tmp_path_factory):
    """One dry run for the tests below: a minute or two on 2 cores."""
    out = tmp_path_factory.mktemp("gpu_out")
    result = _gpu_check(out, "--dry-run")
    return out, result


@pytest.mark.slow
def test_gpu_check_dry_run_brings_back_at_most_8_files(gpu_check_dry_run):
    out, result = gpu_check_dry_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == [Path("gpu_results.tar.gz"), Path("summary.txt")]
    assert len(files) <= 8  # what the device tool brings back from $OUT
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", part) for f in files for part in f.parts)


@pytest.mark.slow
def test_gpu_check_dry_run_bundles_junit_env_and_benchmark_json(gpu_check_dry_run):
    out, _ = gpu_check_dry_run
    with tarfile.open(out / "gpu_results.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"gpu_results/env.txt",
            "gpu_results/pytest.log",
            "gpu_results/bench-compute/offload-cpu-tiny.json",
            "gpu_results/bench-compute/offload-cpu-tiny.png",
            "gpu_results/bench-bandwidth/offload-cpu-tiny.json",
            "gpu_results/bench-train/offload-cpu-tiny-train.json",
            "gpu_results/hook-overhead/hook_overhead-cpu.json"} <= names  # fmt: skip
    junit = sorted(n for n in names if re.fullmatch(r"gpu_results/pytest-junit[\w-]*\.xml", n))
    assert junit, names
    # Without a device every CUDA test is collected and skipped, and the XML says so.
    suite = ET.fromstring(_member(out, junit[0].removeprefix("gpu_results/")))
    cases = list(suite.iter("testcase"))
    assert cases
    assert all(case.find("skipped") is not None for case in cases)
    env = _member(out, "env.txt").decode()
    assert "torch " in env
    assert "cuda available False" in env
    assert "== nvidia-smi" in env
    assert json.loads(_member(out, "bench-compute/offload-cpu-tiny.json"))["device"] == "cpu"


@pytest.mark.slow
def test_gpu_check_dry_run_records_every_step_status(gpu_check_dry_run):
    out, _ = gpu_check_dry_run
    steps = _steps(out)
    assert list(steps) == STEP_NAMES
    assert all(step["rc"] == "0" and step["status"] == "ok" for step in steps.values()), steps
    summary = (out / "summary.txt").read_text()
    assert all(name in summary for name in STEP_NAMES)
    assert "pytest -m cuda: " in summary
    assert " skipped" in summary


def test_gpu_check_without_out_fails_loudly():
    result = _gpu_check(None, "--dry-run")
    assert result.returncode == 2
    assert "OUT is not set" in result.stderr


def test_gpu_check_rejects_an_unknown_step(tmp_path):
    result = _gpu_check(tmp_path, "--dry-run", "--only", "env,bogus")
    assert result.returncode == 2
    assert "unknown step in --only: bogus" in result.stderr
    assert not list(tmp_path.iterdir())


def test_gpu_check_keeps_going_past_failed_steps(tmp_path):
    # An interpreter that fails: both steps fail, each is recorded, and the run still ends
    # with its bundle and a nonzero status.
    result = _gpu_check(tmp_path, "--dry-run", "--only", "install,env", PYTHON="false")
    assert result.returncode == 1
    steps = _steps(tmp_path)
    assert list(steps) == ["install", "env"]
    assert all(step["status"] == "FAILED" and step["rc"] != "0" for step in steps.values())


def test_gpu_check_skips_steps_once_the_budget_is_spent(tmp_path):
    result = _gpu_check(tmp_path, "--dry-run", "--only", "env,pytest", GPU_CHECK_BUDGET_S="5")
    assert result.returncode == 1
    steps = _steps(tmp_path)
    assert [step["status"] for step in steps.values()] == ["skipped (budget spent)"] * 2
    assert "skipped (budget spent)" in (tmp_path / "summary.txt").read_text()


@pytest.mark.slow
@pytest.mark.skipif(
    not (can_share() and Path("/proc/self/smaps_rollup").exists()),
    reason="needs Linux memfd_create, /proc and smaps_rollup",
)
def test_ddp_train_bench_trains_offloaded_weights_as_ddp_with_one_copy_per_node(tmp_path):
    # 1 and 2 ranks, 4 MiB, four of the options: about 40 s on 2 cores (eight launches).
    options = ["ddp", "offload", "fsdp-cpu-offload", "ddp-per-param"]
    _run("ddp_train_bench.py", "--ranks", "1", "2", "--mib", "4", "--steps", "2",
         "--options", *options, "--out", tmp_path)  # fmt: skip
    report = json.loads((tmp_path / "ddp_train-cpu.json").read_text())
    assert report["torch"]
    assert report["date"]
    assert report["machine"]["cpus"]
    assert report["command"].startswith("python benchmarks/ddp_train_bench.py --ranks 1 2")
    assert report["options"] == options
    markdown = (tmp_path / "ddp_train-cpu.md").read_text()
    assert "| ranks | DDP node Pss MiB | offload node Pss MiB | offload saved vs DDP MiB |" in (
        markdown
    )
    assert (tmp_path / "ddp_train-cpu.png").read_bytes()[:4] == b"\x89PNG"
    rows = {(row["ranks"], row["option"]): row for row in report["rows"]}
    assert list(rows) == [(ranks, option) for ranks in (1, 2) for option in options]
    model = report["model"]
    layers, head = model["layers_bytes"], (model["width"] * 8 + 8) * 4
    for (ranks, option), row in rows.items():
        if option == "fsdp-cpu-offload" and "error" in row:
            assert row["error"].startswith("does not run on the CPU: ")
            continue
        assert len(row["per_rank"]) == ranks
        assert [r["rank"] for r in row["per_rank"]] == list(range(ranks))
        assert len({r["pid"] for r in row["per_rank"]}) == ranks
        assert row["node_pss_bytes"] == max(row["node_pss_readings_bytes"]) > 0
        assert len(row["step_s"]) == 2
        assert row["step_s_median"] > 0
        # Every run trains the weights DDP trains (with 1 or 2 ranks, in fact to the bit).
        assert row["max_abs_diff_vs_ddp"] <= 1e-6, (ranks, option)
    for ranks in (1, 2):
        ddp, offload = rows[(ranks, "ddp")], rows[(ranks, "offload")]
        assert ddp["max_abs_update"] > 1e-4  # the weights did train
        assert offload["weights_equal_ddp"]
        assert offload["max_abs_diff_vs_per_param"] <= 1e-6
        # One host copy of the layers for the node; each rank steps its share of them and
        # keeps AdamW's two moments for those only (and for the head, which DDP syncs).
        assert offload["shared_by"] == ranks
        assert sum(offload["owned_params"]) == 2 * model["depth"]
        assert ddp["node_optimizer_state_bytes"] == ranks * 2 * (layers + head)
        assert offload["node_optimizer_state_bytes"] == 2 * layers + ranks * 2 * head
        assert offload["node_grad_bytes"] == layers + ranks * head
    # Memory, loosely (4 MiB is close to the noise between launches): measured in the same
    # processes, training adds less to the node with the offload than with DDP.
    change = {option: rows[(2, option)]["node_pss_change_bytes"] for option in options[:2]}
    assert change["offload"] < change["ddp"], change
