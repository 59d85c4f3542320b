"""OffloadCallback: the offload applied to a LightningModule for every Trainer stage, results
identical to the same run without it, and the module given back intact afterwards.

Everything runs on the CPU (the offload mechanism is the same code as on an accelerator). The
usage routes that need their own process (a Hydra app, LightningCLI, DDP with 2 ranks) run
the scripts in ``tests/lightning_apps/`` in subprocesses.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import logging
import multiprocessing.process
import os
import pickle
import re
import shutil
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import SingleDeviceStrategy
from omegaconf import OmegaConf

from hydra_offload import (
    OffloadCallback,
    OffloadConfig,
    OffloadConfigError,
    OffloadError,
    OffloadPlanWarning,
    apply_offload,
    offload,
    plan_offload,
    to_offload_config,
)
from hydra_offload._warnings import warn_at_caller
from hydra_offload.integrations import lightning as lightning_integration
from hydra_offload.integrations.lightning import PLAN_FILE
from hydra_offload.integrations.sweep import COLUMNS
from hydra_offload.models import DecoderLM, LitDecoderLM, random_tokens
from hydra_offload.runtime.host import ALIGNMENT

APPS = Path(__file__).parent / "lightning_apps"

SIZES = {
    "num_layers": 4,
    "hidden_size": 32,
    "num_heads": 4,
    "intermediate_size": 64,
    "vocab_size": 64,
}
PREFETCH = {"prefetch": {"offload_group_size": 2}}  # layers 1 and 3 offloaded, one slot set
UVA = {"uva": {"cpu_offload_gb": 1.0}}  # every parameter in host memory
CONFIGS = [pytest.param(PREFETCH, id="prefetch"), pytest.param(UVA, id="uva")]
# Fit: (config, frozen): frozen trains only the head and final norm, so no gradient flows
# through an offloaded layer; otherwise every parameter trains, offloaded ones included.
FIT_VARIANTS = [
    pytest.param(UVA, False, id="uva"),
    pytest.param(PREFETCH, False, id="prefetch"),
    pytest.param(PREFETCH, True, id="prefetch-frozen"),
]
STAGES = ["fit", "validate", "test", "predict"]
HEAD = ("model.lm_head.", "model.norm.")
CPU_WARNING = "saves no memory"

pytestmark = [
    pytest.mark.filterwarnings("ignore:OffloadCallback. the compute device is the CPU"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers"),
    pytest.mark.filterwarnings("ignore:.*isinstance.treespec, LeafSpec"),
]


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def one_cpu_thread():
    """The models are tiny: one thread is as fast, and does not stall on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Recorder(LitDecoderLM):
    """LitDecoderLM that keeps every step's loss, so runs compare batch by batch."""

    def __init__(self, model: torch.nn.Module | None, lr: float = 1e-3) -> None:
        super().__init__(model, lr=lr)
        self.losses: dict[str, list[torch.Tensor]] = {"train": [], "val": [], "test": []}

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.losses["train"].append(loss.detach().clone())
        return loss

    def validation_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("val_loss", loss)
        self.losses["val"].append(loss.detach().clone())

    def test_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("test_loss", loss)
        self.losses["test"].append(loss.detach().clone())


class BuiltInConfigureModel(Recorder):
    """Creates its network in ``configure_model``, as sharded / large-model code does."""

    def __init__(self) -> None:
        super().__init__(None)

    def configure_model(self) -> None:
        if self.model is None:
            torch.manual_seed(0)
            self.model = DecoderLM(**SIZES)


class Probe(Callback):
    """Placed after the OffloadCallback: records what the offload looks like mid-stage."""

    def __init__(self, offload: OffloadCallback) -> None:
        self.offload = offload
        self.plan = None
        self.pointers_in_offload_memory: bool | None = None
        self.teardown_saw_handle: bool | None = None

    def _look(self, trainer, pl_module) -> None:
        handle = self.offload.handle
        assert handle is not None, "the offload is not active while the stage runs"
        self.plan = handle.plan
        params = dict(pl_module.named_parameters())
        installed = handle._installed
        if handle.plan.backend == "prefetch":
            allowed = {
                t.data_ptr() for entry in installed.pool.slots for s in entry for t in s.tensors
            }
            self.pointers_in_offload_memory = all(
                params[name].data_ptr() in allowed for name in handle.plan.offloaded_params
            )
        else:
            self.pointers_in_offload_memory = all(
                params[e.name].data_ptr() == e.hosts[0].data_ptr() for e in installed.staged.params
            )
        # Whether the offload is still there when the strategy tears down (moves to CPU).
        strategy = trainer.strategy
        teardown = strategy.teardown

        def watched_teardown() -> None:
            self.teardown_saw_handle = self.offload.handle is not None
            teardown()

        strategy.teardown = watched_teardown

    def on_train_start(self, trainer, pl_module):
        self._look(trainer, pl_module)

    def on_validation_start(self, trainer, pl_module):
        if not trainer.sanity_checking and trainer.state.fn == "validate":
            self._look(trainer, pl_module)

    def on_test_start(self, trainer, pl_module):
        self._look(trainer, pl_module)

    def on_predict_start(self, trainer, pl_module):
        self._look(trainer, pl_module)


def module(*, frozen: bool = False, trainable: tuple[str, ...] = HEAD) -> Recorder:
    """The tiny decoder, same weights every time; ``frozen``: only ``trainable`` train."""
    torch.manual_seed(0)
    lit = Recorder(DecoderLM(**SIZES))
    if frozen:
        for name, param in lit.named_parameters():
            param.requires_grad_(name.startswith(trainable))
    return lit


def tokens(samples: int = 8, seed: int = 0):
    return random_tokens(
        vocab_size=SIZES["vocab_size"], seq_len=9, samples=samples, batch_size=2, seed=seed
    )


def trainer(*callbacks: Callback, **kwargs) -> Trainer:
    settings = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "max_steps": 4,
        "limit_val_batches": 2,
        "num_sanity_val_steps": 1,
    }
    return Trainer(callbacks=list(callbacks), **{**settings, **kwargs})


def run(stage: str, lit: Recorder, *callbacks: Callback, **kwargs):
    """Run one stage; returns predictions, or the recorded losses of the stage."""
    t = trainer(*callbacks, **kwargs)
    if stage == "fit":
        t.fit(lit, tokens(), tokens(samples=4, seed=1))
        return lit.losses
    if stage == "predict":
        return t.predict(lit, tokens())
    getattr(t, stage)(lit, tokens())
    return lit.losses["val" if stage == "validate" else "test"]


def all_equal(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(all_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(all_equal(x, y) for x, y in zip(a, b, strict=True))
    return torch.equal(a, b)


def params_of(lit) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in lit.named_parameters()}


def global_optimizer_hooks() -> int:
    from torch.optim import optimizer

    return len(optimizer._global_optimizer_pre_hooks) + len(optimizer._global_optimizer_post_hooks)


def hooks_left(lit) -> list[str]:
    kinds = (
        "_forward_hooks",
        "_forward_pre_hooks",
        "_backward_hooks",
        "_backward_pre_hooks",
        "_state_dict_hooks",
        "_state_dict_pre_hooks",
        "_load_state_dict_pre_hooks",
        "_load_state_dict_post_hooks",
    )
    return [
        f"{name or '<root>'}.{kind}"
        for name, sub in lit.named_modules()
        for kind in kinds
        if getattr(sub, kind, None)
    ]


# --------------------------------------------------------------------------------------------
# Results: every stage gives what it gives without the callback
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("stage", ["validate", "test", "predict"])
def test_evaluation_stages_give_bit_identical_results_to_the_run_without_offload(stage, config):
    expected = run(stage, module())
    callback = OffloadCallback(config)
    got = run(stage, module(), callback)
    assert len(got) == len(expected) > 0
    assert all_equal(got, expected)
    assert callback.last_stats is not None
    assert callback.last_stats.forwards == len(expected)
    assert callback.last_plan is not None
    assert callback.last_plan.offloaded_bytes == callback.last_stats.offloaded_bytes


@pytest.mark.parametrize(("config", "frozen"), FIT_VARIANTS)
def test_fit_gives_bit_identical_losses_and_parameters_to_the_run_without_offload(config, frozen):
    reference = module(frozen=frozen)
    expected_losses = run("fit", reference)
    lit = module(frozen=frozen)
    callback = OffloadCallback(config)
    losses = run("fit", lit, callback)
    assert len(losses["train"]) == 4
    assert len(losses["val"]) == 1 + 2  # sanity check, then the epoch's validation
    assert all_equal(losses, expected_losses)
    assert all_equal(params_of(lit), params_of(reference))
    assert not all_equal(params_of(lit), params_of(module())), "nothing was trained"


def test_prefetch_fit_through_frozen_offloaded_layers_matches_the_run_without_offload():
    # Layer 0 trains; offloaded layers 1 and 3 are frozen but gradients pass through them.
    trainable = ("model.layers.0.", *HEAD)
    reference = module(frozen=True, trainable=trainable)
    expected_losses = run("fit", reference)
    lit = module(frozen=True, trainable=trainable)
    losses = run("fit", lit, OffloadCallback(PREFETCH))
    assert len(losses["train"]) == 4
    assert all_equal(losses, expected_losses)
    assert all_equal(params_of(lit), params_of(reference))
    before = params_of(module())
    layer_0 = [n for n in before if n.startswith("model.layers.0.")]
    assert all(not torch.equal(lit.get_parameter(n), before[n]) for n in layer_0), "not trained"


# --------------------------------------------------------------------------------------------
# The module is given back intact
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("stage", STAGES)
def test_the_module_is_restored_after_each_stage(stage, config):
    lit = module()
    before = {n: (p, p.detach().clone(), p.requires_grad) for n, p in lit.named_parameters()}
    optimizer_hooks = global_optimizer_hooks()
    callback = OffloadCallback(config)
    run(stage, lit, callback)

    after = dict(lit.named_parameters())
    assert after.keys() == before.keys()
    for name, (param, value, requires_grad) in before.items():
        assert after[name] is param, name
        assert param.device.type == "cpu", name
        assert param.dtype == torch.float32, name
        assert param.requires_grad == requires_grad, name
        if stage != "fit" or not requires_grad:
            assert torch.equal(param, value), name
    # Each parameter owns its memory again (none left in host storage or pool slots).
    pointers = [p.data_ptr() for p in after.values()]
    assert len(set(pointers)) == len(pointers)
    assert hooks_left(lit) == []
    assert global_optimizer_hooks() == optimizer_hooks
    assert "configure_model" not in lit.__dict__
    assert "_ddp_params_and_buffers_to_ignore" not in lit.__dict__
    assert callback.handle is None
    assert callback.last_stats is not None
    assert callback.last_stats.offloaded_bytes > 0
    apply_offload(lit, config).remove()  # no offload left registered on the module


@pytest.mark.parametrize("config", CONFIGS)
def test_the_module_is_restored_when_the_stage_raises(config):
    class Failing(Recorder):
        def predict_step(self, batch, batch_idx):
            if batch_idx == 1:
                raise RuntimeError("boom")
            return super().predict_step(batch, batch_idx)

    torch.manual_seed(0)
    lit = Failing(DecoderLM(**SIZES))
    before = params_of(lit)
    callback = OffloadCallback(config)
    with pytest.raises(RuntimeError, match="boom"):
        trainer(callback).predict(lit, tokens())
    assert callback.handle is None
    assert all_equal(params_of(lit), before)
    assert hooks_left(lit) == []
    assert "configure_model" not in lit.__dict__
    assert "_ddp_params_and_buffers_to_ignore" not in lit.__dict__


def test_a_second_stage_with_the_same_callback_offloads_again():
    lit = module()
    callback = OffloadCallback(PREFETCH)
    expected = run("predict", module())
    assert all_equal(run("validate", lit, callback), run("validate", module()))
    first = callback.last_stats
    assert all_equal(run("predict", lit, callback), expected)
    assert callback.last_stats is not first
    assert callback.last_stats.forwards == len(expected)
    assert hooks_left(lit) == []


@pytest.mark.parametrize(
    "stage",
    [
        "fit",
        "validate",
        "test",
        "predict",
    ],
)
def test_the_offload_is_removed_before_the_strategy_teardown(stage):
    callback = OffloadCallback(PREFETCH)
    probe = Probe(callback)
    run(stage, module(frozen=True), callback, probe)
    assert probe.teardown_saw_handle is False


@pytest.mark.cuda
@pytest.mark.parametrize(("config", "frozen"), [(UVA, False), (PREFETCH, True)])
def test_on_cuda_fit_finishes_and_gives_the_module_back_on_the_cpu(config, frozen):
    lit = module(frozen=frozen)
    callback = OffloadCallback(config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses = run("fit", lit, callback, accelerator="gpu")
    assert len(losses["train"]) == 4
    assert not [w for w in caught if CPU_WARNING in str(w.message)]
    assert callback.handle is None
    assert callback.last_stats.offloaded_bytes > 0
    assert {p.device.type for p in lit.parameters()} == {"cpu"}
    assert hooks_left(lit) == []


@pytest.mark.cuda
@pytest.mark.parametrize("config", CONFIGS)
def test_on_cuda_predictions_are_bit_identical_to_the_run_without_offload(config):
    expected = run("predict", module(), accelerator="gpu")
    callback = OffloadCallback(config)
    assert all_equal(run("predict", module(), callback, accelerator="gpu"), expected)
    assert callback.last_stats.h2d_bytes_per_forward is not None


# --------------------------------------------------------------------------------------------
# What gets offloaded, and where the weights are while a stage runs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS)
def test_layers_built_in_configure_model_are_offloaded(config):
    expected = run("predict", module())
    lit = BuiltInConfigureModel()
    callback = OffloadCallback(config)
    probe = Probe(callback)
    got = run("predict", lit, callback, probe)
    assert all_equal(got, expected)
    assert probe.plan is not None
    names = set(probe.plan.offloaded_params)
    assert "model.layers.1.mlp.down_proj.weight" in names
    if config is PREFETCH:
        assert probe.plan.stacks[0].path == "model.layers"
        assert probe.plan.stacks[0].offloaded_layers == (1, 3)
    assert callback.last_stats.offloaded_bytes > 0
    assert "configure_model" not in lit.__dict__


@pytest.mark.parametrize("precision", ["32-true", "bf16-true"])
@pytest.mark.parametrize("config", CONFIGS)
def test_offloaded_weights_stay_in_offload_memory_while_the_stage_runs(config, precision):
    # Neither the precision conversion nor the strategy's model.to(device) re-materialises
    # them: UVA parameters point at host storage, prefetch parameters at pool slots.
    callback = OffloadCallback(config)
    probe = Probe(callback)
    run("predict", module(), callback, probe, precision=precision)
    assert probe.pointers_in_offload_memory is True


@pytest.mark.parametrize("config", CONFIGS)
def test_bf16_true_predictions_equal_the_run_without_offload_and_host_storage_is_bf16(config):
    expected = run("predict", module(), precision="bf16-true")
    callback = OffloadCallback(config)
    probe = Probe(callback)
    lit = module()
    got = run("predict", lit, callback, probe, precision="bf16-true")
    assert all(t.dtype == torch.bfloat16 for t in got)
    assert all_equal(got, expected)
    assert {p.dtype for p in probe.plan.params} == {torch.bfloat16}
    per_element = sum(p.nbytes for p in probe.plan.params) / sum(
        torch.Size(p.shape).numel() for p in probe.plan.params
    )
    assert per_element == 2
    # Host storage holds the bf16 weights: their bytes, plus alignment padding.
    offloaded = probe.plan.offloaded_bytes
    assert offloaded <= callback.last_stats.host_bytes
    assert callback.last_stats.host_bytes <= offloaded + ALIGNMENT * (len(probe.plan.params) + 1)
    assert {p.dtype for p in lit.parameters()} == {torch.bfloat16}


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def fit_with_checkpoints(directory: Path, config: dict | None, *, frozen: bool) -> Recorder:
    lit = module(frozen=frozen)
    checkpoints = ModelCheckpoint(
        dirpath=directory, filename="{step}", every_n_train_steps=2, save_top_k=-1
    )
    callbacks = [OffloadCallback(config)] if config is not None else []
    trainer(*callbacks, checkpoints, enable_checkpointing=True).fit(lit, tokens())
    return lit


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    """``(config, frozen) -> folder`` with ``plain/`` and ``offload/`` checkpoints at steps 2
    and 4 of the same fit without and with the offload (each pair made once per module)."""
    made: dict[tuple[str, bool], Path] = {}

    def get(config: dict, frozen: bool) -> Path:
        key = (repr(config), frozen)
        if key not in made:
            root = tmp_path_factory.mktemp("checkpoints")
            fit_with_checkpoints(root / "plain", None, frozen=frozen)
            fit_with_checkpoints(root / "offload", config, frozen=frozen)
            made[key] = root
        return made[key]

    return get


@pytest.mark.parametrize(("config", "frozen"), FIT_VARIANTS)
def test_checkpoints_written_while_offloaded_hold_the_true_weights(checkpointed, config, frozen):
    tmp_path = checkpointed(config, frozen)
    for step in (2, 4):
        name = f"step={step}.ckpt"
        expected = torch.load(tmp_path / "plain" / name, weights_only=False)["state_dict"]
        got = torch.load(tmp_path / "offload" / name, weights_only=False)["state_dict"]
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in expected), step
    assert not all_equal(
        torch.load(tmp_path / "offload" / "step=4.ckpt", weights_only=False)["state_dict"],
        module().state_dict(),
    ), "the checkpoint holds the initial weights: nothing was trained"


@pytest.mark.parametrize(("config", "frozen"), FIT_VARIANTS)
def test_resuming_from_an_offloaded_checkpoint_works_with_and_without_offload(
    checkpointed, config, frozen
):
    tmp_path = checkpointed(config, frozen)
    resumed = {}
    for label, directory, callbacks in [
        ("offload", "offload", [OffloadCallback(config)]),
        ("no offload", "offload", []),
        ("plain", "plain", []),
    ]:
        lit = module(frozen=frozen)
        t = trainer(*callbacks, max_steps=6)
        t.fit(lit, tokens(), ckpt_path=tmp_path / directory / "step=2.ckpt")
        assert t.global_step == 6, label
        resumed[label] = params_of(lit)
    assert all_equal(resumed["offload"], resumed["no offload"])
    assert all_equal(resumed["offload"], resumed["plain"])


def test_with_nothing_offloaded_checkpoints_hold_no_callback_state(tmp_path):
    # An evaluation script builds its Trainer without the callback: loading the checkpoint of
    # a run with offload=none must not ask for it ("Please add the following callbacks").
    lit = module(frozen=True)
    checkpoints = ModelCheckpoint(dirpath=tmp_path, filename="last")
    trainer(OffloadCallback({}), checkpoints, enable_checkpointing=True).fit(lit, tokens())
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert not any("OffloadCallback" in str(key) for key in saved["callbacks"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        evaluate = trainer(enable_checkpointing=True)
        evaluate.test(module(), tokens(), ckpt_path=tmp_path / "last.ckpt")
    assert not [w for w in caught if "Please add the following callbacks" in str(w.message)]
    # With an offload the config is kept, for the record.
    assert OffloadCallback(PREFETCH).state_dict()["config_hash"] == (
        to_offload_config(PREFETCH).compute_hash()
    )


def spy_on_loaded_state(callback: OffloadCallback, seen: list[dict]) -> None:
    """Record every state handed to ``callback.load_state_dict``, which still runs."""
    load = callback.load_state_dict

    def recording(state_dict: dict) -> None:
        seen.append(state_dict)
        load(state_dict)

    callback.load_state_dict = recording  # type: ignore[method-assign]


def inert(callback: OffloadCallback) -> OffloadCallback:
    """``callback`` with its offload step stubbed out. A module takes one offload at a time
    (apply_offload refuses a second), so of two OffloadCallbacks in one Trainer only the first
    can offload; the second still writes and reads its checkpoint entry."""
    callback._apply = lambda trainer, pl_module: None  # type: ignore[method-assign]
    return callback


def test_the_state_key_carries_the_config_hash():
    prefetch = OffloadCallback(PREFETCH)
    assert prefetch.state_key == (
        f"OffloadCallback{{'config_hash': '{to_offload_config(PREFETCH).compute_hash()}'}}"
    )
    assert prefetch.state_key != OffloadCallback(UVA).state_key
    same = OffloadCallback(OmegaConf.create(PREFETCH), log_every_n_steps=3)
    assert same.state_key == prefetch.state_key


def test_two_callbacks_with_different_configs_keep_their_own_checkpoint_entries(tmp_path):
    first, second = OffloadCallback(PREFETCH), inert(OffloadCallback(UVA))
    checkpoints = ModelCheckpoint(dirpath=tmp_path, filename="last")
    trainer(first, second, checkpoints, enable_checkpointing=True).fit(module(), tokens())
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["callbacks"]
    assert saved[first.state_key] == first.state_dict()
    assert saved[second.state_key] == second.state_dict()

    seen: dict[str, list[dict]] = {"prefetch": [], "uva": []}
    loading = [OffloadCallback(PREFETCH), inert(OffloadCallback(UVA))]
    for callback, name in zip(loading, seen, strict=True):
        spy_on_loaded_state(callback, seen[name])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(*loading).validate(module(), tokens(), ckpt_path=tmp_path / "last.ckpt")
    assert seen == {"prefetch": [first.state_dict()], "uva": [second.state_dict()]}
    # Lightning warns about checkpoint entries that no callback claims (here ModelCheckpoint's,
    # which the loading Trainer lacks): no OffloadCallback entry is among them.
    unclaimed = [str(w.message) for w in caught if "add the following callbacks" in str(w.message)]
    assert unclaimed
    assert not [message for message in unclaimed if "OffloadCallback" in message]


@pytest.mark.parametrize(
    ("entry", "config"),
    [
        pytest.param("OffloadCallback", PREFETCH, id="old-key"),
        pytest.param("OffloadCallback", UVA, id="old-key-other-config"),
        pytest.param(None, UVA, id="other-config"),
    ],
)
def test_an_entry_under_another_key_is_taken_and_a_changed_config_noted(
    checkpointed, tmp_path, caplog, entry, config
):
    # "old-key": a checkpoint written before the state key carried the config hash, with the
    # entry under the bare class name. "other-config": resuming with another offload config.
    step_2 = checkpointed(PREFETCH, True) / "offload" / "step=2.ckpt"
    written = torch.load(step_2, weights_only=False)
    key = OffloadCallback(PREFETCH).state_key
    state = written["callbacks"].pop(key)
    written["callbacks"][entry or key] = state
    torch.save(written, tmp_path / "written.ckpt")

    callback, seen = OffloadCallback(config), []
    spy_on_loaded_state(callback, seen)
    resumed = trainer(callback, max_steps=6)
    lit = module(frozen=True)
    with caplog.at_level(logging.INFO), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed.fit(lit, tokens(), ckpt_path=tmp_path / "written.ckpt")
    assert resumed.global_step == 6
    assert seen == [state]
    # The entry was moved to the callback's key before Lightning looked for unclaimed ones.
    unclaimed = [str(w.message) for w in caught if "add the following callbacks" in str(w.message)]
    assert not [message for message in unclaimed if "OffloadCallback" in message]
    assert "on_load_checkpoint" not in vars(lit)  # the module's own hook is back
    noted = "resuming with a different offload config" in caplog.text
    assert noted is (config is not PREFETCH)


def test_every_hook_it_overrides_is_marked_override():
    overridden = [
        name
        for name in vars(OffloadCallback)
        if not name.startswith("__") and hasattr(Callback, name)
    ]
    assert "setup" in overridden
    assert "state_key" in overridden
    for name in overridden:
        member = vars(OffloadCallback)[name]
        function = member.fget if isinstance(member, property) else member
        assert getattr(function, "__override__", False), name


# --------------------------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------------------------


def logged_offload_rows(logger: CSVLogger) -> list[dict[str, str]]:
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        return [row for row in csv.DictReader(f) if row.get("offload/offloaded_bytes")]


STAT_METRICS = (
    "device_bytes_saved",
    "offloaded_bytes",
    "pool_bytes",
    "host_bytes_pinned",
    "h2d_bytes_per_forward",
    "stalls",
)


def test_fit_logs_the_offload_stats_every_n_steps_and_at_the_end(tmp_path):
    callback = OffloadCallback(PREFETCH, log_every_n_steps=3)
    logger = CSVLogger(tmp_path, name="logs", version=0)
    run("fit", module(frozen=True), callback, logger=logger, log_every_n_steps=1)
    rows = logged_offload_rows(logger)
    assert [row["step"] for row in rows] == ["3", "4"]  # step 3, then the end of the stage
    columns = {key for key in rows[0] if key.startswith("offload/")}
    assert columns == {f"offload/{key}" for key in STAT_METRICS}  # wait_ms: CUDA only
    stats = callback.last_stats
    for key in STAT_METRICS:
        assert float(rows[-1][f"offload/{key}"]) == float(getattr(stats, key)), key
    assert stats.offloaded_bytes > 0


@pytest.mark.parametrize("stage", ["validate", "test", "predict"])
def test_evaluation_stages_log_the_offload_stats_at_their_end(tmp_path, stage):
    callback = OffloadCallback(UVA)
    logger = CSVLogger(tmp_path, name="logs", version=0)
    run(stage, module(), callback, logger=logger)
    (row,) = logged_offload_rows(logger)
    assert float(row["offload/offloaded_bytes"]) == callback.last_stats.offloaded_bytes > 0


def plans_logged(caplog) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "hydra_offload.integrations.lightning"
        and r.getMessage().startswith("Offload plan")
    ]


def test_the_plan_is_logged_once_per_fit_and_at_other_stages_only_when_it_changes(caplog):
    caplog.set_level(logging.INFO, logger="hydra_offload")
    callback = OffloadCallback(PREFETCH)
    lit = module(frozen=True)
    run("fit", lit, callback)
    (plan,) = plans_logged(caplog)
    assert plan.startswith("Offload plan: prefetch")
    assert "2 of 4 layers offloaded: 1, 3" in plan
    # Testing, validating and predicting with the same module and plan: nothing new to show.
    for stage in ("test", "validate", "predict"):
        run(stage, lit, callback)
    assert len(plans_logged(caplog)) == 1
    # Another module with another plan is shown; a new fit shows its plan again.
    torch.manual_seed(0)
    deeper = Recorder(DecoderLM(**{**SIZES, "num_layers": 6}))
    run("predict", deeper, callback)
    assert "3 of 6 layers offloaded: 1, 3, 5" in plans_logged(caplog)[-1]
    run("fit", lit, callback)
    assert len(plans_logged(caplog)) == 3


class HyperparamsRecorder(CSVLogger):
    """A CSV logger that also keeps every hyperparameter dict it is sent (``sent``)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sent: list[dict] = []

    def log_hyperparams(self, params, *args, **kwargs):
        self.sent.append(params)
        super().log_hyperparams(params, *args, **kwargs)


def test_the_validated_config_is_logged_as_hyperparameters_once_per_logger(tmp_path):
    # What a Hydra callbacks config passes: a node whose values are interpolations.
    cfg = OmegaConf.create(
        {"group": 2, "offload": {"prefetch": {"offload_group_size": "${group}"}}}
    )
    callback = OffloadCallback(cfg.offload)

    logger = HyperparamsRecorder(tmp_path, name="logs", version=0)
    t = trainer(callback, logger=logger)
    lit = module(frozen=True)
    t.fit(lit, tokens(), tokens(samples=4, seed=1))
    t.test(lit, tokens())
    assert [p for p in logger.sent if "offload" in p] == [callback.hparams]
    saved = OmegaConf.load(Path(logger.log_dir) / "hparams.yaml")
    assert saved.offload.prefetch.offload_group_size == 2
    assert saved.offload.resolved_backend == "prefetch"
    assert saved.offload.config_hash == to_offload_config(PREFETCH).compute_hash()
    assert "${" not in (Path(logger.log_dir) / "hparams.yaml").read_text()


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_in_a_hydra_job_the_plan_and_a_job_summary_go_to_its_output_directory(hydra_job):
    callback = OffloadCallback(PREFETCH)
    lit = module(frozen=True)
    run("fit", lit, callback)
    plan = (hydra_job / PLAN_FILE).read_text()
    assert plan.startswith("Offload plan: prefetch")
    lines = callback.last_plan.summary().rstrip().splitlines()
    assert plan == "\n".join(line.rstrip() for line in lines) + "\n"
    assert "2 of 4 layers offloaded: 1, 3" in plan
    summary = read_json(hydra_job / "job_summary.json")
    stats = callback.last_stats
    assert summary["stage"] == "fit"
    assert summary["backend"] == "prefetch"
    assert summary["config_hash"] == callback.config.compute_hash()
    assert summary["device"] == "cpu"
    assert summary["peak_device_bytes"] is None  # measured on CUDA only
    assert summary["device_bytes_saved"] == stats.device_bytes_saved > 0
    assert summary["device_bytes_saved_measured"] is False
    assert summary["offloaded_bytes"] == stats.offloaded_bytes
    assert summary["steps"] == 4
    assert summary["step_ms"] > 0
    assert summary["h2d_gb_s"] > 0
    assert summary["stalls"] == 0
    assert summary["job"] == 0
    assert summary["overrides"] == ""
    # A later stage adds its own figures; the top level keeps the fit's.
    run("test", lit, callback)
    summary = read_json(hydra_job / "job_summary.json")
    assert summary["stage"] == "fit"
    assert set(summary["stages"]) == {"fit", "test"}
    assert summary["stages"]["test"]["steps"] == 4
    # Every column of the sweep table is there.
    assert set(COLUMNS) - {"error"} <= set(summary)


def test_in_a_hydra_job_without_offload_the_summary_is_still_written(hydra_job):
    run("predict", module(), OffloadCallback({}))
    summary = read_json(hydra_job / "job_summary.json")
    assert summary["backend"] == "none"
    assert summary["device_bytes_saved"] == 0
    assert summary["steps"] == 4
    assert summary["step_ms"] > 0
    assert not (hydra_job / PLAN_FILE).exists()


def test_in_a_hydra_job_a_stage_that_raises_leaves_its_error_in_the_summary(hydra_job):
    class Failing(Recorder):
        def predict_step(self, batch, batch_idx):
            if batch_idx == 1:
                raise RuntimeError("boom\nsecond line")
            return super().predict_step(batch, batch_idx)

    torch.manual_seed(0)
    with pytest.raises(RuntimeError, match="boom"):
        trainer(OffloadCallback(PREFETCH)).predict(Failing(DecoderLM(**SIZES)), tokens())
    summary = read_json(hydra_job / "job_summary.json")
    assert summary["error"] == "RuntimeError: boom"
    assert summary["stage"] == "predict"


def test_outside_hydra_no_file_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run("fit", module(frozen=True), OffloadCallback(PREFETCH))
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# The constructor and the CPU warning
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ({"prefetch": {"offload_group_size": -2}}, "offload.prefetch.offload_group_size"),
        ({"prefetch": {"offload_group_sise": 2}}, "offload.prefetch.offload_group_sise"),
        (
            OmegaConf.create({"prefetch": {"offload_group_size": 2, "offload_num_in_group": 3}}),
            "offload.prefetch.offload_num_in_group",
        ),
        ({"uva": {"cpu_offload_gb": "four"}}, "offload.uva.cpu_offload_gb"),
        ("prefetch", "offload"),
    ],
)
def test_a_bad_config_fails_in_the_constructor_naming_the_key(config, key):
    with pytest.raises(OffloadConfigError) as caught:
        OffloadCallback(config)
    assert any(problem_key == key for problem_key, _ in caught.value.problems)
    assert str(caught.value).startswith(key)


def test_a_bad_log_every_n_steps_fails_in_the_constructor():
    with pytest.raises(ValueError, match="log_every_n_steps"):
        OffloadCallback(PREFETCH, log_every_n_steps=0)


def test_the_config_may_be_an_offload_config_a_dictconfig_or_a_dict():
    expected = to_offload_config(PREFETCH)
    for given in (OffloadConfig(**PREFETCH), OmegaConf.create(PREFETCH), PREFETCH):
        assert OffloadCallback(given).config == expected


def test_a_none_config_leaves_the_module_alone():
    lit = module()
    callback = OffloadCallback({})
    assert all_equal(run("predict", lit, callback), run("predict", module()))
    assert callback.last_stats is None
    assert "configure_model" not in lit.__dict__


def test_host_memory_is_checked_for_every_device_against_one_reading_before_offloading(
    monkeypatch,
):
    # Under DDP the ranks of a node offload one after another: each must check against what
    # the node had before any of them offloaded, for all of them (the Trainer's devices).
    devices = 3
    monkeypatch.setattr(Trainer, "num_devices", property(lambda self: devices))
    lit = module()
    params = dict(lit.named_parameters())
    planned = plan_offload(lit, PREFETCH).params
    per_process = sum(p.nbytes * (2 if params[p.name].requires_grad else 1) for p in planned)
    events: list[str] = []
    available = [devices * per_process - 1]

    def read_host_memory() -> int:
        events.append("read")
        return available[0]

    real_exchange = lightning_integration._exchange_readings

    def exchange(trainer, reading):
        events.append("exchange")
        return real_exchange(trainer, reading)

    applied: list[dict] = []
    real_apply = lightning_integration.apply_offload

    def apply_offload(*args, **kwargs):
        events.append("apply")
        applied.append(kwargs)
        return real_apply(*args, **kwargs)

    monkeypatch.setattr(offload, "available_host_bytes", read_host_memory)
    monkeypatch.setattr(lightning_integration, "apply_offload", apply_offload)
    monkeypatch.setattr(lightning_integration, "_exchange_readings", exchange)
    refused = trainer(OffloadCallback(PREFETCH))
    with pytest.raises(OffloadError) as error:
        refused.fit(lit, tokens())
    assert f"in each of the {devices} processes on this node" in str(error.value)
    assert f"only {available[0]:,} were available before offloading began" in str(error.value)
    # Read on this rank, exchanged with the others (a barrier), only then applied.
    assert events == ["read", "exchange", "apply"]
    assert applied[-1]["processes_per_node"] == devices
    assert applied[-1]["host_bytes_available"] == available[0]
    assert applied[-1]["training"] is True

    # Outside fit no gradient is made: the weights alone must fit, and they do.
    available[0] = devices * sum(p.nbytes for p in planned)
    assert available[0] < devices * per_process
    callback = OffloadCallback(PREFETCH)
    run("predict", lit, callback)
    assert applied[-1]["training"] is False
    assert callback.last_stats is not None
    assert callback.last_stats.forwards > 0

    available[0] = devices * per_process  # now the three training replicas fit
    run("fit", module(), OffloadCallback(PREFETCH))
    assert applied[-1]["training"] is True


def test_on_the_cpu_it_warns_once_that_offloading_saves_no_memory():
    callback = OffloadCallback(PREFETCH)
    lit = module()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run("validate", lit, callback)
        run("predict", lit, callback)
    messages = [str(w.message) for w in caught if CPU_WARNING in str(w.message)]
    assert len(messages) == 1
    assert issubclass(next(w for w in caught if CPU_WARNING in str(w.message)).category, Warning)
    assert callback.last_stats.forwards > 0  # the mechanism still ran


# --------------------------------------------------------------------------------------------
# Usage routes that need their own process: a Hydra app, LightningCLI, DDP
# --------------------------------------------------------------------------------------------


def run_script(
    cwd: Path, *args: str, timeout: int = 180, check: bool = True
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # also what Lightning gives DDP ranks here
    result = subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture
def apps(tmp_path) -> Path:
    """A copy of the scripts, so runs write their outputs (Hydra dirs, CLI config) there."""
    target = tmp_path / "apps"
    shutil.copytree(APPS, target, ignore=shutil.ignore_patterns("__pycache__", "outputs"))
    return target


@pytest.mark.slow
def test_a_hydra_app_instantiates_the_callback_from_its_callbacks_config(apps):
    result = run_script(apps, "app.py", "offload=prefetch", "hydra.run.dir=out")
    found = re.search(r"predicted 4 batches, offloaded_bytes=(\d+), identical=True", result.stdout)
    assert found, result.stdout
    assert int(found[1]) > 0
    assert "Offload plan: prefetch" in result.stdout + result.stderr


@pytest.mark.slow
def test_lightning_cli_adds_the_callback_from_the_command_line(apps):
    result = run_script(
        apps,
        "cli.py",
        "predict",
        "--trainer.accelerator=cpu",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.callbacks+=hydra_offload.OffloadCallback",
        "--trainer.callbacks.config={prefetch: {offload_group_size: 2}}",
    )
    found = re.search(r"offload prefetch: offloaded_bytes=(\d+) forwards=4", result.stdout)
    assert found, result.stdout
    assert int(found[1]) > 0
    assert "Offload plan: prefetch" in result.stdout + result.stderr
    # The config LightningCLI saved records the offload settings.
    saved = OmegaConf.load(apps / "config.yaml")
    (entry,) = saved.trainer.callbacks
    assert entry.class_path == "hydra_offload.OffloadCallback"
    assert to_offload_config(entry.init_args.config) == to_offload_config(PREFETCH)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> tuple[list[dict], str]:
    """Runs ``ddp.py`` once (2 CPU processes, gloo): the results of rank 0 and rank 1, and
    what both printed."""
    out = tmp_path_factory.mktemp("ddp")
    scripts = out / "apps"
    shutil.copytree(APPS, scripts, ignore=shutil.ignore_patterns("__pycache__", "outputs"))
    result = run_script(scripts, "ddp.py", str(out), timeout=300)
    ranks = [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]
    return ranks, result.stdout + result.stderr


@pytest.fixture
def ddp_results(ddp_run) -> list[dict]:
    return ddp_run[0]


@pytest.mark.slow
def test_ddp_ranks_predict_what_they_and_one_process_predict_without_offload(ddp_results):
    reference = module().eval()
    threads = torch.get_num_threads()
    try:
        seen = []
        for rank in ddp_results:
            # The threads Lightning gave each rank: the same reduction order, the same bits.
            torch.set_num_threads(rank["predict_prefetch"]["threads"])
            batches = rank["predict_prefetch"]["batches"]
            assert all_equal(batches, rank["predict_plain"]["batches"])
            for ids, logits in batches:
                with torch.no_grad():
                    assert torch.equal(logits, reference(ids)[:, -1])
                seen += [tuple(row.tolist()) for row in ids]
    finally:
        torch.set_num_threads(threads)
    (everything,) = tokens().dataset.tensors
    assert sorted(seen) == sorted(tuple(row.tolist()) for row in everything)


@pytest.mark.slow
def test_ddp_fit_with_frozen_offloaded_layers_matches_ddp_fit_without_offload(ddp_results):
    rank0, rank1 = (r["fit_prefetch_frozen"]["params"] for r in ddp_results)
    assert all_equal(rank0, rank1)
    assert all_equal(rank0, ddp_results[0]["fit_plain_frozen"]["params"])
    assert not all_equal(rank0, params_of(module())), "nothing was trained"


@pytest.mark.slow
def test_ddp_ignores_exactly_the_offloaded_parameters_and_forgets_them_afterwards(ddp_results):
    for rank in ddp_results:
        for run_name in ("fit_prefetch_frozen", "predict_prefetch"):
            result = rank[run_name]
            assert result["offloaded"], run_name
            assert result["ignored"] == result["offloaded"], run_name
        assert rank["fit_prefetch_frozen"]["left_ignored"] is False
        assert rank["fit_plain"]["ignored"] == []


@pytest.mark.slow
def test_ddp_fit_with_trainable_offloaded_parameters_trains_them_as_ddp_does(ddp_results):
    # Offloaded parameters are kept out of DDP's gradient sync; the offload averages their
    # gradients and splits their step among the ranks (docs/spec.md §7.4).
    assert [r["fit_uva_mlp"]["error"] for r in ddp_results] == [None, None]
    rank0, rank1 = (r["fit_uva_mlp"]["params"] for r in ddp_results)
    assert all_equal(rank0, rank1)
    assert all_equal(rank0, ddp_results[0]["fit_plain"]["params"])
    assert not all_equal(rank0, params_of(module())), "nothing was trained"


@pytest.mark.slow
def test_under_ddp_both_ranks_check_host_memory_against_the_least_figure_read_before_either(
    ddp_results,
):
    # ddp.py: a node with just enough host memory for both replicas; rank 1 reads it only once
    # rank 0 has offloaded (or after 2 s), and one byte less than rank 0.
    for rank in ddp_results:
        result = rank["predict_host_memory"]
        assert result["error"] is None
        assert result["processes_per_node"] == 2
        assert result["host_bytes_available"] == result["needed"]  # rank 1's, before any offload
        assert result["forwards"] > 0


@pytest.mark.slow
def test_under_ddp_only_rank_zero_logs_the_plan(ddp_run):
    # Three runs offloaded (fit with frozen layers, two predicts); rank 1 prints to the same
    # output.
    _, output = ddp_run
    assert output.count("Offload plan: prefetch") == 3


def test_the_callbacks_warnings_point_at_the_users_line():
    # Not at Lightning's or hydra-offload's frames: the line that started the stage.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(OffloadCallback(PREFETCH)).predict(module(), tokens())  # the user's line
    ours = [w for w in caught if "compute device is the CPU" in str(w.message)]
    assert len(ours) == 1
    assert ours[0].filename == __file__


class MetaInitStrategy(SingleDeviceStrategy):
    """A strategy whose ``configure_model`` context makes tensors on ``meta``, as Lightning's
    GPU strategies make them on the GPU (``with root_device:``), while the compute device is
    the CPU."""

    @contextlib.contextmanager
    def tensor_init_context(self, empty_init: bool | None = None):
        with torch.device("meta"):
            yield


@pytest.mark.parametrize("config", [PREFETCH, UVA], ids=["prefetch", "uva"])
def test_host_memory_made_inside_lightnings_configure_model_context_is_on_the_cpu(config):
    # The callback offloads inside the module's configure_model, which Lightning runs in the
    # strategy's tensor_init_context: the host buffers must not follow that ambient device.
    expected = run("predict", module())
    callback = OffloadCallback(config)
    got = run("predict", module(), callback, strategy=MetaInitStrategy(torch.device("cpu")))
    assert callback.last_stats is not None
    assert callback.last_stats.host_bytes > 0
    assert all_equal(got, expected)


def test_the_callback_pickles_before_and_after_a_stage_as_ddp_spawn_needs():
    # Lightning's ddp_spawn pickles the Trainer, callbacks included, into every process.
    callback = OffloadCallback(PREFETCH)
    expected = run("predict", module())
    copy = pickle.loads(pickle.dumps(callback))
    assert copy.state_key == callback.state_key
    assert all_equal(run("predict", module(), copy), expected)
    again = pickle.loads(pickle.dumps(copy))  # after a stage: a plan shown, stats kept
    assert again.last_stats == copy.last_stats
    assert all_equal(run("predict", module(), again), expected)


def test_an_unpickled_callback_sends_its_hyperparameters_to_a_logger_once(tmp_path):
    # What ddp_spawn's processes get: a callback restored by unpickling, then a stage with a
    # logger (the weak set of loggers it has told is made again, empty).
    copy = pickle.loads(pickle.dumps(OffloadCallback(PREFETCH)))

    logger = HyperparamsRecorder(tmp_path, name="logs", version=0)
    lit = module(frozen=True)
    t = trainer(copy, logger=logger)
    t.fit(lit, tokens(), tokens(samples=4, seed=1))
    t.test(lit, tokens())
    assert [p for p in logger.sent if "offload" in p] == [copy.hparams]


def test_a_hydra_config_set_without_a_job_writes_nothing_and_runs(tmp_path, monkeypatch):
    # Tests of Hydra apps (lightning-hydra-template's among them) set Hydra's config from a
    # composed one, whose runtime.output_dir is missing: there is no job folder to write to.
    monkeypatch.chdir(tmp_path)
    conf = Path(__file__).parent / "hydra_lightning_app" / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("config", overrides=["offload=prefetch"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    try:
        callback = OffloadCallback(cfg.offload)
        losses = run("fit", module(), callback)
    finally:
        HydraConfig.instance().cfg = None
    assert losses["train"]
    assert callback.last_stats is not None
    assert list(tmp_path.iterdir()) == []


def test_a_plan_warning_is_given_once_for_the_fit_and_the_stages_after_it():
    # The plan is shown once per fit; its warnings (here: it saves under 5% of the weights)
    # are not repeated by the validation and the test that plan the same module again.
    config = {"prefetch": {"offload_group_size": 2, "offload_params": ["input_layernorm"]}}
    callback = OffloadCallback(config)
    lit = module()
    t = trainer(callback)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(lit, tokens(), tokens(samples=4, seed=1))
        t.test(lit, tokens())
    plan_warnings = [w for w in caught if issubclass(w.category, OffloadPlanWarning)]
    assert len(plan_warnings) == 1, [str(w.message) for w in plan_warnings]
    assert "saves" in str(plan_warnings[0].message)
    assert plan_warnings[0].filename == __file__  # still at the user's line


def test_in_a_process_a_launcher_started_the_cpu_notice_is_logged_not_pointed_at_its_bootstrap():
    """Under ddp_spawn no frame of the user's is on the stack (the bottom is
    multiprocessing's bootstrap): the notice goes to the fallback (the callback's log) rather
    than to a warning attributed to the standard library. Here a thread whose only frames
    are the standard library's stands in for the spawned process."""
    logged: list[str] = []
    caught: list[warnings.WarningMessage] = []
    call = functools.partial(warn_at_caller, "the notice", UserWarning, fallback=logged.append)
    bootstrap = compile("call()", multiprocessing.process.__file__, "exec")

    def in_thread() -> None:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            thread = threading.Thread(target=exec, args=(bootstrap, {"call": call}))
            thread.start()
            thread.join()
        caught.extend(seen)

    in_thread()
    assert logged == ["the notice"]
    assert caught == []
    # From the user's own code it stays a warning pointing at the user's line.
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        warn_at_caller("the notice", UserWarning, fallback=logged.append)  # the user's line
    assert [w.filename for w in seen] == [__file__]
    assert logged == ["the notice"]
