"""A LightningCLI app: the offload is added from the command line alone, e.g.

    python cli.py predict --trainer.accelerator=cpu \
        --trainer.callbacks+=hydra_offload.OffloadCallback \
        --trainer.callbacks.config='{prefetch: {offload_group_size: 2}}'

After the subcommand it prints one line per OffloadCallback the Trainer had:
``offload <backend>: offloaded_bytes=<n> forwards=<n>`` (or ``offload: never applied``).
"""

from __future__ import annotations

from common import SIZES, tokens
from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI

from hydra_offload import OffloadCallback
from hydra_offload.models import DecoderLM, LitDecoderLM


class TinyDecoderLM(LitDecoderLM):
    """LitDecoderLM with its network built from plain arguments, which the CLI can set."""

    def __init__(self, num_layers: int = SIZES["num_layers"], lr: float = 1e-3) -> None:
        super().__init__(DecoderLM(**{**SIZES, "num_layers": num_layers}), lr=lr)


class Tokens(LightningDataModule):
    def __init__(self, samples: int = 8, batch_size: int = 2) -> None:
        super().__init__()
        self.samples, self.batch_size = samples, batch_size

    def _loader(self):
        return tokens(samples=self.samples, batch_size=self.batch_size)

    def train_dataloader(self):
        return self._loader()

    def val_dataloader(self):
        return self._loader()

    def test_dataloader(self):
        return self._loader()

    def predict_dataloader(self):
        return self._loader()


def main() -> None:
    cli = LightningCLI(TinyDecoderLM, Tokens, seed_everything_default=0)
    found = [cb for cb in cli.trainer.callbacks if isinstance(cb, OffloadCallback)]
    for callback in found:
        stats = callback.last_stats
        if stats is None:
            print("offload: never applied")
        else:
            print(
                f"offload {stats.backend}: offloaded_bytes={stats.offloaded_bytes} "
                f"forwards={stats.forwards}"
            )
    if not found:
        print("offload: no callback")


if __name__ == "__main__":
    main()
