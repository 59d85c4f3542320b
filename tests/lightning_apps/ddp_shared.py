"""Predict and fit under Lightning's DDP strategy with 2 CPU processes (gloo), a model whose
frozen layers hold 128 MiB, without offload and with each backend: what the node's processes
hold in host memory while the stage runs.

    python ddp_shared.py OUT_DIR STAGE OPTION   # predict | fit; none | prefetch | uva

One run per launch, so that no run inherits what another left in the processes. Every rank
writes ``OUT_DIR/<STAGE>-<OPTION>-rank<R>.pt``: its proportional set size (``Pss`` of
``/proc/self/smaps_rollup``: pages the node's processes share count once for the node, split
among them) at the end of every batch and the largest; the predictions, or the trained
parameters; and the offload's statistics.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hydra_offload import OffloadCallback
from hydra_offload.runtime.host import proc_bytes

WIDTH, DEPTH = 1024, 32  # 32 layers of 4 MiB (and a bias): 128 MiB of frozen weights
OPTIONS = {
    "none": None,
    # Every layer offloaded; one layer's slots on the compute device (here the CPU).
    "prefetch": {"prefetch": {"offload_group_size": 1}, "layers": "layers"},
    "uva": {"uva": {"cpu_offload_gb": 1.0, "cpu_offload_params": ["layers"]}},
}
QUIET = {
    "logger": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "enable_checkpointing": False,
}


class FrozenStack(LightningModule):
    """A stack of frozen layers and a trainable head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(DEPTH))
        self.layers.requires_grad_(False)
        self.head = nn.Linear(WIDTH, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.head(x)

    def training_step(self, batch, index):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def predict_step(self, batch, index):
        return self(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.head.parameters(), lr=0.1)


def pss_bytes() -> int:
    """This process's proportional set size (``Pss`` of ``/proc/self/smaps_rollup``)."""
    pss = proc_bytes("/proc/self/smaps_rollup", "Pss")
    if pss is None:
        raise RuntimeError("no Pss in /proc/self/smaps_rollup")
    return pss


class Memory(Callback):
    """This process's Pss at the end of every batch of the stage."""

    def __init__(self) -> None:
        self.readings: list[int] = []

    def on_train_batch_end(self, *args) -> None:
        self.readings.append(pss_bytes())

    def on_predict_batch_end(self, *args) -> None:
        self.readings.append(pss_bytes())

    def figures(self, offload: OffloadCallback | None) -> dict:
        """The readings, their largest, and what ``offload`` last said of its host memory."""
        figures: dict = {"pss": self.readings, "pss_max": max(self.readings)}
        if offload is not None and offload.last_stats is not None:
            stats = offload.last_stats
            figures["shared_by"] = stats.shared_by
            figures["host_bytes_shared"] = stats.host_bytes_shared
            figures["offloaded_bytes"] = stats.offloaded_bytes
        return figures


def data() -> DataLoader:
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, WIDTH, generator=generator), torch.randn(16, 4, generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=4)


def run(stage: str, option: str) -> dict:
    module = FrozenStack()
    memory = Memory()
    offload = OffloadCallback(OPTIONS[option]) if OPTIONS[option] else None
    trainer = Trainer(
        strategy="ddp", devices=2, accelerator="cpu", max_steps=3,
        callbacks=[*([offload] if offload else []), memory], **QUIET,
    )  # fmt: skip
    result: dict = {}
    if stage == "fit":
        trainer.fit(module, data())
        result["params"] = {n: p.detach().clone() for n, p in module.named_parameters()}
    else:
        result["predictions"] = trainer.predict(module, data())
    return {**result, **memory.figures(offload)}


if __name__ == "__main__":
    out, stage, option = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    out.mkdir(parents=True, exist_ok=True)
    result = run(stage, option)
    rank = torch.distributed.get_rank()
    torch.save(result, out / f"{stage}-{option}-rank{rank}.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
