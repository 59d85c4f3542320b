"""The hydra-offload main job.

    python run.py                                   # no offload, the embedded small decoder
    python run.py offload=prefetch offload.prefetch.offload_group_size=8
    python run.py offload=uva offload.uva.cpu_offload_gb=0.01
    python run.py model=llama_7b_meta offload=prefetch     # plan only: the model is on meta
    python run.py +dry_run=true offload=prefetch           # plan only, any model
    python run.py -m offload=none,uva,prefetch      # a Hydra multirun sweep

Validates the ``offload`` node, builds the configured model, applies the offload on the
compute device (``run.device``: CUDA when there is one, else CPU), runs ``run.steps`` timed
forwards and prints the plan, the offload's statistics, the time per forward and whether the
outputs are identical to the model's without offload. A model on the ``meta`` device, or
``+dry_run=true``, is only planned.

A bad setting ends the job with one line naming the key, the value and what is allowed, and
exit status 2.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, NoReturn

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from hydra_offload import (
    LayerStackError,
    OffloadConfig,
    OffloadConfigError,
    OffloadError,
    apply_offload,
    plan_offload,
    to_offload_config,
)
from hydra_offload._render import render_stats

log = logging.getLogger(__name__)


def fail(message: str) -> NoReturn:
    """End the job with a one-line error and exit status 2 (no traceback)."""
    print("error: " + message.replace("\n", "\nerror: "), file=sys.stderr)
    raise SystemExit(2)


def compute_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        fail(f"run.device: {name!r} is not a device; use auto, cpu, cuda or cuda:N")


def plan_only(cfg: DictConfig, offload: OffloadConfig, console: Console) -> dict[str, Any]:
    with torch.device("meta"):
        model = instantiate(cfg.model)
    try:
        plan = plan_offload(model, offload)
    except LayerStackError as err:
        fail(str(err))
    console.print(plan)
    return {"backend": plan.backend, "device_bytes_saved": plan.device_bytes_saved}


def run_model(cfg: DictConfig, offload: OffloadConfig, console: Console) -> dict[str, Any]:
    settings = cfg.run
    device = compute_device(str(settings.device))
    torch.manual_seed(settings.seed)
    model = instantiate(cfg.model).to(device).eval()
    vocab = model.embed_tokens.num_embeddings
    ids = torch.randint(0, vocab, (settings.batch_size, settings.seq_len), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        reference = model(ids) if settings.check else None
        try:
            handle = apply_offload(model, offload, device)
        except (LayerStackError, OffloadError) as err:
            fail(str(err))
        console.print(handle.plan)
        model(ids)  # warm-up
        sync()
        start = time.perf_counter()
        for _ in range(settings.steps):
            output = model(ids)
        sync()
        step_ms = (time.perf_counter() - start) * 1000 / max(settings.steps, 1)
        stats = handle.stats
        handle.remove()
    console.print(render_stats(stats, step_ms))
    result: dict[str, Any] = {
        "backend": stats.backend,
        "device": str(device),
        "device_bytes_saved": stats.device_bytes_saved,
        "step_ms": step_ms,
        "stalls": stats.stalls,
    }
    if reference is not None:
        identical = torch.equal(output, reference)
        console.print(f"outputs identical to no offload: {'yes' if identical else 'NO'}")
        result["identical"] = identical
    log.info("result: %s", result)
    return result


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> dict[str, Any]:
    try:
        offload = to_offload_config(cfg.offload)
    except OffloadConfigError as err:
        fail(str(err))
    console = Console(highlight=False)
    console.print("[bold]offload config[/bold] (validated)")
    console.print(OmegaConf.to_yaml(offload.model_dump(mode="json")).rstrip())
    console.print(f"resolved backend: {offload.resolved_backend}")
    console.print(f"config hash: {offload.compute_hash()}")
    on_meta = str(cfg.model.get("device")) == "meta"
    if cfg.get("dry_run", False) or on_meta:
        return plan_only(cfg, offload, console)
    return run_model(cfg, offload, console)


if __name__ == "__main__":
    main()
