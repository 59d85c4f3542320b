"""The app's model: four linear layers in a ``ModuleList`` (the layer stack to offload)."""

from typing import Any

import torch
from lightning.pytorch import LightningModule


class Stack(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(4))

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (x,) = batch
        for layer in self.layers:
            x = layer(x)
        return x
