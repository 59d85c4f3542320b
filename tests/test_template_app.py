"""End to end: ``examples/lightning_hydra_template/``, the app laid out like a
lightning-hydra-template project, run as its users run it (``src/train.py`` and
``src/eval.py`` in subprocesses, from another folder).

What it must show: the group and the callback work there through configs alone (a defaults
entry, a callbacks file); a fit saves checkpoints that carry the pickled network with its true
weights while offloaded; an evaluation with the callback reproduces the test metric of the
training run on the same checkpoint; a multirun gets its sweep summary; an experiment config
switches the group; a bad setting stops the job before anything is built; a debug config that
drops the callbacks ends with one warning; a ``torch.compile``d network offloads through the
compile wrapper.

The runs that several tests read (the multirun, the experiment) run once per module.
"""

from __future__ import annotations

import contextlib
import csv
import inspect
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch import LightningModule
from omegaconf import OmegaConf

from hydra_offload import to_offload_config

APP = Path(__file__).resolve().parents[1] / "examples" / "lightning_hydra_template"

pytestmark = [
    pytest.mark.slow,
    # Loading the module from a checkpoint here: Lightning's advice for a network argument.
    pytest.mark.filterwarnings("ignore:.*is an instance of .nn.Module. and is already saved"),
]

PLAN = "[hydra_offload.integrations.lightning][INFO] - Offload plan: "
BUILT = ("building the datamodule", "building the model")  # what the scripts log as they build
EXPERIMENT = {  # what experiment/offload_prefetch.yaml selects
    "offload_backend": "prefetch",
    "layers": "net.blocks",
    "prefetch": {"offload_group_size": 4, "offload_num_in_group": 2, "offload_prefetch_step": 2},
}


def run(
    script: str, where: Path, *overrides: str, status: int = 0
) -> subprocess.CompletedProcess[str]:
    """``python <APP>/src/<script> <overrides>`` from ``where``; a single run writes into
    ``where/run``, a multirun into ``where/sweep``."""
    where.mkdir(parents=True, exist_ok=True)
    dirs = [f"hydra.run.dir={where / 'run'}", f"hydra.sweep.dir={where / 'sweep'}"]
    result = subprocess.run(
        [sys.executable, str(APP / "src" / script), *overrides, *dirs],
        cwd=where,
        # One intra-op thread: a tiny model gains nothing from more on a busy 2-core machine.
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == status, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def logged_test_metrics(run_dir: Path) -> dict[str, float]:
    """The ``test/...`` row of the run's ``csv/version_0/metrics.csv``."""
    with (run_dir / "csv" / "version_0" / "metrics.csv").open() as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("test/loss")]
    assert len(rows) == 1, rows
    return {key: float(value) for key, value in rows[0].items() if key.startswith("test/")}


def best_checkpoint(run_dir: Path) -> Path:
    """The checkpoint ModelCheckpoint kept (``save_top_k: 1``), which train.py tested."""
    (path,) = (run_dir / "checkpoints").glob("epoch_*.ckpt")
    assert f"testing the checkpoint {path}" in (run_dir / "train.log").read_text()
    return path


@contextlib.contextmanager
def app_importable() -> Iterator[None]:
    """The app's ``src`` package importable (the network pickled into checkpoints is one of
    its classes), and forgotten again afterwards."""
    sys.path.insert(0, str(APP))
    try:
        yield
    finally:
        sys.path.remove(str(APP))
        for name in [n for n in sys.modules if n == "src" or n.startswith("src.")]:
            del sys.modules[name]


def load(checkpoint: Path) -> dict[str, Any]:
    with app_importable():
        return torch.load(checkpoint, map_location="cpu", weights_only=False)


def assert_plain_net_with_the_checkpoints_weights(saved: dict[str, Any], prefix: str) -> None:
    """``hyper_parameters['net']`` is the app's network, with no trace of the offload, and
    with the weights of the checkpoint's state dict (``prefix``: where the net's are)."""
    net = saved["hyper_parameters"]["net"]
    assert type(net).__name__ == "ResidualMLP"  # the network, not a compile wrapper
    for module in net.modules():
        assert not module._forward_hooks
        assert not module._forward_pre_hooks
        assert not module._backward_hooks
        assert not module._state_dict_hooks
        assert not any("offload" in key for key in vars(module))
    weights = {k[len(prefix) :]: v for k, v in saved["state_dict"].items() if k.startswith(prefix)}
    pickled = net.state_dict()
    assert pickled.keys() == weights.keys()
    for name, tensor in pickled.items():
        assert tensor.device.type == "cpu", name
        assert torch.equal(tensor, weights[name]), name
    assert all(type(p) is torch.nn.Parameter for p in net.parameters())


# --------------------------------------------------------------------------------------------
# One multirun over the group, read by several tests
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = tmp_path_factory.mktemp("sweep")
    run("train.py", where, "-m", "offload=none,uva,prefetch")
    return where / "sweep"


@pytest.fixture(scope="module")
def experiment(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = tmp_path_factory.mktemp("experiment")
    run("train.py", where, "experiment=offload_prefetch")
    return where / "run"


def test_a_multirun_over_the_group_writes_one_summary_row_per_job(sweep):
    with (sweep / "sweep_summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["job"], r["overrides"], r["backend"]) for r in rows] == [
        ("0", "offload=none", "none"),
        ("1", "offload=uva", "uva"),
        ("2", "offload=prefetch", "prefetch"),
    ]
    assert all(float(row["step_ms"]) > 0 for row in rows)
    assert [int(row["device_bytes_saved"]) > 0 for row in rows] == [False, True, True]
    table = (sweep / "sweep_summary.md").read_text().splitlines()
    assert len(table) == 2 + 3  # the header, its rule, a row per job
    assert (sweep / "sweep_summary.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize(("job", "backend"), [(0, "none"), (1, "uva"), (2, "prefetch")])
def test_each_job_trains_tests_and_leaves_its_plan_and_summary(sweep, job, backend):
    out = sweep / str(job)
    log = (out / "train.log").read_text()
    summary = json.loads((out / "job_summary.json").read_text())
    assert summary["backend"] == backend
    assert summary["stage"] == "fit"
    assert set(summary["stages"]) == {"fit", "test"}
    assert summary["steps"] == 16  # 2 epochs of 256 samples in batches of 32
    assert summary["step_ms"] > 0
    assert set(logged_test_metrics(out)) == {"test/loss", "test/acc"}
    if backend == "none":
        assert PLAN not in log
        assert not (out / "offload_plan.txt").exists()
        return
    # Shown once: at the fit; the test that follows offloads with the same plan.
    assert log.count(PLAN) == 1
    assert log.count(PLAN + backend) == 1
    assert (out / "offload_plan.txt").read_text().startswith(f"Offload plan: {backend}")
    if backend == "prefetch":
        assert "layer stack 'net.blocks'  2 of 4 layers offloaded: 1, 3" in log
    assert summary["stages"]["test"]["device_bytes_saved"] == summary["device_bytes_saved"] > 0


@pytest.mark.parametrize(("job", "backend"), [(0, "none"), (1, "uva"), (2, "prefetch")])
def test_checkpoints_written_while_offloaded_carry_the_plain_net_with_its_true_weights(
    sweep, job, backend
):
    checkpoint = best_checkpoint(sweep / str(job))
    saved = load(checkpoint)
    assert_plain_net_with_the_checkpoints_weights(saved, prefix="net.")
    offload_state = [key for key in saved["callbacks"] if "OffloadCallback" in str(key)]
    if backend == "none":  # nothing to record: an evaluation without the callback loads it
        assert offload_state == []
    else:
        (key,) = offload_state
        assert saved["callbacks"][key]["config"]["offload_backend"] == backend
    # What the pickled net is for: loading the module without its arguments.
    with app_importable():
        from src.models.classifier_module import ClassifierModule

        supported = inspect.signature(LightningModule.load_from_checkpoint).parameters
        kwargs = {"weights_only": False} if "weights_only" in supported else {}
        module = ClassifierModule.load_from_checkpoint(checkpoint, map_location="cpu", **kwargs)
    for name, tensor in module.state_dict().items():
        assert torch.equal(tensor, saved["state_dict"][name]), name


def test_the_loggers_get_the_apps_config_and_the_callbacks_resolved_settings(sweep):
    hparams_file = sweep / "2" / "csv" / "version_0" / "hparams.yaml"
    # The app sends its callbacks config as written ...
    assert "config: ${offload}" in hparams_file.read_text()
    # ... and the callback adds the settings it validated.
    hparams = OmegaConf.load(hparams_file)
    expected = to_offload_config(
        {"offload_backend": "prefetch", "prefetch": {"offload_group_size": 2}}
    )
    assert hparams.offload.resolved_backend == "prefetch"
    assert hparams.offload.config_hash == expected.compute_hash()


def test_the_experiment_config_switches_the_group_and_sets_its_values(experiment):
    summary = json.loads((experiment / "job_summary.json").read_text())
    assert summary["overrides"] == "experiment=offload_prefetch"
    assert summary["backend"] == "prefetch"
    assert summary["config_hash"] == to_offload_config(EXPERIMENT).compute_hash()
    log = (experiment / "train.log").read_text()
    assert log.count(PLAN + "prefetch") == 1
    assert "layer stack 'net.blocks'  2 of 4 layers offloaded: 2, 3" in log
    choices = OmegaConf.load(experiment / ".hydra" / "hydra.yaml").hydra.runtime.choices
    assert choices.offload == "prefetch"
    assert choices.experiment == "offload_prefetch"
    assert_plain_net_with_the_checkpoints_weights(load(best_checkpoint(experiment)), prefix="net.")


# --------------------------------------------------------------------------------------------
# Evaluation: the checkpoint tested again, offloaded by eval.py's own callback
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("trained", "offload"),
    [("sweep/2", "prefetch"), ("sweep/1", "prefetch"), ("experiment", "uva")],
    ids=[
        "prefetch-run-evaluated-with-prefetch",
        "uva-run-evaluated-with-prefetch",
        "experiment-evaluated-with-uva",
    ],
)
def test_eval_with_the_callback_gives_the_train_runs_test_metrics(
    request, tmp_path, trained, offload
):
    fixture, _, job = trained.partition("/")
    run_dir = request.getfixturevalue(fixture)
    run_dir = run_dir / job if job else run_dir
    checkpoint = best_checkpoint(run_dir)

    result = run("eval.py", tmp_path, f"ckpt_path={checkpoint}", f"offload={offload}")

    out = tmp_path / "run"
    log = (out / "eval.log").read_text()
    assert log.count(PLAN + offload) == 1  # the test ran offloaded
    summary = json.loads((out / "job_summary.json").read_text())
    assert summary["stage"] == "test"
    assert summary["backend"] == offload
    assert summary["device_bytes_saved"] > 0
    # The same checkpoint, the same test set: the same figures, to the last bit, whatever
    # offload wrote the checkpoint and whatever offload reads it.
    assert logged_test_metrics(out) == logged_test_metrics(run_dir)
    # Lightning names the callbacks whose checkpoint state has no callback to go to: the
    # OffloadCallback is there (ModelCheckpoint is not, and may be named).
    missing = [
        line for line in result.stderr.splitlines() if "Please add the following callbacks" in line
    ]
    assert not any("OffloadCallback" in line for line in missing), missing


# --------------------------------------------------------------------------------------------
# An Optuna study over the offload settings
# --------------------------------------------------------------------------------------------


def test_an_optuna_study_records_settings_that_cannot_run_as_failed_trials_and_goes_on(
    tmp_path,
):
    # The sweeper proposes offload_num_in_group from range(1,4) with a group of 2; seeded,
    # one trial at a time, it proposes 2, 3, 1, 2, and the config rules refuse 3. The app
    # has no code for it: the group's job callback turns that trial into a failed one.
    result = run(
        "train.py", tmp_path, "-m", "hydra/sweeper=optuna", "hydra.sweeper.sampler.seed=1",
        "hydra.sweeper.n_jobs=1", "offload=prefetch",
        "offload.prefetch.offload_num_in_group=range(1,4)", "hydra.sweeper.n_trials=4",
        "trainer.max_epochs=1",
    )  # fmt: skip
    sweep = tmp_path / "sweep"
    summaries = {
        int(path.parent.name): json.loads(path.read_text())
        for path in sweep.glob("*/job_summary.json")
    }
    assert sorted(summaries) == [0, 1, 2, 3]
    failed = {job: s["error"] for job, s in summaries.items() if "error" in s}
    done = {job: s for job, s in summaries.items() if "error" not in s}
    assert failed, summaries  # the seeded sampler proposes both kinds
    assert done, summaries
    for job, error in failed.items():
        value = summaries[job]["overrides"].split("offload_num_in_group=")[1].split()[0]
        assert int(value) > 2
        assert error == (
            f"offload.prefetch.offload_num_in_group: got {value}; offload_num_in_group "
            f"({value}) must be <= offload_group_size (2)"
        )
        assert f"error: {error}" in result.stderr.splitlines()
    assert all(s["backend"] == "prefetch" and s["step_ms"] > 0 for s in done.values())
    assert result.stderr.count("the trial is recorded as failed; the study goes on") == len(failed)
    assert "Failed experiment: Return value must be float-castable. Got 'infeasible: " in (
        result.stdout
    )
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    assert best.best_params["offload.prefetch.offload_num_in_group"] in (1, 2)
    with (sweep / "sweep_summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert sum(bool(row["error"]) for row in rows) == len(failed)


# --------------------------------------------------------------------------------------------
# Mistakes: a bad setting, a debug config without callbacks
# --------------------------------------------------------------------------------------------


def test_a_bad_offload_setting_stops_the_job_with_one_line_before_anything_is_built(tmp_path):
    result = run(
        "train.py",
        tmp_path,
        "offload=prefetch",
        "offload.prefetch.offload_num_in_group=5",
        status=2,
    )
    assert result.stderr.splitlines() == [
        "error: offload.prefetch.offload_num_in_group: got 5; offload_num_in_group (5) must "
        "be <= offload_group_size (2)"
    ]
    log = tmp_path / "run" / "train.log"
    for marker in BUILT:
        assert marker not in result.stdout + result.stderr
        assert not log.exists() or marker not in log.read_text()


def test_a_debug_config_that_drops_the_callbacks_ends_with_one_warning(tmp_path):
    result = run("train.py", tmp_path, "debug=default", "offload=prefetch")
    assert all(marker in result.stdout for marker in BUILT)  # the job did run
    assert result.stderr.count("offload=prefetch selects the prefetch backend") == 1
    assert result.stderr.count("no OffloadCallback applied it during this job") == 1
    assert "check that no config sets callbacks: null" in result.stderr
    assert PLAN not in (tmp_path / "run" / "debug.log").read_text()


def test_the_debug_config_that_keeps_the_offload_has_only_the_offload_callback():
    with initialize_config_dir(config_dir=str(APP / "configs"), version_base="1.3"):
        dropped = compose("train", overrides=["debug=default", "offload=prefetch"])
        kept = compose("train", overrides=["debug=offload", "offload=prefetch"])
    assert dropped.callbacks is None
    assert dropped.logger is None
    assert list(kept.callbacks) == ["offload"]
    assert kept.callbacks.offload._target_ == "hydra_offload.OffloadCallback"
    assert kept.callbacks.offload.config.offload_backend == "prefetch"
    assert kept.task_name == "debug"
    assert kept.trainer.max_epochs == 1


# --------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------


def test_a_compiled_net_is_offloaded_with_the_layers_path_of_the_plain_net(tmp_path):
    run(
        "train.py",
        tmp_path,
        "model.compile=true",
        "offload=prefetch",
        "offload.layers=net.blocks",
    )
    out = tmp_path / "run"
    log = (out / "train.log").read_text()
    assert log.count(PLAN + "prefetch") == 1
    assert "layer stack 'net._orig_mod.blocks'  2 of 4 layers offloaded: 1, 3" in log
    assert "'net.blocks' resolves to 'net._orig_mod.blocks'" in log
    summary = json.loads((out / "job_summary.json").read_text())
    assert set(summary["stages"]) == {"fit", "test"}
    assert summary["steps"] == 16
    assert summary["device_bytes_saved"] > 0
    assert summary["stalls"] == 0
    assert set(logged_test_metrics(out)) == {"test/loss", "test/acc"}
    # The compiled module's state dict names the wrapper; the pickled net is the plain one.
    saved = load(best_checkpoint(out))
    assert any(key.startswith("net._orig_mod.blocks.1.") for key in saved["state_dict"])
    assert_plain_net_with_the_checkpoints_weights(saved, prefix="net._orig_mod.")
