"""Fit and predict under Lightning's DDP strategy with 2 CPU processes (gloo).

    python ddp.py OUT_DIR

Every rank writes ``OUT_DIR/rank<R>.pt``: for each run, the error it raised (if any), the
final parameters, the names DDP was told to ignore, the offloaded parameter names and, for
predict, the input ids and logits of each batch it predicted and the number of CPU threads it
ran with (Lightning sets it).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from common import QUIET, tiny_module, tokens
from lightning.pytorch import Callback, Trainer

from hydra_offload import OffloadCallback

PREFETCH = {"prefetch": {"offload_group_size": 2}}
# Trainable offloaded weights (the MLPs) under DDP: they must stay in sync, or be refused.
UVA_MLP = {"uva": {"cpu_offload_gb": 1.0, "cpu_offload_params": ["mlp"]}}


class Probe(Callback):
    """Records, while the stage runs, what DDP ignores and what the offload moved."""

    def __init__(self, offload: OffloadCallback | None) -> None:
        self.offload = offload
        self.ignored: list[str] = []
        self.offloaded: list[str] = []

    def on_train_start(self, trainer, pl_module):
        self.ignored = sorted(getattr(trainer.strategy.model, "parameters_to_ignore", []))
        self._record()

    def on_predict_start(self, trainer, pl_module):
        self.ignored = sorted(getattr(pl_module, "_ddp_params_and_buffers_to_ignore", []))
        self._record()

    def _record(self):
        if self.offload is not None and self.offload.handle is not None:
            self.offloaded = sorted(self.offload.handle.plan.offloaded_params)


def freeze_all_but_head(module) -> None:
    for name, param in module.named_parameters():
        param.requires_grad_(name.startswith(("model.lm_head.", "model.norm.")))


def trainer(*callbacks, **kwargs) -> Trainer:
    return Trainer(
        strategy="ddp",
        devices=2,
        accelerator="cpu",
        callbacks=list(callbacks),
        **QUIET,
        **kwargs,
    )


def fit(config, *, frozen: bool) -> dict:
    module = tiny_module()
    if frozen:
        freeze_all_but_head(module)
    offload = OffloadCallback(config) if config is not None else None
    probe = Probe(offload)
    run = trainer(*([offload] if offload else []), probe, max_steps=2)
    try:
        run.fit(module, tokens())
    except Exception as err:  # a refusal is an answer too: record it on every rank
        error = f"{type(err).__name__}: {err}"
    else:
        error = None
    return {
        "error": error,
        "params": {n: p.detach().clone() for n, p in module.named_parameters()},
        "ignored": probe.ignored,
        "offloaded": probe.offloaded,
        "left_ignored": hasattr(module, "_ddp_params_and_buffers_to_ignore"),
    }


class IdsAndLogits(Callback):
    def __init__(self) -> None:
        self.batches: list[tuple[torch.Tensor, torch.Tensor]] = []

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, *args):
        self.batches.append((batch[0].clone(), outputs.clone()))


def predict(config) -> dict:
    module = tiny_module()
    offload = OffloadCallback(config) if config is not None else None
    probe, seen = Probe(offload), IdsAndLogits()
    callbacks = [offload] if offload else []
    trainer(*callbacks, probe, seen).predict(module, tokens(), return_predictions=False)
    return {
        "batches": seen.batches,
        "ignored": probe.ignored,
        "offloaded": probe.offloaded,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    out = Path(sys.argv[1])
    results = {
        "fit_prefetch_frozen": fit(PREFETCH, frozen=True),
        "fit_plain_frozen": fit(None, frozen=True),
        "fit_uva_mlp": fit(UVA_MLP, frozen=False),
        "fit_plain": fit(None, frozen=False),
        "predict_prefetch": predict(PREFETCH),
        "predict_plain": predict(None),
    }
    rank = torch.distributed.get_rank()
    torch.save(results, out / f"rank{rank}.pt")
    # Lightning leaves the process group up; gloo's threads torn down at interpreter exit
    # can abort a rank ("terminate called without an active exception"): end it here.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
