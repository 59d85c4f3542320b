"""Helpers the entry points share: build the datamodule, model, callbacks, loggers and Trainer
from their config nodes, and send the run's settings to the loggers."""

from __future__ import annotations

import inspect
import logging
from typing import Any

import hydra
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def _build_each(node: DictConfig | None, kind: str) -> list[Any]:
    """Instantiate every entry of ``node`` that has a ``_target_``; ``None`` (a config that
    sets ``callbacks: null``, e.g. debug) gives an empty list."""
    if not node:
        log.warning("no %s configured", kind)
        return []
    built = []
    for name, entry in node.items():
        if isinstance(entry, DictConfig) and "_target_" in entry:
            log.info("building %s %s <%s>", kind, name, entry._target_)
            built.append(hydra.utils.instantiate(entry))
    return built


def instantiate_callbacks(node: DictConfig | None) -> list[Callback]:
    return _build_each(node, "callback")


def instantiate_loggers(node: DictConfig | None) -> list[Logger]:
    return _build_each(node, "logger")


def log_hyperparameters(cfg: DictConfig, model: LightningModule, trainer: Trainer) -> None:
    """Send the composed settings (interpolations as written, e.g. ``config: ${offload}``)
    and the model's parameter counts to every logger. The OffloadCallback adds the offload's
    validated settings under ``offload`` itself."""
    settings: dict[str, Any] = {
        key: OmegaConf.to_container(cfg[key], resolve=False) if key in cfg else None
        for key in ("model", "data", "trainer", "callbacks")
    }
    settings["model/params/total"] = sum(p.numel() for p in model.parameters())
    settings["model/params/trainable"] = sum(
        p.numel() for p in model.parameters() if p.requires_grad
    )
    for key in ("task_name", "seed", "ckpt_path"):
        settings[key] = cfg.get(key)
    for logger in trainer.loggers:
        logger.log_hyperparams(settings)


def build(cfg: DictConfig) -> tuple[LightningDataModule, LightningModule, Trainer]:
    """The datamodule, the model and the Trainer (with the callbacks and loggers of ``cfg``),
    the run's settings sent to the loggers."""
    log.info("building the datamodule <%s>", cfg.data._target_)
    datamodule: LightningDataModule = hydra.utils.instantiate(cfg.data)
    log.info("building the model <%s>", cfg.model._target_)
    model: LightningModule = hydra.utils.instantiate(cfg.model)
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    loggers = instantiate_loggers(cfg.get("logger"))
    trainer: Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    if loggers:
        log_hyperparameters(cfg, model, trainer)
    return datamodule, model, trainer


def own_checkpoint() -> dict[str, Any]:
    """Keyword arguments for ``Trainer.fit`` / ``Trainer.test`` with a checkpoint this project
    wrote. Its hyperparameters hold the pickled network (``save_hyperparameters`` with an
    ``nn.Module`` argument), which ``torch.load``'s ``weights_only`` mode, the default since
    torch 2.6, refuses. Lightning takes ``weights_only`` from 2.6 on, when it began leaving
    the default to torch; earlier releases loaded checkpoints in full."""
    if "weights_only" in inspect.signature(Trainer.test).parameters:
        return {"weights_only": False}
    return {}
