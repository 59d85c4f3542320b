"""The network: a stem, a stack of identical residual blocks, a head.

The blocks sit in one ``nn.ModuleList`` (``blocks``) and hold almost all the weights, which
is the shape offloading works with: prefetch offloading walks that list (auto-detected, or
named as ``offload.layers: net.blocks``) and keeps some of its blocks in host memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResidualBlock(nn.Module):
    """``x + down(gelu(up(norm(x))))``."""

    def __init__(self, width: int, expansion: int = 2) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, width * expansion)
        self.down = nn.Linear(width * expansion, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.gelu(self.up(self.norm(x))))


class ResidualMLP(nn.Module):
    """Maps ``(batch, input_size)`` features to ``(batch, output_size)`` logits.

    Args:
        input_size: features per sample.
        width: width of the blocks.
        num_blocks: how many residual blocks ``blocks`` holds.
        output_size: number of classes.
    """

    def __init__(
        self, input_size: int = 16, width: int = 64, num_blocks: int = 4, output_size: int = 4
    ) -> None:
        super().__init__()
        self.stem = nn.Linear(input_size, width)
        self.blocks = nn.ModuleList(ResidualBlock(width) for _ in range(num_blocks))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, output_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))
