"""Fit and predict under Lightning's DDP strategy with 2 CPU processes (gloo).

    python ddp.py OUT_DIR

Every rank writes ``OUT_DIR/rank<R>.pt``: for each run, the error it raised (if any), the
final parameters, the names DDP was told to ignore, the offloaded parameter names and, for
predict, the input ids and logits of each batch it predicted and the number of CPU threads it
ran with (Lightning sets it); for the predict run whose host-memory check reads a stand-in for
``MemAvailable``, the figures its check was given.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from common import QUIET, tiny_module, tokens
from lightning.pytorch import Callback, Trainer

from hydra_offload import OffloadCallback, offload
from hydra_offload.integrations import lightning as lightning_integration
from hydra_offload.plan import plan_offload

PREFETCH = {"prefetch": {"offload_group_size": 2}}
# Trainable offloaded weights (the MLPs) under DDP: they train split among the ranks, in sync.
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


def predict_checking_host_memory(out: Path) -> dict:
    """Predict with the host-memory check reading a stand-in for ``MemAvailable``: a node with
    just enough memory for both replicas, whose figure drops by what each rank's offload
    holds. Rank 1 reads it only once rank 0 has offloaded, or after 2 s: a rank that checked
    against its own reading at apply time would see rank 0's replica gone from the node and
    count it again, and refuse. Rank 1 reads one byte less than rank 0, so the figure both
    checked against shows whether they agree on the least."""
    rank = torch.distributed.get_rank()
    module = tiny_module()
    params = dict(module.named_parameters())
    planned = plan_offload(module, PREFETCH).params
    needed = 2 * sum(p.nbytes * (2 if params[p.name].requires_grad else 1) for p in planned)
    marks = out / "host_memory"
    marks.mkdir(exist_ok=True)

    def read_host_memory() -> int:
        deadline = time.monotonic() + 2.0
        while rank == 1 and not (marks / "offloaded0").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        taken = sum(int(mark.read_text()) for mark in marks.glob("offloaded*"))
        return needed + 1 - rank - taken

    given: dict = {}
    real_apply = lightning_integration.apply_offload

    def apply_offload(*args, **kwargs):
        given.update(kwargs)
        handle = real_apply(*args, **kwargs)
        written = marks / f".offloaded{rank}"  # then renamed: never read half-written
        written.write_text(str(handle.stats.host_bytes))
        written.replace(marks / f"offloaded{rank}")
        return handle

    real_read = offload.available_host_bytes
    offload.available_host_bytes = read_host_memory
    lightning_integration.apply_offload = apply_offload
    callback = OffloadCallback(PREFETCH)
    try:
        trainer(callback).predict(module, tokens(), return_predictions=False)
    except Exception as err:
        error = f"{type(err).__name__}: {err}"
    else:
        error = None
    finally:
        offload.available_host_bytes = real_read
        lightning_integration.apply_offload = real_apply
    return {
        "error": error,
        "needed": needed,
        "processes_per_node": given.get("processes_per_node"),
        "host_bytes_available": given.get("host_bytes_available"),
        "forwards": callback.last_stats.forwards if callback.last_stats is not None else 0,
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
        "predict_host_memory": predict_checking_host_memory(out),
    }
    rank = torch.distributed.get_rank()
    torch.save(results, out / f"rank{rank}.pt")
    # Lightning leaves the process group up; gloo's threads torn down at interpreter exit
    # can abort a rank ("terminate called without an active exception"): end it here.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
