"""An evaluation entry point shaped like lightning-hydra-template's ``src/eval.py``: a Trainer
with no callbacks tests a checkpoint that ``train.py`` wrote.

    python eval.py ckpt_path=outputs/.../checkpoints/last.ckpt
"""

from __future__ import annotations

import logging

import hydra
from hydra.utils import instantiate
from lightning.pytorch import Trainer
from omegaconf import DictConfig

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    trainer = Trainer(**cfg.trainer, logger=False)
    trainer.test(instantiate(cfg.model), instantiate(cfg.data, seed=2), ckpt_path=cfg.ckpt_path)
    log.info("test_loss=%.4f", float(trainer.callback_metrics["test_loss"]))


if __name__ == "__main__":
    main()
