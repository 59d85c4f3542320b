"""The prefetch steps as custom operators, so ``torch.compile`` traces through them in order.

Compiled code runs a layer's hooks as two opaque operators: ``hydra_offload::layer_begin``
(wait for the layer's weights, loading them on demand) and ``hydra_offload::layer_end``
(mark its slots free, start the next copies). Each declares that it mutates an activation:
``layer_begin`` the layer's first tensor input, ``layer_end`` its first tensor output. Every
read of the layer's weights feeds on the first and produces the second, so the compiler
can move no read of the weights across either operator, and the whole model compiles without
a graph break per layer. The weights themselves are never declared mutated: slots are shared
by several layers, and a functionalized write-back of one layer's weights into a shared slot
would be wrong.

In eager mode the hooks call the same Python directly, without the dispatcher.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch

__all__ = ["first_tensor", "layer_begin", "layer_end", "register_ring", "unregister_ring"]

_RINGS: dict[int, Any] = {}
_IDS = itertools.count()


def register_ring(ring: Any) -> int:
    """Make ``ring`` (with ``begin(position)`` / ``end(position)``) reachable by id."""
    ring_id = next(_IDS)
    _RINGS[ring_id] = ring
    return ring_id


def unregister_ring(ring_id: int) -> None:
    _RINGS.pop(ring_id, None)


def first_tensor(value: Any) -> torch.Tensor | None:
    """The first tensor in ``value`` (a tensor, or nested tuples, lists and dicts)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        for item in value:
            found = first_tensor(item)
            if found is not None:
                return found
    return None


@torch.library.custom_op("hydra_offload::layer_begin", mutates_args=("activation",))
def layer_begin(activation: torch.Tensor, ring: int, position: int) -> None:
    """Before offloaded layer ``position`` of ring ``ring`` computes."""
    _RINGS[ring].begin(position)


@layer_begin.register_fake
def _(activation: torch.Tensor, ring: int, position: int) -> None:
    return None


@torch.library.custom_op("hydra_offload::layer_end", mutates_args=("activation",))
def layer_end(activation: torch.Tensor, ring: int, position: int) -> None:
    """After offloaded layer ``position`` of ring ``ring`` has computed."""
    _RINGS[ring].end(position)


@layer_end.register_fake
def _(activation: torch.Tensor, ring: int, position: int) -> None:
    return None
