"""Batch inference with ``trainer.predict`` while half the decoder layers live in host memory.

    python examples/batch_inference/run.py
    python examples/batch_inference/run.py data.batches=20 offload.prefetch.offload_group_size=3

A tiny Qwen2 causal LM is built from its config with random weights (no download) and
``trainer.predict`` runs it over ``data.batches`` batches of random prompts, returning the
greedy next token of each prompt. The :class:`OffloadCallback`, with ``offload=prefetch``,
keeps every second decoder layer in host memory; a static device buffer pool holds one
offloaded layer's weights, and each offloaded layer is copied into it one offloaded layer
ahead of use, so on an accelerator the copies overlap the compute of the layer before.

It prints the offload plan, the number of batches and their shape, the time per batch
(median after the first, warm-up, batch) and the callback's statistics
(``callback.last_stats``): the bytes copied host-to-device per forward (each offloaded layer
once) and the number of stalls (loads made on demand because a layer's weights were not
there in time: 0 when the layers run in the planned order). It writes the same figures to
``results.json`` in the Hydra output directory.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
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
from hydra_offload.integrations.job import StepTimer


class NextToken(LightningModule):
    """Greedy next token of each prompt of a batch, with any Hugging Face causal LM."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The logits of the last position of each prompt."""
        return self.model(input_ids=input_ids).logits[:, -1]

    def predict_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        (ids,) = batch
        return self(ids).argmax(dim=-1)


def random_prompts(cfg: DictConfig, vocab_size: int) -> DataLoader:
    generator = torch.Generator().manual_seed(cfg.seed)
    shape = (cfg.batches * cfg.batch_size, cfg.seq_len)
    ids = torch.randint(0, vocab_size, shape, generator=generator)
    return DataLoader(TensorDataset(ids), batch_size=cfg.batch_size)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> dict[str, Any]:
    torch.manual_seed(cfg.data.seed)
    model = AutoModelForCausalLM.from_config(instantiate(cfg.model)).eval()
    offload = OffloadCallback(cfg.offload)  # validates; errors name the offending key
    timer = StepTimer()  # per-batch wall time, synchronized with the device
    trainer = Trainer(
        **OmegaConf.to_container(cfg.trainer, resolve=True), callbacks=[offload, timer]
    )
    predictions = trainer.predict(NextToken(model), random_prompts(cfg.data, cfg.model.vocab_size))

    assert predictions is not None  # trainer.predict returns them unless told not to
    tokens = torch.cat(predictions)
    warm = timer.times_ms[1:] or timer.times_ms
    print(
        f"batches: {len(predictions)} of {cfg.data.batch_size} prompts x {cfg.data.seq_len} "
        f"tokens; next tokens of the first prompts: {tokens[:8].tolist()}"
    )
    print(
        f"time per batch: {statistics.median(warm):.1f} ms median "
        f"(first batch, warm-up: {timer.times_ms[0]:.1f} ms)"
    )
    stats = offload.last_stats  # None when nothing was offloaded (offload=none)
    if stats is None:
        print("offload stats: none, nothing was offloaded")
    else:
        print("offload stats (callback.last_stats):")
        for key, value in dataclasses.asdict(stats).items():
            print(f"  {key}: {value}")

    results = {
        "batches": len(predictions),
        "predictions": tokens.numel(),
        "time_per_batch_ms": timer.times_ms,
        "median_ms": statistics.median(warm),
        "stats": dataclasses.asdict(stats) if stats is not None else None,
    }
    out = Path(HydraConfig.get().runtime.output_dir) / "results.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"results: {out}")
    return results


if __name__ == "__main__":
    main()
