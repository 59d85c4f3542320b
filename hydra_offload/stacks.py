"""Finding the layer stack: the ``nn.ModuleList`` / ``nn.Sequential`` of blocks that the
prefetch backend walks.

Auto-detection looks at every module list in the model that holds at least two children of
one class and picks the one whose parameters take the most bytes (shared parameters counted
once); a tie goes to the shallower path, then to the one registered first. Every other module
list is kept as a rejected candidate with the reason, so the choice can be explained.

Example:
    >>> import torch
    >>> from hydra_offload.models import DecoderLM
    >>> with torch.device("meta"):
    ...     model = DecoderLM(num_layers=4)
    >>> choice = find_layer_stacks(model, None)
    >>> choice.stacks[0].path, len(choice.stacks[0].module)
    ('layers', 4)
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace

from torch import nn

__all__ = ["LayerStack", "LayerStackError", "StackCandidate", "StackChoice", "find_layer_stacks"]

_STACK_TYPES = (nn.ModuleList, nn.Sequential)


class LayerStackError(ValueError):
    """The layer stack named by ``layers`` is unusable, or none could be found."""


@dataclass(frozen=True)
class StackCandidate:
    """A module list considered as the layer stack, and what was decided about it."""

    path: str
    """Dotted path from the model root (``""`` is the root itself)."""
    num_children: int
    layer_class: str
    """The most common class among the children."""
    same_class: int
    """How many children are of ``layer_class``; a stack needs at least two."""
    param_bytes: int
    chosen: bool
    reason: str

    @property
    def display_path(self) -> str:
        return self.path or "<root>"


@dataclass(frozen=True)
class LayerStack:
    """A chosen stack: its path and the live module (a ``ModuleList`` or ``Sequential``)."""

    path: str
    module: nn.Module

    def qualified(self, index: int, local: str = "") -> str:
        """The fully qualified name of layer ``index`` (or of ``local`` inside it)."""
        parts = [p for p in (self.path, str(index), local) if p]
        return ".".join(parts)


@dataclass(frozen=True)
class StackChoice:
    """The stacks used and every candidate looked at (empty when paths were given)."""

    stacks: tuple[LayerStack, ...]
    candidates: tuple[StackCandidate, ...]


def _param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _candidate(path: str, module: nn.Module) -> StackCandidate:
    classes = Counter(type(child).__name__ for child in module.children())
    top, count = classes.most_common(1)[0] if classes else ("-", 0)
    return StackCandidate(path, len(module), top, count, _param_bytes(module), False, "")


def find_layer_stacks(model: nn.Module, paths: tuple[str, ...] | None) -> StackChoice:
    """Resolve the layer stack(s): the given dotted ``paths``, or auto-detection when ``None``.

    Raises:
        LayerStackError: a path that does not exist, is not a module list, or lies inside
            another given path; or, when auto-detecting, no module list with two children
            of one class.
    """
    if paths is not None:
        return StackChoice(tuple(_named_stack(model, p) for p in _disjoint(paths)), ())
    return _auto_detect(model)


def _disjoint(paths: tuple[str, ...]) -> tuple[str, ...]:
    for outer in paths:
        for inner in paths:
            if inner != outer and inner.startswith(outer + "."):
                raise LayerStackError(
                    f"offload.layers: {inner!r} lies inside {outer!r}; a layer can belong "
                    "to one stack only, so name stacks that do not contain each other"
                )
    return paths


def _named_stack(model: nn.Module, path: str) -> LayerStack:
    try:
        module = model.get_submodule(path)
    except AttributeError:
        found = ", ".join(
            f"{c.display_path} ({c.num_children} x {c.layer_class})"
            for c in _candidates(model)
            if c.same_class >= 2
        )
        hint = f"module lists found: {found}" if found else "the model has no module list"
        raise LayerStackError(
            f"offload.layers: {path!r} does not exist in {type(model).__name__}; {hint}"
        ) from None
    if not isinstance(module, _STACK_TYPES):
        raise LayerStackError(
            f"offload.layers: {path!r} is a {type(module).__name__}, not an nn.ModuleList or "
            "nn.Sequential of layers"
        )
    if len(module) == 0:
        raise LayerStackError(f"offload.layers: {path!r} is an empty {type(module).__name__}")
    return LayerStack(path, module)


def _candidates(model: nn.Module) -> list[StackCandidate]:
    return [
        _candidate(path, module)
        for path, module in model.named_modules()
        if isinstance(module, _STACK_TYPES)
    ]


def _auto_detect(model: nn.Module) -> StackChoice:
    lists = _candidates(model)
    eligible = [c for c in lists if c.same_class >= 2]
    if not eligible:
        raise LayerStackError(
            f"no layer stack found in {type(model).__name__}: prefetch offloading needs an "
            "nn.ModuleList or nn.Sequential holding two or more layers of one class. Set "
            "offload.layers to the dotted path of the model's layers"
        )
    depth = {c.path: (c.path.count(".") + 1 if c.path else 0) for c in eligible}
    best = min(enumerate(eligible), key=lambda ic: (-ic[1].param_bytes, depth[ic[1].path], ic[0]))[
        1
    ]
    decided = []
    for c in lists:
        if c is best:
            reason = "most parameter bytes"
        elif c.same_class < 2:
            reason = "fewer than two children of one class"
        elif c.param_bytes < best.param_bytes:
            reason = f"fewer parameter bytes ({c.param_bytes:,} < {best.param_bytes:,})"
        else:
            reason = f"same parameter bytes, deeper or later than {best.display_path}"
        decided.append(replace(c, chosen=c is best, reason=reason))
    module = model.get_submodule(best.path) if best.path else model
    return StackChoice((LayerStack(best.path, module),), tuple(decided))
