"""The embedded decoder as a LightningModule, with random-token data (no download).

Example:
    >>> from hydra_offload.models import DecoderLM, LitDecoderLM, random_tokens
    >>> module = LitDecoderLM(DecoderLM(num_layers=2, hidden_size=32, num_heads=4,
    ...                                 intermediate_size=64, vocab_size=64))
    >>> batch = next(iter(random_tokens(vocab_size=64, seq_len=8, samples=4, batch_size=2)))
    >>> module.training_step(batch, 0).ndim
    0
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["LitDecoderLM", "random_tokens"]


class LitDecoderLM(LightningModule):
    """Next-token prediction with any causal LM that maps ids ``(B, T)`` to logits.

    Args:
        model: the network, e.g. :class:`~hydra_offload.models.DecoderLM`.
        lr: AdamW learning rate (only parameters that require grad are optimized).
    """

    def __init__(self, model: nn.Module, lr: float = 1e-3) -> None:
        super().__init__()
        self.model = model
        self.lr = lr

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)

    def _loss(self, batch: list[torch.Tensor]) -> torch.Tensor:
        (ids,) = batch
        logits = self(ids[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch), prog_bar=True)

    def test_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        self.log("test_loss", self._loss(batch))

    def predict_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        """The logits of the last position: what generation would sample from."""
        (ids,) = batch
        return self(ids)[:, -1]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.lr)


def random_tokens(
    vocab_size: int, seq_len: int, samples: int, batch_size: int, seed: int = 0
) -> DataLoader:
    """A loader of ``samples`` random token sequences, the same for the same seed."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (samples, seq_len), generator=generator)
    return DataLoader(TensorDataset(ids), batch_size=batch_size)
