"""The hydra-offload main job.

    python run.py                                   # no offload, the embedded small decoder
    python run.py offload=prefetch offload.prefetch.offload_group_size=8
    python run.py offload=uva offload.uva.cpu_offload_gb=0.5 model=llama_7b_meta
    python run.py -m offload=none,uva,prefetch      # a Hydra multirun sweep

Builds the configured model on the ``meta`` device (no memory, no download), validates the
``offload`` node, plans the offload and prints the resolved config, its hash and the plan.
Running the model under the chosen backend comes with the runtime.

A bad setting ends the job with one line naming the key, the value and what is allowed, and
exit status 2.
"""

from __future__ import annotations

import logging
import sys

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from hydra_offload import (
    LayerStackError,
    OffloadConfigError,
    plan_offload,
    to_offload_config,
)

log = logging.getLogger(__name__)


def fail(message: str) -> None:
    """End the job with a one-line error and exit status 2 (no traceback)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> dict[str, object]:
    try:
        offload = to_offload_config(cfg.offload)
    except OffloadConfigError as err:
        fail(str(err).replace("\n", "\nerror: "))
    with torch.device("meta"):
        model = instantiate(cfg.model)
    try:
        plan = plan_offload(model, offload)
    except LayerStackError as err:
        fail(str(err))

    console = Console(highlight=False)
    console.print("[bold]offload config[/bold] (validated)")
    console.print(OmegaConf.to_yaml(offload.model_dump(mode="json")).rstrip())
    console.print(f"resolved backend: {offload.resolved_backend}")
    console.print(f"config hash: {offload.compute_hash()}")
    console.print(plan)
    log.info(
        "plan: backend=%s offloaded=%d params, %d bytes; pool=%d bytes; device saved=%d bytes",
        plan.backend,
        len(plan.params),
        plan.offloaded_bytes,
        plan.pool_bytes,
        plan.device_bytes_saved,
    )
    return {
        "backend": plan.backend,
        "config_hash": plan.config_hash,
        "offloaded_bytes": plan.offloaded_bytes,
        "device_bytes_saved": plan.device_bytes_saved,
    }


if __name__ == "__main__":
    main()
