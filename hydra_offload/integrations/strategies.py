"""Which Lightning strategies the offload composes with, and the one-line refusal of those it
does not.

:class:`~hydra_offload.OffloadCallback` offloads a replica of the module in each process. That
composes with the strategies that keep whole replicas: a single device, DDP (``ddp``,
``ddp_spawn``, ``ddp_fork``, several nodes), whose processes of one node then share one host
copy of the frozen offloaded weights. Strategies that shard the parameters across processes
(FSDP, FSDP2 through ``ModelParallelStrategy``, DeepSpeed ZeRO) own where every parameter
lives: they flatten, shard and move the parameters the offload would point at its own
storage, and have their own host offload. Under them the callback refuses at ``setup``,
before anything is built, in one line naming the strategy and its own option.

Example:
    >>> from lightning.pytorch.strategies import FSDPStrategy, SingleDeviceStrategy
    >>> check_strategy(SingleDeviceStrategy("cpu"))  # composes: nothing to say
    >>> check_strategy(FSDPStrategy())
    Traceback (most recent call last):
    hydra_offload.errors.OffloadError: OffloadCallback cannot offload under FSDPStrategy: ...
"""

from __future__ import annotations

from typing import Any

from hydra_offload.errors import OffloadError

__all__ = ["SHARDING_STRATEGIES", "check_strategy"]

SHARDING_STRATEGIES = {
    "FSDPStrategy": "FSDP's own CPU offload: FSDPStrategy(cpu_offload=True)",
    "ModelParallelStrategy": (
        "FSDP2's own CPU offload: fully_shard(module, offload_policy=CPUOffloadPolicy()) in "
        "configure_model"
    ),
    "DeepSpeedStrategy": (
        "DeepSpeed's own CPU offload: DeepSpeedStrategy(stage=3, offload_parameters=True)"
    ),
}
"""Strategy class names (their own or a base class's) that shard parameters, and what to use
instead."""


def check_strategy(strategy: Any) -> None:
    """Refuse a strategy the offload does not compose with (see the module docstring).

    Raises:
        OffloadError: ``strategy`` shards parameters (FSDP, FSDP2, DeepSpeed); the message
            names it and its own CPU offload option.
    """
    for cls in type(strategy).__mro__:
        advice = SHARDING_STRATEGIES.get(cls.__name__)
        if advice is not None:
            raise OffloadError(
                f"OffloadCallback cannot offload under {type(strategy).__name__}: it shards the "
                "parameters across processes and decides where each one lives, which the "
                f"offload does too; use {advice}, or strategy='ddp' (or one device) with "
                "OffloadCallback"
            )
