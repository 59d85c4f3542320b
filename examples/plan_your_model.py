"""Plan the offload of your own model from Python, without Hydra and without memory.

    python examples/plan_your_model.py

The model here is an encoder-decoder with two layer stacks. Built on the ``meta`` device it
allocates nothing, so the same script works for models far larger than this machine.
``layers`` names both stacks; each gets its own prefetch ring and device buffer pool.
"""

from __future__ import annotations

import torch
from torch import nn

from hydra_offload import OffloadConfig, plan_offload


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.attn = nn.Linear(width, width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(x + self.attn(x))


class EncoderDecoder(nn.Module):
    def __init__(self, width: int = 1024, depth: int = 12) -> None:
        super().__init__()
        self.encoder = nn.ModuleList(Block(width) for _ in range(depth))
        self.decoder = nn.ModuleList(Block(width) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in (*self.encoder, *self.decoder):
            x = block(x)
        return x


def main() -> None:
    with torch.device("meta"):
        model = EncoderDecoder()
    config = OffloadConfig(
        prefetch={
            "offload_group_size": 4,
            "offload_num_in_group": 2,
            "offload_prefetch_step": 2,
            "offload_params": ["mlp"],  # only the MLP weights of offloaded layers move
        },
        layers=["encoder", "decoder"],
    )
    plan = plan_offload(model, config)
    print(plan.summary())
    for stack in plan.stacks:
        print(f"{stack.path}: layers {list(stack.offloaded_layers)} offloaded")


if __name__ == "__main__":
    main()
