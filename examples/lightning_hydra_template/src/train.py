"""Training entry point: fit, then test the best checkpoint the fit saved.

    python src/train.py                                   # offload=none, the default
    python src/train.py offload=prefetch                  # every second block in host memory
    python src/train.py offload=uva trainer=gpu           # weights read from host memory
    python src/train.py experiment=offload_prefetch
    python src/train.py -m offload=none,uva,prefetch      # sweep_summary.* in the sweep folder
    python src/train.py model.compile=true offload=prefetch offload.layers=net.blocks
    python src/train.py debug=offload offload=prefetch    # a debug run that keeps the offload
    python src/train.py -m hydra/sweeper=optuna offload=prefetch \
        'offload.prefetch.offload_num_in_group=range(1,4)'    # above 2: failed trials

The `offload` group and the OffloadCallback reach this script only through the configs
(`- offload: none` in train.yaml, callbacks/offload.yaml): nothing here imports hydra-offload.
A bad offload setting stops the job before `main` runs, with one `error:` line and exit
status 2.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from lightning.pytorch import seed_everything
from omegaconf import DictConfig

# Make `src.` importable (the configs' `_target_`s, and the network pickled into checkpoints,
# name it) and point PROJECT_ROOT at this example, without installing it.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ["PROJECT_ROOT"] = str(ROOT)

from src.utils import build, own_checkpoint  # noqa: E402

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit (``cfg.train``), then test the best checkpoint (``cfg.test``); the metrics."""
    if cfg.get("seed") is not None:
        seed_everything(cfg.seed, workers=True)

    datamodule, model, trainer = build(cfg)

    if cfg.get("train"):
        log.info("fitting")
        ckpt_path = cfg.get("ckpt_path")
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, **own_checkpoint())
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}

    if cfg.get("test"):
        checkpoint = trainer.checkpoint_callback
        best = checkpoint.best_model_path if checkpoint is not None else ""
        if not best:
            log.warning("no checkpoint was saved: testing the weights as they are")
        log.info("testing the checkpoint %s", best or "(none)")
        trainer.test(model, datamodule=datamodule, ckpt_path=best or None, **own_checkpoint())
        metrics.update((name, float(value)) for name, value in trainer.callback_metrics.items())
    return metrics


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    log.info("metrics: %s", ", ".join(f"{k}={v:.6g}" for k, v in sorted(metrics.items())))
    # What the job returns to a sweeper that minimizes (Optuna: hydra/sweeper=optuna).
    return metrics.get("test/loss")


if __name__ == "__main__":
    main()
