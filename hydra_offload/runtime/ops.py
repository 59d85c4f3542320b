"""The prefetch steps as custom operators, so ``torch.compile`` traces through them in order.

Compiled code runs a layer's hooks as two opaque operators: ``hydra_offload::layer_begin``
(wait for the layer's weights, loading them on demand) and ``hydra_offload::layer_end``
(mark its slots free, start the next copies). Both take one activation and the layer's
offloaded weights, and three orderings hold in the compiled code:

- Between the operators. Each declares that it mutates its activation: ``layer_begin`` the
  layer's first tensor input, ``layer_end`` its first tensor output. The layer's computation
  feeds on the first and produces the second, so the steps of consecutive layers form one
  chain of data dependencies and keep their order.
- Reads of the weights. To the graph the weights are read-only inputs of both operators, and
  that alone does not order a read that depends on nothing but a weight (its cast under
  autocast, a scale): program order puts it between the two steps, which eager execution
  and ``backend="aot_eager"`` keep, but Inductor schedules by dependencies only and may hoist
  it. The weights cannot be declared mutated at the graph level: slots are shared by
  several layers (several parameters alias one slot), and a functionalized mutation clones
  the weights before the operator (reading the slot before the copy has landed) and copies
  the clone back after the graph (into a slot that by then holds another layer). So Inductor
  lowers each operator to a twin (``layer_begin_inductor``, ``layer_end_inductor``) that
  declares the weights written: in Inductor's scheduler a write orders every later read of a
  buffer after it and every earlier read before it, and costs no copy. Every read of layer
  ``j``'s weights then runs after its ``layer_begin`` and before its ``layer_end``.
- CUDA graphs. Every operator is tagged ``torch.Tag.cudagraph_unsafe``. With
  ``mode="reduce-overhead"`` Inductor splits the graph around them (its graph partitions,
  on by default) or, with partitions off, runs that graph without CUDA graphs; either way the
  steps run as Python at every call instead of being recorded once and replayed without a
  copy or a wait.

In eager mode the hooks call the same Python directly, without the dispatcher.
"""

from __future__ import annotations

import itertools
import sys
from typing import Any

import torch

__all__ = ["first_tensor", "layer_begin", "layer_end", "register_ring", "unregister_ring"]

_RINGS: dict[int, Any] = {}
_IDS = itertools.count()

_TAGS = (torch.Tag.cudagraph_unsafe,)
"""A sequence, not a bare tag: ``custom_op`` in torch 2.11 takes only sequences."""


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


@torch.library.custom_op("hydra_offload::layer_begin", mutates_args=("activation",), tags=_TAGS)
def layer_begin(
    activation: torch.Tensor, weights: list[torch.Tensor], ring: int, position: int
) -> None:
    """Before offloaded layer ``position`` of ring ``ring`` computes; ``weights`` are its
    offloaded parameters, read only."""
    _RINGS[ring].begin(position)


@layer_begin.register_fake
def _(activation: torch.Tensor, weights: list[torch.Tensor], ring: int, position: int) -> None:
    _lower_to_twins()


@torch.library.custom_op("hydra_offload::layer_end", mutates_args=("activation",), tags=_TAGS)
def layer_end(
    activation: torch.Tensor, weights: list[torch.Tensor], ring: int, position: int
) -> None:
    """After offloaded layer ``position`` of ring ``ring`` has computed."""
    _RINGS[ring].end(position)


@layer_end.register_fake
def _(activation: torch.Tensor, weights: list[torch.Tensor], ring: int, position: int) -> None:
    _lower_to_twins()


@torch.library.custom_op(
    "hydra_offload::layer_begin_inductor", mutates_args=("activation", "weights"), tags=_TAGS
)
def _layer_begin_inductor(
    activation: torch.Tensor, weights: list[torch.Tensor], ring: int, position: int
) -> None:
    """:func:`layer_begin` as Inductor calls it: the weights declared written (they never are)."""
    _RINGS[ring].begin(position)


@_layer_begin_inductor.register_fake
def _(activation: torch.Tensor, weights: list[torch.Tensor], ring: int, position: int) -> None:
    return None


@torch.library.custom_op(
    "hydra_offload::layer_end_inductor", mutates_args=("activation", "weights"), tags=_TAGS
)
def _layer_end_inductor(
    activation: torch.Tensor, weights: list[torch.Tensor], ring: int, position: int
) -> None:
    """:func:`layer_end` as Inductor calls it: the weights declared written (they never are)."""
    _RINGS[ring].end(position)


@_layer_end_inductor.register_fake
def _(activation: torch.Tensor, weights: list[torch.Tensor], ring: int, position: int) -> None:
    return None


_OPS = torch.ops.hydra_offload
_TWINS = {
    _OPS.layer_begin.default: _OPS.layer_begin_inductor.default,
    _OPS.layer_end.default: _OPS.layer_end_inductor.default,
}
"""Each operator the graph holds, and the one Inductor's generated code calls instead.

Inductor's on-disk cache keys a graph, not how its operators were lowered: rename a twin only
together with a change to its operator's schema, or cached code would call the old name.
"""

_lowered = False


def _lower_to_twins() -> None:
    """Tell Inductor to lower :func:`layer_begin` / :func:`layer_end` to their twins.

    Called while an operator is traced (its fake implementation). Inductor's lowering module
    is not imported for that: importing it costs seconds, and would run under the tracer's
    fake tensor mode. It needs no import either: Inductor's compile entry point imports it
    before it traces the graph that calls this, and a graph that never reaches Inductor
    needs no lowering.
    """
    global _lowered
    if _lowered or "torch._inductor.lowering" not in sys.modules:
        return
    from torch._inductor.lowering import fallback_handler, register_lowering

    for op, twin in _TWINS.items():
        # Inductor then calls the twin with the same arguments, as a fallback kernel that
        # writes the activation and the weights (from its schema).
        register_lowering(op, type_promotion_kind=None)(
            fallback_handler(twin, add_to_fallback_set=False)
        )
    _lowered = True
