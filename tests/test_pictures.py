"""The plan's picture, ``offload_plan.png`` (:mod:`hydra_offload.pictures`): what the figure
shows for each backend (docs/spec.md §8.6), and where the job and the Lightning callback put it
and log it (docs/spec.md §9.3)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.loggers import CSVLogger, Logger

from hydra_offload import OffloadCallback, get_offload_handle, plan_offload
from hydra_offload._format import format_bytes
from hydra_offload.integrations.lightning import PLAN_FILE, PLAN_IMAGE_TAG, TIMELINE_IMAGE_TAG
from hydra_offload.models import DecoderLM, LitDecoderLM, random_tokens
from hydra_offload.pictures import (
    DEVICE_COLOR,
    HOST_COLOR,
    PLAN_PICTURE,
    TIMELINE_PICTURE,
    layer_cells,
    plan_figure,
    save_plan_picture,
)

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"
SIZES = {"num_layers": 4, "hidden_size": 32, "num_heads": 4, "intermediate_size": 64,
         "vocab_size": 64}  # fmt: skip


def short(n: int) -> str:
    return format_bytes(n).split(" (")[0]


def texts(figure) -> list[str]:
    return [t.get_text() for t in figure.axes[0].texts]


def meta_decoder(**sizes: int) -> DecoderLM:
    with torch.device("meta"):
        return DecoderLM(**sizes)


class TwoStacks(torch.nn.Module):
    """An encoder and a decoder, each a list of identical blocks."""

    def __init__(self, encoder: int, decoder: int) -> None:
        super().__init__()
        self.encoder = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(encoder))
        self.decoder = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(decoder))


# ------------------------------------------------------------------------------ the figure


def test_a_prefetch_plan_shows_each_layer_where_it_lives_and_the_ring_s_slots():
    settings = {"offload_group_size": 4, "offload_num_in_group": 2, "offload_prefetch_step": 2}
    plan = plan_offload(meta_decoder(num_layers=8), {"prefetch": settings})
    figure = plan_figure(plan)
    # One cell per layer, in stack order; layers 2, 3, 6, 7 in host memory.
    cells = layer_cells(figure)
    assert len(cells) == 8
    assert [c.get_x() for c in cells] == list(range(8))
    host = layer_cells(figure, HOST_COLOR)
    assert sorted(int(c.get_x()) for c in host) == [2, 3, 6, 7]
    assert len(layer_cells(figure, DEVICE_COLOR)) == 4
    # Two slots (offload_prefetch_step=2): layers 2 and 6 take turns in one, 3 and 7 in the
    # other; each offloaded layer has a stripe in its slot's colour.
    slots = layer_cells(figure, gid="slot")
    stripes = layer_cells(figure, gid="slot-stripe")
    assert len(slots) == 2
    assert len(stripes) == 4
    colour = {int(s.get_x()): s.get_facecolor() for s in stripes}
    assert colour[2] == colour[6] == slots[0].get_facecolor()
    assert colour[3] == colour[7] == slots[1].get_facecolor() != colour[2]
    words = texts(figure)
    half = short(plan.pool_bytes // 2)
    assert f"slot 0: {half}  ·  holds layer 2 first" in words
    assert f"slot 1: {half}  ·  holds layer 3 first" in words
    assert "layers 2, 6" in words
    assert "layers 3, 7" in words
    # The bytes: offloaded, device pool, device saved; the title has backend and hash.
    header = words[0]
    assert f"in host memory {short(plan.offloaded_bytes)}" in header
    assert f"device buffer pool {short(plan.pool_bytes)}" in header
    assert f"device saved {short(plan.device_bytes_saved)}" in header
    title = figure.axes[0].get_title(loc="left")
    assert title == f"Offload plan: prefetch  (config {plan.config_hash[:12]})"
    assert any(w.startswith("layer stack 'layers': 4 of 8 layers offloaded (2, 3, 6, 7)")
               for w in words)  # fmt: skip


def test_a_large_stack_wraps_into_rows_and_stays_readable():
    plan = plan_offload(
        meta_decoder(num_layers=80, hidden_size=64, num_heads=4, intermediate_size=128),
        {"prefetch": {"offload_group_size": 2, "offload_prefetch_step": 3}},
    )
    figure = plan_figure(plan)
    cells = layer_cells(figure)
    assert len(cells) == 80
    assert len(layer_cells(figure, HOST_COLOR)) == 40
    assert len({c.get_y() for c in cells}) == 2  # two rows of 40
    assert max(c.get_x() for c in cells) == 39
    assert len(layer_cells(figure, gid="slot")) == 3
    # Each layer's index is written in its cell; long index lists are cut.
    words = texts(figure)
    assert {str(i) for i in range(80)} <= set(words)
    assert "layers 1, 7, 13, 19, 25, ... (14 layers)" in words
    width, height = figure.get_size_inches()
    assert width == 12
    assert height < 6


def test_with_offload_params_the_picture_names_the_offloaded_parameters():
    plan = plan_offload(
        meta_decoder(num_layers=4),
        {"prefetch": {"offload_group_size": 2, "offload_params": ["mlp"]}},
    )
    words = texts(plan_figure(plan))
    assert (
        "in host memory, of each offloaded layer: mlp.gate_proj.weight, mlp.up_proj.weight, "
        "mlp.down_proj.weight"
    ) in words


def test_several_stacks_each_get_their_row_of_layers_and_their_slots():
    plan = plan_offload(
        TwoStacks(4, 6),
        {"layers": ["encoder", "decoder"], "prefetch": {"offload_group_size": 2}},
    )
    figure = plan_figure(plan)
    assert len(layer_cells(figure)) == 10
    assert len(layer_cells(figure, HOST_COLOR)) == 2 + 3
    assert len(layer_cells(figure, gid="slot")) == 2  # one per stack (step 1)
    words = texts(figure)
    assert any(w.startswith("layer stack 'encoder': 2 of 4 layers offloaded") for w in words)
    assert any(w.startswith("layer stack 'decoder': 3 of 6 layers offloaded") for w in words)
    # The rows of the two stacks do not overlap.
    encoder, decoder = layer_cells(figure)[:4], layer_cells(figure)[4:]
    assert max(c.get_y() for c in encoder) < min(c.get_y() for c in decoder)


def test_a_uva_plan_shows_the_offloaded_parameters_by_module_and_the_budget():
    model = meta_decoder(num_layers=8)
    plan = plan_offload(model, {"uva": {"cpu_offload_gb": 0.01}})
    figure = plan_figure(plan)
    parts = layer_cells(figure, gid="params")
    host = [p for p in parts if p.get_facecolor() == layer_cells(figure, HOST_COLOR, "params")[0]
            .get_facecolor()]  # fmt: skip
    device = layer_cells(figure, DEVICE_COLOR, "params")
    assert len(device) == 1
    # embed_tokens and layers 0-3 (the budget ends inside layer 3): one part each.
    assert len(host) == 5
    total_width = sum(p.get_width() for p in parts)
    host_width = sum(p.get_width() for p in host)
    assert host_width / total_width == pytest.approx(plan.offloaded_bytes / plan.total_param_bytes)
    words = texts(figure)
    assert f"budget {short(plan.budget_bytes)}" in words
    assert f"in host memory: {short(plan.offloaded_bytes)} in embed_tokens, layers.0-3" in words
    assert f"on the device: {short(plan.total_param_bytes - plan.offloaded_bytes)}" in words
    assert "budget (cpu_offload_gb)" in words[0]
    assert figure.axes[0].get_title(loc="left").startswith("Offload plan: uva")


def test_a_plan_without_offload_says_nothing_is_offloaded():
    plan = plan_offload(meta_decoder(num_layers=2), {})
    figure = plan_figure(plan)
    assert layer_cells(figure, HOST_COLOR, "params") == []
    assert len(layer_cells(figure, DEVICE_COLOR, "params")) == 1
    words = texts(figure)
    assert "nothing is offloaded: every parameter stays on the device" in words
    assert f"on the device: {short(plan.total_param_bytes)}" in words
    assert figure.axes[0].get_title(loc="left").startswith("Offload plan: none")


def test_the_picture_is_a_png_and_leaves_matplotlib_s_global_state_alone(tmp_path):
    # In a fresh process: importing the module imports no matplotlib, and drawing uses its own
    # Agg canvas, not pyplot (no backend switched, no figure left open).
    code = (
        "import sys, torch\n"
        "from hydra_offload import plan_offload\n"
        "from hydra_offload.pictures import save_plan_picture\n"
        "assert 'matplotlib' not in sys.modules\n"
        "plan = plan_offload(torch.nn.Linear(4, 4), {'uva': {'cpu_offload_gb': 1}})\n"
        f"save_plan_picture(plan, {str(tmp_path / PLAN_PICTURE)!r})\n"
        "print('pyplot' if 'matplotlib.pyplot' in sys.modules else 'no pyplot')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, check=True)  # fmt: skip
    assert result.stdout.strip() == "no pyplot", result.stderr
    assert (tmp_path / PLAN_PICTURE).read_bytes().startswith(PNG)


def test_save_plan_picture_returns_its_path(tmp_path):
    plan = plan_offload(meta_decoder(num_layers=4), {"prefetch": {"offload_group_size": 2}})
    path = save_plan_picture(plan, tmp_path / "plan.png")
    assert path == tmp_path / "plan.png"
    assert path.read_bytes().startswith(PNG)
    with pytest.raises(ValueError, match="layers_per_row"):
        plan_figure(plan, layers_per_row=0)


# ------------------------------------------------------------------------------ run.py


def run_py(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *args, f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path,
        env={**os.environ, "COLUMNS": "160"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_run_py_leaves_the_plan_picture_in_its_output_dir(tmp_path):
    small = ["data.samples=8", "data.seq_len=32", "model.num_layers=4"]
    result = run_py(tmp_path, *small, "offload=prefetch", "offload.prefetch.offload_group_size=2")
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "run"
    assert (run_dir / PLAN_PICTURE).read_bytes().startswith(PNG)
    assert f"plan picture: {run_dir / PLAN_PICTURE}" in result.stdout
    assert (run_dir / PLAN_FILE).exists()
    assert (run_dir / "job_summary.json").exists()


def test_a_dry_run_leaves_the_plan_picture_too(tmp_path):
    result = run_py(tmp_path, "+dry_run=true", "offload=prefetch")
    assert result.returncode == 0, result.stderr
    picture = tmp_path / "run" / PLAN_PICTURE
    assert f"plan picture: {picture}" in result.stdout
    assert picture.read_bytes().startswith(PNG)


# ------------------------------------------------------------------------------ the callback

PREFETCH = {"prefetch": {"offload_group_size": 2}}


def trainer_with(callback: OffloadCallback, logger: Any, steps: int) -> Trainer:
    return Trainer(accelerator="cpu", devices=1, logger=logger, callbacks=[callback],
                   enable_progress_bar=False, enable_model_summary=False,
                   enable_checkpointing=False, limit_predict_batches=steps, max_steps=steps,
                   limit_val_batches=0, log_every_n_steps=1)  # fmt: skip


def predict(callback: OffloadCallback, logger: Any, steps: int = 1, module: Any = None) -> Trainer:
    torch.manual_seed(0)
    trainer = trainer_with(callback, logger, steps)
    data = random_tokens(vocab_size=64, seq_len=9, samples=2 * steps, batch_size=2, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the CPU notice
        trainer.predict(module or LitDecoderLM(DecoderLM(**SIZES)), data)
    return trainer


def fit(callback: OffloadCallback, logger: Any, steps: int = 3) -> Trainer:
    torch.manual_seed(0)
    trainer = trainer_with(callback, logger, steps)
    data = random_tokens(vocab_size=64, seq_len=9, samples=2 * steps, batch_size=2, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the CPU notice, the loader's workers
        trainer.fit(LitDecoderLM(DecoderLM(**SIZES)), data)
    return trainer


def test_the_callback_logs_the_picture_to_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    predict(OffloadCallback(PREFETCH), logger)
    logger.experiment.flush()
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert PLAN_IMAGE_TAG in events.Tags()["images"]
    (image,) = events.Images(PLAN_IMAGE_TAG)
    assert image.width == 1200
    assert image.height > 100
    assert image.encoded_image_string.startswith(PNG)


class StandInWandbLogger(Logger):
    """A stand-in for W&B's ``WandbLogger`` (not installed here): records ``log_image``."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[tuple[str, list[Any], int | None]] = []

    name = "stand-in-wandb"
    version = "0"

    def log_image(self, key: str, images: list[Any], step: int | None = None) -> None:
        self.images.append((key, images, step))

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


class StandInMlflowClient:
    """A stand-in for MLflow's ``MlflowClient``: records ``log_figure``."""

    def __init__(self) -> None:
        self.figures: list[tuple[str, Any, str]] = []

    def log_figure(self, run_id: str, figure: Any, artifact_file: str) -> None:
        self.figures.append((run_id, figure, artifact_file))


class StandInMlflowLogger(StandInWandbLogger):
    """A stand-in for Lightning's ``MLFlowLogger`` (mlflow is not installed here): its
    ``experiment`` is a client with ``log_figure``, and it has a ``run_id``."""

    log_image = None  # type: ignore[assignment]  # MLFlowLogger has none
    run_id = "run-1"

    def __init__(self) -> None:
        super().__init__()
        self.client = StandInMlflowClient()

    @property
    def experiment(self) -> StandInMlflowClient:
        return self.client


def test_the_callback_logs_the_picture_to_wandb_and_mlflow_and_skips_csv(tmp_path, caplog):
    wandb, mlflow = StandInWandbLogger(), StandInMlflowLogger()
    csv = CSVLogger(tmp_path)
    with caplog.at_level(logging.WARNING, logger="hydra_offload.integrations.lightning"):
        predict(OffloadCallback(PREFETCH), [csv, wandb, mlflow])
    ((key, (pixels,), step),) = wandb.images
    assert key == PLAN_IMAGE_TAG
    assert step == 0
    assert pixels.dtype.name == "uint8"
    assert pixels.shape[2] == 3
    assert pixels.shape[1] == 1200
    ((run_id, figure, artifact),) = mlflow.client.figures
    assert (run_id, artifact) == ("run-1", PLAN_PICTURE)
    assert len(layer_cells(figure, HOST_COLOR)) == 2  # layers 1 and 3
    assert "could not log" not in caplog.text  # the CSVLogger is skipped silently


def test_a_logger_that_fails_to_take_the_picture_warns_and_the_stage_goes_on(caplog):
    class Broken(StandInWandbLogger):
        def log_image(self, key: str, images: list[Any], step: int | None = None) -> None:
            raise RuntimeError("no space left")

    with caplog.at_level(logging.WARNING, logger="hydra_offload.integrations.lightning"):
        predict(OffloadCallback(PREFETCH), Broken())
    assert "could not log the plan's picture to Broken: RuntimeError: no space left" in caplog.text


def test_in_a_hydra_job_the_callback_writes_the_picture_next_to_the_plan(hydra_job):
    predict(OffloadCallback(PREFETCH), False)
    assert (hydra_job / PLAN_FILE).read_text().startswith("Offload plan: prefetch")
    assert (hydra_job / PLAN_PICTURE).read_bytes().startswith(PNG)


def test_without_offload_the_callback_draws_no_picture(hydra_job):
    wandb = StandInWandbLogger()
    predict(OffloadCallback({}), wandb)
    assert not (hydra_job / PLAN_PICTURE).exists()
    assert wandb.images == []


# ------------------------------------------------------------------ the callback's timeline


def test_the_callback_draws_the_timeline_of_the_fit_s_second_step(hydra_job):
    wandb, mlflow = StandInWandbLogger(), StandInMlflowLogger()
    fit(OffloadCallback(PREFETCH), [wandb, mlflow], steps=3)
    assert [key for key, _, _ in wandb.images] == [PLAN_IMAGE_TAG, TIMELINE_IMAGE_TAG]
    _, (pixels,), step = wandb.images[1]
    assert step == 2  # the second step (global step 1) is done: its optimizer stepped
    assert pixels.shape[1] == 1200
    (_, _, plan_file), (_, timeline, timeline_file) = mlflow.client.figures
    assert (plan_file, timeline_file) == (PLAN_PICTURE, TIMELINE_PICTURE)
    # Layers 1 and 3 offloaded: each one's forward and backward, and their copies.
    assert len(layer_cells(timeline, gid="compute")) == 2
    assert len(layer_cells(timeline, gid="backward")) == 2
    assert layer_cells(timeline, gid="copy")
    assert timeline.axes[0].get_title(loc="left").startswith("Offload timeline: one training")
    assert (hydra_job / TIMELINE_PICTURE).read_bytes().startswith(PNG)


def test_a_later_stage_logs_its_timeline_but_the_file_keeps_the_fit_s(hydra_job):
    callback, wandb = OffloadCallback(PREFETCH), StandInWandbLogger()
    fit(callback, wandb, steps=3)
    written = (hydra_job / TIMELINE_PICTURE).read_bytes()
    predict(callback, wandb, steps=3)
    assert [key for key, _, _ in wandb.images].count(TIMELINE_IMAGE_TAG) == 2
    assert (hydra_job / TIMELINE_PICTURE).read_bytes() == written


def test_a_predict_job_writes_the_timeline_of_its_second_step(hydra_job):
    mlflow = StandInMlflowLogger()
    predict(OffloadCallback(PREFETCH), mlflow, steps=3)
    (_, timeline, _) = mlflow.client.figures[1]
    assert len(layer_cells(timeline, gid="compute")) == 2
    assert layer_cells(timeline, gid="backward") == []
    assert timeline.axes[0].get_title(loc="left").startswith("Offload timeline: one forward")
    assert (hydra_job / TIMELINE_PICTURE).exists()


@pytest.mark.parametrize(
    ("config", "steps", "timeline_step"),
    [(PREFETCH, 1, 1), (PREFETCH, 3, None), ({"uva": {"cpu_offload_gb": 1}}, 3, 1)],
    ids=["one-step", "turned-off", "uva"],
)
def test_no_timeline_without_its_step_when_turned_off_or_under_uva(
    hydra_job, config, steps, timeline_step
):
    wandb = StandInWandbLogger()
    predict(OffloadCallback(config, timeline_step=timeline_step), wandb, steps=steps)
    assert [key for key, _, _ in wandb.images] == [PLAN_IMAGE_TAG]
    assert not (hydra_job / TIMELINE_PICTURE).exists()
    assert (hydra_job / PLAN_PICTURE).exists()


def test_timeline_step_is_checked():
    with pytest.raises(ValueError, match="timeline_step must be >= 0 or None, got -1"):
        OffloadCallback(PREFETCH, timeline_step=-1)


def test_a_stage_that_raises_in_the_traced_step_drops_the_trace(hydra_job):
    class FailsAtStepOne(LitDecoderLM):
        def predict_step(self, batch: Any, batch_idx: int) -> Any:
            if batch_idx == 1:
                raise RuntimeError("bad batch")
            return super().predict_step(batch, batch_idx)

    callback, wandb = OffloadCallback(PREFETCH), StandInWandbLogger()
    module = FailsAtStepOne(DecoderLM(**SIZES))
    with pytest.raises(RuntimeError, match="bad batch"):
        predict(callback, wandb, steps=3, module=module)
    assert callback._tracing is None
    assert callback.handle is None
    assert [key for key, _, _ in wandb.images] == [PLAN_IMAGE_TAG]
    assert not (hydra_job / TIMELINE_PICTURE).exists()
    # The module is whole again and runs without any offload hook recording.
    module(torch.randint(0, 64, (2, 8)))


def test_the_callback_logs_the_timeline_to_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    predict(OffloadCallback(PREFETCH), logger, steps=2)
    logger.experiment.flush()
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert {PLAN_IMAGE_TAG, TIMELINE_IMAGE_TAG} <= set(events.Tags()["images"])
    (image,) = events.Images(TIMELINE_IMAGE_TAG)
    assert image.encoded_image_string.startswith(PNG)


class TraceSeen(Callback):
    """Records, at each predict batch's start (after the OffloadCallback's), whether the
    offload's rings are being traced."""

    def __init__(self) -> None:
        self.traced: list[bool] = []

    def on_predict_batch_start(self, trainer: Trainer, pl_module: Any, *args: Any) -> None:
        rings = get_offload_handle(pl_module)._installed.rings
        self.traced.append(any(ring.trace is not None for ring in rings))


@pytest.mark.parametrize("where", ["nowhere", "csv-only", "tensorboard"])
def test_a_step_is_traced_only_when_its_picture_has_somewhere_to_go(tmp_path, where):
    callback, seen = OffloadCallback(PREFETCH), TraceSeen()
    logger: Any = {"nowhere": False, "csv-only": CSVLogger(tmp_path),
                   "tensorboard": None}[where]  # fmt: skip
    if where == "tensorboard":
        pytest.importorskip("tensorboard")
        from lightning.pytorch.loggers import TensorBoardLogger

        logger = TensorBoardLogger(tmp_path)
    trainer = trainer_with(callback, logger, steps=3)
    trainer.callbacks.append(seen)
    data = random_tokens(vocab_size=64, seq_len=9, samples=6, batch_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the CPU notice
        trainer.predict(LitDecoderLM(DecoderLM(**SIZES)), data)
    assert seen.traced == [False, where == "tensorboard", False]
