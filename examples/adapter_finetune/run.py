"""Fine-tune LoRA adapters on a causal LM whose frozen base weights are offloaded.

    python examples/adapter_finetune/run.py
    python examples/adapter_finetune/run.py trainer.max_steps=10 adapter.rank=4

A tiny Llama is built from its config with random weights (no download), every weight is
frozen, and low-rank adapters (LoRA) are added beside ``q_proj`` and ``v_proj`` of every
decoder layer: ``q_proj(x) = W x + (alpha / rank) B A x`` with ``W`` frozen, ``A`` and ``B``
trained, ``B`` zero at first (so training starts from the base model exactly).

``trainer.fit`` trains the adapters for ``trainer.max_steps`` steps on a small fixed set of
random sequences (which they can fit, so the loss falls) under the :class:`OffloadCallback`
with ``offload=prefetch``: every second decoder layer keeps its frozen base weights in host
memory and they are copied to the device one offloaded layer ahead of use;
``offload.prefetch.offload_params`` names the base weights only, so the adapters stay on the
device. The backward pass runs through the offloaded layers in reverse order, each one's
weights copied back into the device slots one offloaded layer ahead of its backward.

It prints the adapters' size, the offload plan (which parameters are in host memory; none of
them trainable), the training loss at the first and the last step, and the callback's
statistics (``callback.last_stats``), and writes the same figures to ``results.json`` in the
Hydra output directory.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch import LightningModule, Trainer
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from transformers import AutoModelForCausalLM

from hydra_offload import OffloadCallback


class LoRALinear(nn.Module):
    """``base_layer(x) + (alpha / rank) * lora_b(lora_a(x))``, with ``base_layer`` frozen.

    ``lora_b`` starts at zero, so the wrapped layer computes exactly what ``base_layer`` did
    until the first optimizer step.
    """

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base_layer = base_layer.requires_grad_(False)
        self.lora_a = nn.Linear(base_layer.in_features, rank, bias=False)
        self.lora_b = nn.Linear(rank, base_layer.out_features, bias=False)
        nn.init.zeros_(self.lora_b.weight)
        self.scaling = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.scaling * self.lora_b(self.lora_a(x))


def add_lora(model: nn.Module, targets: list[str], rank: int, alpha: float) -> int:
    """Freeze ``model`` and wrap each ``nn.Linear`` whose name ends in one of ``targets``
    with a :class:`LoRALinear`; returns how many were wrapped."""
    model.requires_grad_(False)
    chosen = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets
    ]
    for name, module in chosen:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, LoRALinear(module, rank, alpha))
    return len(chosen)


class AdapterFinetune(LightningModule):
    """Next-token loss of a Hugging Face causal LM; AdamW on the parameters that require
    grad (the adapters). Keeps every step's loss in :attr:`losses`."""

    def __init__(self, model: nn.Module, lr: float) -> None:
        super().__init__()
        self.model = model
        self.lr = lr
        self.losses: list[float] = []

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The next-token loss (labels are the inputs; the model shifts them)."""
        return self.model(input_ids=input_ids, labels=input_ids).loss

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        (ids,) = batch
        loss = self(ids)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)


def random_sequences(cfg: DictConfig, vocab_size: int) -> DataLoader:
    generator = torch.Generator().manual_seed(cfg.seed)
    ids = torch.randint(0, vocab_size, (cfg.samples, cfg.seq_len), generator=generator)
    return DataLoader(TensorDataset(ids), batch_size=cfg.batch_size)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> dict[str, Any]:
    torch.manual_seed(cfg.data.seed)
    model = AutoModelForCausalLM.from_config(instantiate(cfg.model))
    wrapped = add_lora(model, list(cfg.adapter.targets), cfg.adapter.rank, cfg.adapter.alpha)
    module = AdapterFinetune(model, lr=cfg.lr)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    total = sum(p.numel() for p in module.parameters())
    n_trainable = sum(p.numel() for n, p in module.named_parameters() if n in trainable)
    print(
        f"adapters: {wrapped} LoRA layers (rank {cfg.adapter.rank}) on "
        f"{', '.join(cfg.adapter.targets)}: {n_trainable:,} trainable of {total:,} parameters"
    )

    offload = OffloadCallback(cfg.offload)  # validates; errors name the offending key
    trainer = Trainer(**OmegaConf.to_container(cfg.trainer, resolve=True), callbacks=[offload])
    trainer.fit(module, random_sequences(cfg.data, cfg.model.vocab_size))

    plan, stats = offload.last_plan, offload.last_stats
    if plan is None or stats is None:
        raise SystemExit("error: nothing was offloaded; this example needs offload=prefetch")
    trainable_offloaded = [n for n in plan.offloaded_params if n in trainable]
    print(
        f"offloaded: {len(plan.offloaded_params)} parameters "
        f"({plan.offloaded_bytes:,} bytes) of layers "
        f"{'; '.join(f'{s.path} {list(s.offloaded_layers)}' for s in plan.stacks)}; "
        f"trainable parameters offloaded: {len(trainable_offloaded)}"
    )
    print(f"loss: start {module.losses[0]:.4f} -> end {module.losses[-1]:.4f}")
    print(f"steps: {len(module.losses)}")
    print("offload stats (callback.last_stats):")
    for key, value in dataclasses.asdict(stats).items():
        print(f"  {key}: {value}")

    results = {
        "loss_start": module.losses[0],
        "loss_end": module.losses[-1],
        "steps": len(module.losses),
        "trainable_params": n_trainable,
        "offloaded_params": list(plan.offloaded_params),
        "trainable_offloaded": trainable_offloaded,
        "stats": dataclasses.asdict(stats),
    }
    out = Path(HydraConfig.get().runtime.output_dir) / "results.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"results: {out}")
    return results


if __name__ == "__main__":
    main()
