"""A mixture-of-experts model with only its experts in host memory (UVA), under
``trainer.predict``.

    python examples/moe_experts_uva/run.py
    python examples/moe_experts_uva/run.py model.num_local_experts=4 data.batches=2

In an MoE model the experts hold most of the weights but each token uses only a few of them,
so they are the natural part to keep in host memory. A tiny Mixtral is built from its config
with random weights (no download) and ``trainer.predict`` runs it over a few batches of random
prompts under the :class:`OffloadCallback` with ``offload=uva``:
``offload.uva.cpu_offload_params=["@experts"]`` lets only parameters with the name segment
``experts`` be offloaded, and ``cpu_offload_gb`` is large enough to take all of them. On CUDA
each offloaded expert weight becomes a zero-copy device view of page-locked host memory that
the kernels read over the interconnect; attention, the router, the norms and the embeddings
stay on the device.

It prints the plan (also logged by the callback), how many parameters were offloaded and
whether each one's name contains ``.experts.`` and every expert parameter was taken, and the
callback's statistics (``callback.last_stats``); it writes the same figures to
``results.json`` in the Hydra output directory.
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
    module = NextToken(model)
    params = dict(module.named_parameters())
    experts = [name for name in params if ".experts." in name]
    expert_bytes = sum(params[n].nbytes for n in experts)
    total_bytes = sum(p.nbytes for p in params.values())
    print(
        f"model: {len(params)} parameters, {total_bytes:,} bytes; experts: {len(experts)} "
        f"parameters, {expert_bytes:,} bytes ({100 * expert_bytes / total_bytes:.1f}%)"
    )

    offload = OffloadCallback(cfg.offload)  # validates; errors name the offending key
    trainer = Trainer(**OmegaConf.to_container(cfg.trainer, resolve=True), callbacks=[offload])
    predictions = trainer.predict(module, random_prompts(cfg.data, cfg.model.vocab_size))

    plan, stats = offload.last_plan, offload.last_stats
    if plan is None or stats is None:
        raise SystemExit("error: nothing was offloaded; this example needs offload=uva")
    assert predictions is not None  # trainer.predict returns them unless told not to
    offloaded = plan.offloaded_params
    only_experts = all(".experts." in name for name in offloaded)
    all_experts = set(offloaded) == set(experts)
    print(
        f"offloaded: {len(offloaded)} parameters ({plan.offloaded_bytes:,} bytes, budget "
        f"{plan.budget_bytes:,} bytes): {', '.join(offloaded[:2])}, ..."
    )
    print(f"every offloaded name contains '.experts.': {only_experts}")
    print(f"every expert parameter offloaded: {all_experts}")
    print(f"batches: {len(predictions)}")
    print("offload stats (callback.last_stats):")
    for key, value in dataclasses.asdict(stats).items():
        print(f"  {key}: {value}")

    results = {
        "offloaded_params": list(offloaded),
        "expert_params": experts,
        "only_experts": only_experts,
        "all_experts": all_experts,
        "batches": len(predictions),
        "stats": dataclasses.asdict(stats),
    }
    out = Path(HydraConfig.get().runtime.output_dir) / "results.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"results: {out}")
    return results


if __name__ == "__main__":
    main()
