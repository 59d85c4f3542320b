"""Fit under Lightning's DDP strategy with 2 CPU processes (gloo) a model whose offloaded
layers train, with AdamW: each configuration with and without offload.

    python ddp_train.py OUT_DIR memory OPTION       # none | prefetch | uva: 128 MiB of layers
    python ddp_train.py OUT_DIR variants           # small model, one launch for all variants
    python ddp_train.py OUT_DIR fail               # rank 1 raises in its second training step

``memory``: one fit per launch, so that no run inherits what another left in the processes;
every rank writes ``OUT_DIR/memory-<OPTION>-rank<R>.pt`` with its proportional set size
(``Pss``: pages the node's processes share count once for the node, split among them) at the
end of every batch, the trained parameters and the offload's statistics.

``variants``: every (variant, option) in one launch (the small model); rank 0 writes
``OUT_DIR/variants.pt``: the trained parameters of each, and what the checkpoints held.
Variants: ``plain``, ``accumulate`` (2 micro-batches a step), ``clip`` (by norm, small
enough to clip every step), ``clip_value``, ``mixed`` (``16-mixed`` and its scaler),
``mixed_inf`` (the same, an inf in one offloaded gradient at the second step),
``schedule`` (a learning-rate schedule stepped every step), ``slow`` (rank 1 sleeps before
each step, so rank 0 runs ahead), ``resume`` (2 steps, a
checkpoint, then 2 more in a new Trainer from it), ``resume_plain`` (that checkpoint, resumed
without offload) and ``sgd`` (momentum SGD).

``fail``: rank 1 raises in its second training step; ``OUT_DIR/fail.pt`` is the checkpoint
written after the first step, which must be left intact.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path

import torch
from ddp_shared import Memory  # the frozen-layer runs' Pss readings (a module of this folder)
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.plugins import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hydra_offload import OffloadCallback

OPTIONS = {
    "none": None,
    # Every layer offloaded; one layer's slots on the compute device (here the CPU).
    "prefetch": {"prefetch": {"offload_group_size": 1}, "layers": "layers"},
    "uva": {"uva": {"cpu_offload_gb": 1.0, "cpu_offload_params": ["layers"]}},
}
ACCELERATOR = os.environ.get("DDP_TRAIN_ACCELERATOR", "cpu")  # cuda: one GPU a rank, NCCL
QUIET = {
    "logger": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "enable_checkpointing": False,
}


class Stack(LightningModule):
    """A stack of trainable layers (offloaded) and a head (kept by DDP)."""

    def __init__(self, width: int, depth: int, optimizer: str = "adamw") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.head = nn.Linear(width, 4)
        self.optimizer = optimizer
        self.fail_at: int | None = None
        self.slow = False
        self.inf_at: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.head(x)

    def training_step(self, batch, index):
        rank = self.trainer.global_rank
        if self.fail_at is not None and rank == 1 and self.global_step == self.fail_at:
            raise RuntimeError("rank 1 fails on purpose")
        if self.slow and rank == 1:
            time.sleep(0.3)  # rank 0 runs ahead: it must not read a half-stepped weight
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def on_after_backward(self) -> None:
        """At step ``inf_at``, an inf in one offloaded gradient (with the offload, only the
        process that owns it holds it): the scaler must skip the step on every process."""
        grad = self.layers[0].weight.grad
        if self.inf_at == self.global_step and grad is not None:
            grad[0, 0] = float("inf")

    def configure_optimizers(self):
        if self.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        optimizer = torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=0.01)
        if self.optimizer == "adamw+schedule":
            schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.1)
            return {
                "optimizer": optimizer,
                "lr_scheduler": {"scheduler": schedule, "interval": "step"},
            }
        return optimizer


def data(width: int, samples: int = 16) -> DataLoader:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(samples, width, generator=generator)
    y = torch.randn(samples, 4, generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=2)


def trained(module: LightningModule) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in module.named_parameters()}


def fit(
    option: str,
    *,
    width: int,
    depth: int,
    steps: int = 3,
    callbacks: tuple = (),
    module: Stack | None = None,
    ckpt_path: str | None = None,
    **trainer_args,
) -> tuple[Stack, Trainer, OffloadCallback | None]:
    module = module if module is not None else Stack(width, depth)
    if isinstance(trainer_args.get("plugins"), str):
        trainer_args["plugins"] = precision_plugin(trainer_args["plugins"])
    offload = OffloadCallback(OPTIONS[option]) if OPTIONS[option] else None
    trainer = Trainer(
        strategy="ddp", devices=2, accelerator=ACCELERATOR, max_steps=steps,
        callbacks=[*([offload] if offload else []), *callbacks], **{**QUIET, **trainer_args},
    )  # fmt: skip
    trainer.fit(module, data(width), ckpt_path=ckpt_path)
    return module, trainer, offload


def memory(out: Path, option: str) -> None:
    readings = Memory()
    module, _, offload = fit(option, width=1024, depth=32, callbacks=(readings,))
    result = {"params": trained(module), **readings.figures(offload)}
    rank = torch.distributed.get_rank()
    torch.save(result, out / f"memory-{option}-rank{rank}.pt")


SMALL = {"width": 64, "depth": 6}
VARIANTS = {
    "plain": {},
    "accumulate": {"accumulate_grad_batches": 2},
    "clip": {"gradient_clip_val": 0.05},
    "clip_value": {"gradient_clip_val": 1e-3, "gradient_clip_algorithm": "value"},
    "mixed": {"plugins": "16-mixed"},
}


def precision_plugin(name: str) -> list:
    """``16-mixed`` with its gradient scaler, on the CPU too (given as a plugin: Lightning
    would otherwise run ``bf16-mixed`` there, without a scaler)."""
    return [MixedPrecision("16-mixed", ACCELERATOR, scaler=torch.amp.GradScaler(ACCELERATOR))]


def everyones_state(optimizer: torch.optim.Optimizer) -> list[dict]:
    """Each process's optimizer state (gathered on every process), by parameter index."""
    index = {id(p): i for group in optimizer.param_groups for i, p in enumerate(group["params"])}
    mine = {
        index[id(p)]: {k: v.detach().cpu().clone() for k, v in state.items()}
        for p, state in optimizer.state.items()
    }
    gathered: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, mine)
    return gathered


def variants(out: Path) -> None:
    results: dict = {}
    for option in ("none", "prefetch", "uva"):
        for name, args in VARIANTS.items():
            module, trainer, _ = fit(option, **SMALL, **args)
            results[(name, option)] = trained(module)
            if name == "plain":  # every process's optimizer state, once the offload is removed
                results[("state", option)] = everyones_state(trainer.optimizers[0])
        module = Stack(**SMALL, optimizer="adamw+schedule")
        fit(option, **SMALL, module=module)
        results[("schedule", option)] = trained(module)
        module = Stack(**SMALL)
        module.slow = True
        fit(option, **SMALL, module=module)
        results[("slow", option)] = trained(module)
        module = Stack(**SMALL)
        module.inf_at = 1
        fit(option, **SMALL, module=module, plugins="16-mixed")
        results[("mixed_inf", option)] = trained(module)
        module = Stack(**SMALL, optimizer="sgd")
        fit(option, **SMALL, module=module)
        results[("sgd", option)] = trained(module)
        # Resume: 2 steps, a checkpoint, 2 more from it in a new Trainer.
        ckpt = out / f"resume-{option}.ckpt"
        _, trainer, _ = fit(option, **SMALL, steps=2)
        trainer.save_checkpoint(ckpt)
        results[("checkpoint", option)] = torch.load(ckpt, weights_only=False)
        module, _, _ = fit(option, **SMALL, steps=4, ckpt_path=str(ckpt))
        results[("resume", option)] = trained(module)
        if option != "none":  # the offloaded run's checkpoint, resumed without offload
            module, _, _ = fit("none", **SMALL, steps=4, ckpt_path=str(ckpt))
            results[("resume_plain", option)] = trained(module)
    module, _, _ = fit("none", **SMALL, steps=4)
    results[("straight", "none")] = trained(module)
    if torch.distributed.get_rank() == 0:
        torch.save(results, out / "variants.pt")


class SaveAfterFirstStep(Callback):
    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == 1:
            trainer.save_checkpoint(self.path)


def fail(out: Path) -> None:
    module = Stack(**SMALL)
    module.fail_at = 1
    fit("prefetch", **SMALL, module=module, callbacks=(SaveAfterFirstStep(out / "fail.pt"),))


if __name__ == "__main__":
    # The project calls no deprecated API of its own (Lightning's and torch's own calls aside).
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("error", category=category, module=r"hydra_offload(\.|$)")
    out, what = Path(sys.argv[1]), sys.argv[2]
    out.mkdir(parents=True, exist_ok=True)
    if what == "memory":
        memory(out, sys.argv[3])
    elif what == "variants":
        variants(out)
    else:
        fail(out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
