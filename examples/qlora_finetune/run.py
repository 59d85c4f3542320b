"""Fine-tune LoRA adapters (PEFT) on a quantized causal LM whose frozen base is offloaded.

    python examples/qlora_finetune/run.py
    python examples/qlora_finetune/run.py quantization.scheme=int8 trainer.max_steps=10
    python examples/qlora_finetune/run.py quantization.scheme=torchao-int8 adapter.rank=4

QLoRA-style: a tiny Llama is built from its config with random weights (no download), the
``nn.Linear`` layers of its decoder layers (not ``lm_head``, not the embeddings) are quantized
by ``quantization.scheme``, and PEFT adds LoRA adapters beside ``q_proj`` and ``v_proj``
(``peft.LoraConfig`` + ``get_peft_model``, which freezes everything else):

- ``nf4`` (default): bitsandbytes ``Linear4bit``, 4-bit NormalFloat with double quantization
  (the quantization constants quantized too), computing in float32;
- ``int8``: bitsandbytes ``Linear8bitLt(has_fp16_weights=False, threshold=0.0)``, int8
  weights with one float32 scale per output row;
- ``torchao-int8``: torchao ``quantize_(model.model.layers, Int8WeightOnlyConfig())``.

For bitsandbytes each ``nn.Linear`` is replaced by the bitsandbytes layer, which loads the
original layer's state dict and is quantized when it is moved to the compute device (a CPU
too); ``model.is_loaded_in_4bit`` / ``is_loaded_in_8bit`` are set as transformers sets them
on a model it loads quantized, so PEFT wraps the layers with its bitsandbytes LoRA layers.

``trainer.fit`` trains the adapters for ``trainer.max_steps`` steps on a small fixed set of
random sequences (which they can fit, so the loss falls) under the :class:`OffloadCallback`
with ``offload=prefetch``: every second decoder layer keeps its frozen quantized weights
(with their quantization state) in host memory, and they are copied to the device one
offloaded layer ahead of use, in the forward and, in reverse order, in the backward. No
``offload_params`` is needed: the weights of PEFT adapters are never offloaded (the plan notes
how many stay on the device), so the optimizer updates them where they are.

It prints the scheme, the adapters' size, the offload plan, the bytes of quantized weights in
host memory beside what the same parameters take in float32, the training loss at the first
and the last step, and the callback's statistics (``callback.last_stats``), and writes the
same figures to ``results.json`` in the Hydra output directory.

A real checkpoint on a GPU: replace the line ``model = build_quantized_model(cfg, device)``
in :func:`main` with the loading of a checkpoint that transformers quantizes to nf4 as it
loads it (and on which it sets ``is_loaded_in_4bit`` itself), and run with
``trainer.accelerator=gpu``::

    model = AutoModelForCausalLM.from_pretrained(
        "meta-llama/Llama-3.1-8B",
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
        device_map={"": 0},
    )

(``BitsAndBytesConfig`` from ``transformers``.) Nothing after that line depends on how the
model was built; the config's ``model`` and ``quantization`` keys are then unused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import hydra
import peft
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch import LightningModule, Trainer
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from transformers import AutoModelForCausalLM

from hydra_offload import OffloadCallback, OffloadPlan

SCHEMES = {
    "nf4": "bitsandbytes Linear4bit, nf4, double quantization, float32 compute",
    "int8": "bitsandbytes Linear8bitLt, int8 weights, one scale per output row",
    "torchao-int8": "torchao Int8WeightOnlyConfig, int8 weights, one scale per output row",
}

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "inputs will be cast to float16"


def bitsandbytes_layer(linear: nn.Linear, scheme: str, device: torch.device) -> nn.Module:
    """A bitsandbytes layer with ``linear``'s weights, quantized by moving it to ``device``."""
    import bitsandbytes as bnb

    layer: nn.Module
    if scheme == "nf4":
        layer = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=torch.float32,
            compress_statistics=True,  # double quantization
            quant_type="nf4",
        )
    else:
        layer = bnb.nn.Linear8bitLt(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            has_fp16_weights=False,
            threshold=0.0,
        )
    layer.load_state_dict(linear.state_dict())
    return layer.to(device)  # bitsandbytes quantizes the weight as it moves the layer


def quantize(model: nn.Module, scheme: str, device: torch.device) -> int:
    """Quantize the ``nn.Linear`` layers of ``model.model.layers`` (the decoder layers) in
    place by ``scheme``, on ``device``; returns how many were quantized."""
    layers = model.model.layers
    chosen = [(n, m) for n, m in layers.named_modules() if isinstance(m, nn.Linear)]
    if scheme == "torchao-int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        model.to(device)
        quantize_(layers, Int8WeightOnlyConfig())
        return len(chosen)
    for name, linear in chosen:
        parent, _, child = name.rpartition(".")
        setattr(layers.get_submodule(parent), child, bitsandbytes_layer(linear, scheme, device))
    # What transformers sets on a model it loads in 4 or 8 bits: PEFT then wraps these layers
    # with its bitsandbytes LoRA layers.
    model.is_loaded_in_4bit = scheme == "nf4"
    model.is_loaded_in_8bit = scheme == "int8"
    model.to(device)
    return len(chosen)


def build_quantized_model(cfg: DictConfig, device: torch.device) -> nn.Module:
    """The random-weight Llama of ``cfg.model``, its decoder layers quantized on ``device``."""
    model = AutoModelForCausalLM.from_config(instantiate(cfg.model))
    count = quantize(model, cfg.quantization.scheme, device)
    print(
        f"quantization: {cfg.quantization.scheme} ({SCHEMES[cfg.quantization.scheme]}): "
        f"{count} Linear layers of model.model.layers"
    )
    return model


def float32_bytes(model: nn.Module, names: list[str]) -> int:
    """What the parameters ``names`` of ``model`` take in float32: a (quantized) linear
    layer's weight ``in_features * out_features * 4`` bytes, any other ``numel * 4``."""
    total = 0
    for name in names:
        path, _, attr = name.rpartition(".")
        owner = model.get_submodule(path)
        if isinstance(owner, nn.Linear) and attr == "weight":
            total += owner.in_features * owner.out_features * 4
        else:
            total += owner.get_parameter(attr).numel() * 4
    return total


class QLoRAFinetune(LightningModule):
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


def layers_of(plan: OffloadPlan) -> str:
    return "; ".join(f"{s.path} {list(s.offloaded_layers)}" for s in plan.stacks)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> dict[str, Any]:
    scheme = cfg.quantization.scheme
    if scheme not in SCHEMES:
        raise SystemExit(
            f"error: quantization.scheme={scheme!r} is not one of {', '.join(SCHEMES)}"
        )
    offload = OffloadCallback(cfg.offload)  # validates; errors name the offending key
    trainer = Trainer(**OmegaConf.to_container(cfg.trainer, resolve=True), callbacks=[offload])
    device = trainer.strategy.root_device  # where the layers are quantized and computed

    torch.manual_seed(cfg.data.seed)
    model = build_quantized_model(cfg, device)
    lora = peft.LoraConfig(
        r=cfg.adapter.rank, lora_alpha=cfg.adapter.alpha, target_modules=list(cfg.adapter.targets)
    )
    model = peft.get_peft_model(model, lora)  # freezes every weight but the adapters'
    module = QLoRAFinetune(model, lr=cfg.lr)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    n_trainable = sum(p.numel() for n, p in module.named_parameters() if n in trainable)
    wrapped = sum(1 for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer))
    print(
        f"adapters: {wrapped} LoRA layers (rank {cfg.adapter.rank}) on "
        f"{', '.join(cfg.adapter.targets)}: {n_trainable:,} trainable parameters "
        f"({n_trainable * 4:,} bytes in float32)"
    )

    trainer.fit(module, random_sequences(cfg.data, model.config.vocab_size))

    plan, stats = offload.last_plan, offload.last_stats
    if plan is None or stats is None:
        raise SystemExit("error: nothing was offloaded; this example needs offload=prefetch")
    offloaded = list(plan.offloaded_params)
    trainable_offloaded = [n for n in offloaded if n in trainable]
    as_float32 = float32_bytes(module, offloaded)
    print(
        f"offloaded: {len(offloaded)} parameters of layers {layers_of(plan)}; "
        f"trainable parameters offloaded: {len(trainable_offloaded)}"
    )
    print(
        f"host memory: {stats.offloaded_bytes:,} bytes of {scheme} weights "
        f"(stats.offloaded_bytes) where the same parameters take {as_float32:,} bytes in "
        f"float32 ({stats.offloaded_bytes / as_float32:.0%})"
    )
    print(f"loss: start {module.losses[0]:.4f} -> end {module.losses[-1]:.4f}")
    print(f"steps: {len(module.losses)}")
    print("offload stats (callback.last_stats):")
    for key, value in dataclasses.asdict(stats).items():
        print(f"  {key}: {value}")

    results = {
        "scheme": scheme,
        "loss_start": module.losses[0],
        "loss_end": module.losses[-1],
        "steps": len(module.losses),
        "trainable_params": n_trainable,
        "offloaded_params": offloaded,
        "trainable_offloaded": trainable_offloaded,
        "offloaded_float32_bytes": as_float32,
        "stats": dataclasses.asdict(stats),
    }
    out = Path(HydraConfig.get().runtime.output_dir) / "results.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"results: {out}")
    return results


if __name__ == "__main__":
    main()
