"""Evaluation entry point: test a checkpoint that train.py saved.

    python src/eval.py ckpt_path=logs/train/<time>/checkpoints/epoch_1.ckpt
    python src/eval.py ckpt_path=... offload=prefetch     # the test offloaded as well

Unlike a Trainer with no callbacks, this one gets the OffloadCallback (callbacks: offload in
eval.yaml), so `offload=...` applies here as in training. The checkpoint holds the true
weights whatever offload wrote it, so any offload (or none) gives the same test metrics.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]  # as in train.py
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ["PROJECT_ROOT"] = str(ROOT)

from src.utils import build, own_checkpoint  # noqa: E402

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Test the checkpoint ``cfg.ckpt_path``; the metrics."""
    datamodule, model, trainer = build(cfg)

    log.info("testing the checkpoint %s", cfg.ckpt_path)
    trainer.test(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path, **own_checkpoint())
    return {name: float(value) for name, value in trainer.callback_metrics.items()}


@hydra.main(version_base="1.3", config_path="../configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    metrics = evaluate(cfg)
    log.info("metrics: %s", ", ".join(f"{k}={v:.6g}" for k, v in sorted(metrics.items())))


if __name__ == "__main__":
    main()
