"""A training entry point shaped like lightning-hydra-template's ``src/train.py``.

Lightning is imported before Hydra sets up logging, so Lightning's own logger keeps its
handler and does not reach the job log (``train.log``); the app logs through ``logging``;
it fits, then tests the checkpoint the fit saved; it sends its composed config, interpolations
unresolved, to the loggers as hyperparameters; and it returns the test loss.

    python train.py offload=prefetch
    python train.py -m offload=none,prefetch          # sweep_summary.* in the sweep dir
"""

from __future__ import annotations

import logging

import hydra
from hydra.utils import instantiate
from lightning.pytorch import Trainer
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    log.info("instantiating the model, data, callbacks and logger")
    model = instantiate(cfg.model)
    callbacks = [instantiate(node) for node in cfg.callbacks.values()]
    logger = instantiate(cfg.logger)
    trainer = Trainer(**cfg.trainer, callbacks=callbacks, logger=logger)
    logger.log_hyperparams({"callbacks": OmegaConf.to_container(cfg.callbacks)})
    log.info("fitting")
    trainer.fit(model, instantiate(cfg.data, seed=0), instantiate(cfg.data, seed=1))
    log.info("testing the checkpoint %s", trainer.checkpoint_callback.best_model_path)
    trainer.test(model, instantiate(cfg.data, seed=2), ckpt_path="best")
    return float(trainer.callback_metrics["test_loss"])


if __name__ == "__main__":
    main()
