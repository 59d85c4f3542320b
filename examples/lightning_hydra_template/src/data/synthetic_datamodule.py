"""Synthetic classification data: Gaussian features, labelled by a fixed random linear map.

Everything comes from one seeded generator, so every run (and ``eval.py``) sees the same
train, validation and test sets.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, TensorDataset


class SyntheticDataModule(LightningDataModule):
    """Train, validation and test sets of ``(features, label)`` pairs.

    Args:
        num_features: features per sample.
        num_classes: number of labels.
        splits: samples in the train, validation and test sets.
        batch_size: samples per batch.
        seed: seed of the generator that draws the labelling map and the samples.
        num_workers: ``DataLoader`` worker processes.
        pin_memory: ``DataLoader`` page-locked batches.
    """

    def __init__(
        self,
        num_features: int = 16,
        num_classes: int = 4,
        splits: Sequence[int] = (256, 64, 64),
        batch_size: int = 32,
        seed: int = 0,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.sets: dict[str, TensorDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.sets:
            return
        hp = self.hparams
        generator = torch.Generator().manual_seed(hp.seed)
        labelling = torch.randn(hp.num_features, hp.num_classes, generator=generator)
        features = torch.randn(sum(hp.splits), hp.num_features, generator=generator)
        labels = (features @ labelling).argmax(dim=-1)
        for name, part, part_labels in zip(
            ("train", "val", "test"),
            features.split(list(hp.splits)),
            labels.split(list(hp.splits)),
            strict=True,
        ):
            self.sets[name] = TensorDataset(part, part_labels)

    def _loader(self, name: str, shuffle: bool = False) -> DataLoader:
        return DataLoader(
            self.sets[name],
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            num_workers=self.hparams.num_workers,
            pin_memory=self.hparams.pin_memory,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
