"""The LightningModule: classification with any network passed in as ``net``.

It stores its arguments, the network included, with ``save_hyperparameters(logger=False)``,
so every checkpoint carries the pickled network and ``ClassifierModule.load_from_checkpoint``
needs no arguments. Checkpoints are written while the offload is active; hydra-offload makes
a pickled offloaded network come out as the plain network with its true weights.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import nn


class ClassifierModule(LightningModule):
    """Cross-entropy classification; logs ``{train,val,test}/loss`` and ``.../acc``.

    Args:
        net: the network, mapping a batch of features to logits.
        optimizer: a partial optimizer (``_partial_: true`` in the config), called with the
            parameters.
        scheduler: ``None``, or a partial LR scheduler called with the optimizer and stepped on
            ``val/loss`` once per epoch.
        compile: ``torch.compile`` the network when a fit starts.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.net = net
        self.criterion = nn.CrossEntropyLoss()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], split: str) -> torch.Tensor:
        features, labels = batch
        logits = self(features)
        loss = self.criterion(logits, labels)
        accuracy = (logits.argmax(dim=-1) == labels).float().mean()
        self.log(f"{split}/loss", loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log(f"{split}/acc", accuracy, on_step=False, on_epoch=True)
        return loss

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> Any:
        return self._evaluate(batch, "train")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def setup(self, stage: str) -> None:
        # Compiled once, for the fit; the test that follows it in train.py reuses the compiled
        # network. The offload is applied after this hook, through the compile wrapper.
        if self.hparams.compile and stage == "fit" and not hasattr(self.net, "_orig_mod"):
            self.net = torch.compile(self.net)

    def configure_optimizers(self) -> Any:
        optimizer = self.hparams.optimizer(params=self.trainer.model.parameters())
        if self.hparams.scheduler is None:
            return optimizer
        scheduler = self.hparams.scheduler(optimizer=optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "monitor": "val/loss", "interval": "epoch"},
        }
