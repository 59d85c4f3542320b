"""``run.py``, the main job, end to end in subprocesses, as a user runs it."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["data.samples=8", "data.seq_len=32", "model.num_layers=4"]
SMALL_PARAM_BYTES = 14_951_424  # the decoder at SMALL's size, float32
# A tiny Optuna study: one trial at a time, the sampler seeded.
OPTUNA = ["-m", "hydra/sweeper=optuna", "hydra.sweeper.n_jobs=1", "hydra.sweeper.sampler.seed=0"]


def run(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    dirs = [f"hydra.run.dir={tmp_path / 'run'}", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    return subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *args, *dirs],
        cwd=tmp_path,
        env={**os.environ, "COLUMNS": "160", **env},  # rich tables and lines unwrapped
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
    # On a CPU the figure is the plan's: the summary says so.
    saved = f"{summary['device_bytes_saved']:,} B) planned, not measured (CPU)"
    table = result.stdout.split("Run summary")[-1]
    row = next(line for line in table.splitlines() if "device bytes saved" in line)
    assert saved in row
    assert summary["device_bytes_saved_measured"] is False


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


def test_a_multirun_with_the_joblib_launcher_writes_the_sweep_summary(tmp_path):
    # Each job runs in a worker process; the summary is gathered in the main one.
    result = run(tmp_path, "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *SMALL,
                 "offload=uva,prefetch")  # fmt: skip
    assert result.returncode == 0, result.stderr
    with (tmp_path / "sweep" / "sweep_summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["job"] for row in rows] == ["0", "1"]
    assert [row["backend"] for row in rows] == ["uva", "prefetch"]
    assert all(float(row["step_ms"]) > 0 and not row["error"] for row in rows)


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
            "error: offload.layers: 'decoder.layers' does not exist in DecoderLM"
            " ... module lists found: layers (16 x DecoderBlock)",
        ),
        (
            ["objective=speed"],
            "error: objective: got 'speed'; expected null, one of step_time, peak_memory, or a "
            "list of them, e.g. objective=[step_time,peak_memory]",
        ),
    ],
)
def test_bad_settings_end_with_one_clear_line_and_exit_2(tmp_path, overrides, expected):
    result = run(tmp_path, *overrides)
    assert result.returncode == 2
    assert_line(result.stderr.strip(), expected)


def assert_line(line: str, expected: str) -> None:
    """``line`` is ``expected``; `` ... `` in ``expected`` stands for any text on the line."""
    assert "\n" not in line, line
    head, _, tail = expected.partition(" ... ")
    if not tail:
        assert line == expected
        return
    assert line.startswith(head), line
    assert line.endswith(tail), line


def test_a_bad_layers_path_fails_the_run_with_one_line(tmp_path):
    result = run(tmp_path, *SMALL, "offload=prefetch", "offload.layers=decoder.layers")
    assert result.returncode == 2
    assert_line(
        result.stderr.strip().splitlines()[-1],
        "error: offload.layers: 'decoder.layers' does not exist in LitDecoderLM"
        " ... module lists found: model.layers (4 x DecoderBlock)",
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


# --------------------------------------------------------------------------------------------
# objective: what the job returns to a sweeper that minimizes it
# --------------------------------------------------------------------------------------------


def test_an_optuna_study_minimizes_step_time_and_reports_the_best_settings(tmp_path):
    # Half the space cannot run (a layer stack the model does not have): those trials fail
    # and the study goes on.
    result = run(tmp_path, *OPTUNA, *SMALL, "objective=step_time", "offload=prefetch",
                 "offload.prefetch.offload_group_size=choice(2,4)",
                 "offload.layers=choice(model.layers,decoder.layers)",
                 "hydra.sweeper.n_trials=4")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = tmp_path / "sweep"
    summaries = [json.loads(p.read_text()) for p in sweep.glob("*/job_summary.json")]
    assert len(summaries) == 4
    done = [s for s in summaries if "error" not in s]
    failed = [s for s in summaries if "error" in s]
    assert done, "the seeded sampler tries both layer paths"
    assert failed, "the seeded sampler tries both layer paths"
    assert all(s["error"].startswith("offload.layers: 'decoder.layers' does not") for s in failed)
    assert "Failed experiment: Return value must be float-castable. Got 'infeasible: " in (
        result.stdout
    )
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    assert best.best_params["offload.layers"] == "model.layers"
    assert best.best_value == min(s["objective_value"][0] for s in done) > 0
    assert all(s["objective_value"] == [s["step_ms"]] for s in done)
    assert "Best parameters: {" in result.stdout
    with (sweep / "sweep_summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4
    assert sum(bool(row["error"]) for row in rows) == len(failed)


def test_settings_that_run_out_of_memory_are_failed_trials_and_the_study_goes_on(tmp_path):
    # A device too small for group size 4, injected (this machine never runs out): the job
    # frees what the trial held, reports one line and returns an InfeasibleTrial.
    oom = "{_target_:faults.OutOfMemoryAt,value:${offload.prefetch.offload_group_size},at:4}"
    result = run(
        tmp_path, *OPTUNA, *SMALL, "objective=step_time", "offload=prefetch",
        "offload.prefetch.offload_group_size=choice(2,4)", "hydra.sweeper.n_trials=4",
        f"+callbacks.oom={oom}", PYTHONPATH=str(Path(__file__).parent / "lightning_apps"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = [json.loads(p.read_text()) for p in (tmp_path / "sweep").glob("*/job_summary.json")]
    assert len(summaries) == 4
    failed = [s for s in summaries if "error" in s]
    assert failed, "the seeded sampler tries both group sizes"
    assert len(failed) < 4, "the seeded sampler tries both group sizes"
    reason = "out of memory: CUDA out of memory. Tried to allocate 2.00 GiB (injected at 4)"
    assert all(s["error"] == reason for s in failed)
    assert all(s["backend"] == "prefetch" for s in failed)  # what the trial was running
    assert result.stderr.splitlines().count(f"error: {reason}") == len(failed)
    best = OmegaConf.load(tmp_path / "sweep" / "optimization_results.yaml")
    assert best.best_params["offload.prefetch.offload_group_size"] == 2


def test_a_multi_objective_study_reports_its_pareto_front(tmp_path):
    result = run(tmp_path, *OPTUNA, *SMALL, "objective=[step_time,peak_memory]",
                 "hydra.sweeper.direction=[minimize,minimize]", "offload=prefetch",
                 "offload.prefetch.offload_group_size=choice(2,4)",
                 "hydra.sweeper.n_trials=2")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    front = OmegaConf.load(tmp_path / "sweep" / "optimization_results.yaml").solutions
    assert front
    assert all(len(solution["values"]) == 2 for solution in front)
    for path in (tmp_path / "sweep").glob("*/job_summary.json"):
        summary = json.loads(path.read_text())
        step_ms, peak_mib = summary["objective_value"]
        assert step_ms == summary["step_ms"]
        # On a CPU the plan's weight bytes left on the device stand in for the peak.
        assert peak_mib == (SMALL_PARAM_BYTES - summary["device_bytes_saved"]) / 2**20


def test_a_run_with_an_objective_prints_and_records_its_value(tmp_path):
    result = run(tmp_path, *SMALL, "offload=prefetch", "objective=[step_time,peak_memory]")
    assert result.returncode == 0, result.stderr
    summary = job_summary(tmp_path)
    assert summary["objective"] == ["step_time", "peak_memory"]
    step_ms, peak_mib = summary["objective_value"]
    assert f"objective step_time: {step_ms:.3f} ms (median time per step)" in result.stdout
    assert (
        f"objective peak_memory: {peak_mib:.3f} MiB: not measured on cpu; the plan's weight "
        "bytes left on the device stand in"
    ) in result.stdout
    assert peak_mib == (SMALL_PARAM_BYTES - 3_213_312) / 2**20


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            [],
            "error: objective: the OptunaSweeper minimizes what the job returns, and objective "
            "is null; set objective=step_time, objective=peak_memory or "
            "objective=[step_time,peak_memory]",
        ),
        (
            ["objective=[step_time,peak_memory]"],
            "error: objective: step_time, peak_memory are minimized, but "
            "hydra.sweeper.direction is ['minimize']; set "
            "hydra.sweeper.direction=[minimize,minimize]",
        ),
        (
            ["objective=step_time", "hydra.sweeper.direction=maximize"],
            "error: objective: step_time is minimized, but hydra.sweeper.direction is "
            "['maximize']; set hydra.sweeper.direction=minimize",
        ),
    ],
)
def test_an_optuna_study_the_job_cannot_serve_stops_at_once_with_one_line(
    tmp_path, overrides, expected
):
    result = run(tmp_path, *OPTUNA, *SMALL, *overrides, "hydra.sweeper.n_trials=2",
                 "offload.prefetch.offload_group_size=range(2,5)")  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == expected
    assert not list((tmp_path / "sweep").glob("*/job_summary.json"))


FAST_FAILURES = [
    ["offload=prefetch", "offload.prefetch.offload_num_in_group=3"],  # a cross-field rule
    ["offload=uva", "offload.uva.cpu_offload_gb=-1"],  # a value
    ["offload=prefetch", "offload.prefetch.offload_group_size=abc"],  # a type, at compose time
    ["offload=prefetch", "offload.prefetch.offload_group_sizes=2"],  # an unknown key
]


@pytest.mark.parametrize("overrides", FAST_FAILURES, ids=lambda o: o[-1])
def test_a_bad_setting_is_reported_before_torch_or_lightning_is_imported(tmp_path, overrides):
    result = run(tmp_path, *overrides, PYTHONPROFILEIMPORTTIME="1")
    assert result.returncode != 0
    assert "offload." in result.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()}
    assert "torch" not in imported
    assert "lightning" not in imported


def test_the_error_line_comes_in_under_half_the_time_torch_and_lightning_take_to_import(
    tmp_path,
):
    def seconds(*command: str) -> float:
        started = time.perf_counter()
        subprocess.run(command, cwd=tmp_path, capture_output=True, timeout=300)
        return time.perf_counter() - started

    imports = min(seconds(sys.executable, "-c", "import torch, lightning.pytorch") for _ in "ab")
    bad = [str(ROOT / "run.py"), "offload=uva", "offload.uva.cpu_offload_gb=-1"]
    error = min(seconds(sys.executable, *bad, f"hydra.run.dir={tmp_path}") for _ in "ab")
    assert error < imports / 2, f"{error:.2f} s to the error, {imports:.2f} s for the imports"


@pytest.mark.parametrize(
    "overrides",
    [
        ["offload=none", "offload.prefetch.offload_group_size=4"],
        ["-m", "offload=none,prefetch", "offload.prefetch.offload_group_size=4"],
        ["offload=none", "offload.uva.cpu_offload_gb=1"],
    ],
    ids=["run", "sweep", "uva"],
)
def test_offload_none_with_another_options_keys_is_refused_in_one_line(tmp_path, overrides):
    """``none`` means no offload: a job that would run prefetch (or UVA) under the name
    ``none`` (a sweep crossing ``none`` with prefetch's keys did) is refused instead."""
    result = run(tmp_path, *overrides)
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    backend = "uva" if "uva" in overrides[-1] else "prefetch"
    assert_line(
        line,
        f"error: offload: offload=none means no offload, but {overrides[-1]} turns {backend} "
        f"on; drop that, or choose offload={backend} ... and run offload=none apart)",
    )
    assert not (tmp_path / "run" / "job_summary.json").exists()


@pytest.mark.slow
def test_a_clean_job_calls_no_deprecated_api(tmp_path):
    """The project's own calls into Lightning, torch, Hydra... are not deprecated: run.py's
    job with deprecation warnings attributed to the project's modules turned into errors
    (Lightning's and torch's warnings about their own internals are theirs)."""
    code = (
        "import runpy, sys, warnings\n"
        "for category in (DeprecationWarning, FutureWarning):\n"
        "    warnings.filterwarnings('error', category=category, module=r'hydra_offload(\\.|$)')\n"
        f"sys.argv = {[str(ROOT / 'run.py'), *SMALL, 'offload=prefetch', 'mode=fit']!r} + "
        f"['hydra.run.dir={tmp_path / 'run'}']\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Run summary" in result.stdout
