"""Name-segment matching: which parameters a pattern such as ``experts`` selects.

A pattern matches a parameter name when it equals a run of whole dot-separated segments of
that name: ``experts`` and ``experts.w2_weight`` match ``mlp.experts.w2_weight``; ``expert``
and ``w2`` do not, and ``w13_weight`` does not match ``mlp.experts.w13_weight_scale``.

Example:
    >>> segment_match("experts", "model.layers.0.mlp.experts.w2_weight")
    True
    >>> segment_match("expert", "model.layers.0.mlp.experts.w2_weight")
    False
    >>> matches_any(frozenset(), "anything")  # an empty selection selects everything
    True
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["matches_any", "segment_match", "unmatched_patterns"]


def segment_match(pattern: str, name: str) -> bool:
    """Whether ``pattern`` is a run of whole segments of the dotted ``name``."""
    return f".{pattern}." in f".{name}."


def matches_any(patterns: Iterable[str], name: str) -> bool:
    """Whether any pattern matches ``name``; an empty collection of patterns matches all."""
    patterns = tuple(patterns)
    return not patterns or any(segment_match(p, name) for p in patterns)


def unmatched_patterns(patterns: Iterable[str], names: Iterable[str]) -> tuple[str, ...]:
    """The patterns, sorted, that match none of ``names`` (likely typos worth a warning)."""
    names = tuple(names)
    return tuple(sorted(p for p in patterns if not any(segment_match(p, n) for n in names)))
