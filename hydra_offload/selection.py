"""Name-segment matching: which parameters a pattern such as ``experts`` selects.

A pattern matches a parameter name when it equals a run of whole dot-separated segments of
that name: ``experts`` and ``experts.w2_weight`` match ``mlp.experts.w2_weight``; ``expert``
and ``w2`` do not, and ``w13_weight`` does not match ``mlp.experts.w13_weight_scale``.

A pattern starting with ``@`` names a selector: a group of segments that covers the common
architectures' names for one kind of weight (see :data:`SELECTORS`). ``@mlp`` matches
Llama's ``mlp.down_proj``, T5's ``DenseReluDense.wo`` and BERT's ``intermediate.dense``.
Selectors and segments combine in one list: ``["@experts", "lm_head"]``.

Example:
    >>> segment_match("experts", "model.layers.0.mlp.experts.w2_weight")
    True
    >>> segment_match("expert", "model.layers.0.mlp.experts.w2_weight")
    False
    >>> matches_any(frozenset(), "anything")  # an empty selection selects everything
    True
    >>> matches_any({"@mlp"}, "encoder.block.0.layer.1.DenseReluDense.wi.weight")
    True
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "SELECTORS",
    "expand",
    "matches_any",
    "segment_match",
    "unknown_selectors",
    "unmatched_patterns",
]

SELECTORS: dict[str, tuple[str, ...]] = {
    "attention": (
        "self_attn", "attn", "attention", "self_attention", "SelfAttention",
        "EncDecAttention", "crossattention", "cross_attn", "encoder_attn",
    ),
    "mlp": ("mlp", "feed_forward", "ffn", "DenseReluDense", "intermediate"),
    "experts": ("experts",),
    "embeddings": (
        "embed_tokens", "wte", "wpe", "embeddings", "word_embeddings",
        "position_embeddings", "token_type_embeddings", "shared", "embed_positions",
        "patch_embed", "pos_embed", "cls_token",
    ),
}  # fmt: skip
"""Named selectors (``@name``) and the name segments each stands for."""


def unknown_selectors(patterns: Iterable[str]) -> list[str]:
    """The ``@name`` patterns that name no selector."""
    return [p for p in patterns if p.startswith("@") and p[1:] not in SELECTORS]


def expand(pattern: str) -> tuple[str, ...]:
    """The segments a pattern stands for: itself, or a selector's segments."""
    if pattern.startswith("@"):
        return SELECTORS[pattern[1:]]
    return (pattern,)


def segment_match(pattern: str, name: str) -> bool:
    """Whether ``pattern`` is a run of whole segments of the dotted ``name``."""
    return f".{pattern}." in f".{name}."


def _matches(pattern: str, name: str) -> bool:
    return any(segment_match(segment, name) for segment in expand(pattern))


def matches_any(patterns: Iterable[str], name: str) -> bool:
    """Whether any pattern (segment or ``@selector``) matches ``name``; an empty collection
    of patterns matches all."""
    patterns = tuple(patterns)
    return not patterns or any(_matches(p, name) for p in patterns)


def unmatched_patterns(patterns: Iterable[str], names: Iterable[str]) -> tuple[str, ...]:
    """The patterns, sorted, that match none of ``names`` (likely typos worth a warning)."""
    names = tuple(names)
    return tuple(sorted(p for p in patterns if not any(_matches(p, n) for n in names)))
