"""A Hydra + Lightning app that gets its OffloadCallback from the callbacks config.

    python app.py offload=prefetch

Instantiates every entry of ``cfg.callbacks`` with ``hydra.utils.instantiate``, predicts with
and without them, and prints one line:
``predicted <n> batches, offloaded_bytes=<n>, identical=<bool>``.
"""

from __future__ import annotations

import hydra
import torch
from common import tiny_module, tokens
from hydra.utils import instantiate
from lightning.pytorch import Trainer
from omegaconf import DictConfig

from hydra_offload import OffloadCallback


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    callbacks = [instantiate(node) for node in cfg.callbacks.values()]
    data = tokens(**cfg.data)
    expected = Trainer(**cfg.trainer).predict(tiny_module(), data)
    predicted = Trainer(**cfg.trainer, callbacks=callbacks).predict(tiny_module(), data)
    offload = next(cb for cb in callbacks if isinstance(cb, OffloadCallback))
    stats = offload.last_stats
    identical = len(predicted) == len(expected) and all(
        torch.equal(a, b) for a, b in zip(predicted, expected, strict=True)
    )
    print(
        f"predicted {len(predicted)} batches, "
        f"offloaded_bytes={stats.offloaded_bytes if stats else 0}, identical={identical}"
    )


if __name__ == "__main__":
    main()
