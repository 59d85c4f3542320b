"""Name-segment matching follows SPEC.md section 2, "Segment match"."""

from __future__ import annotations

import pytest

from hydra_offload.selection import matches_any, segment_match, unmatched_patterns

NAME = "mlp.experts.w2_weight"


@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    [
        # The examples of SPEC.md.
        ("experts", NAME, True),
        ("experts.w2_weight", NAME, True),
        ("expert", NAME, False),
        ("w2", NAME, False),
        ("w13_weight", "mlp.experts.w13_weight_scale", False),
        ("w13_weight_scale", "mlp.experts.w13_weight_scale", True),
        # Whole-name matches.
        (NAME, NAME, True),
        ("weight", "weight", True),
        ("weight", "weights", False),
        # First, middle and last segment.
        ("mlp", NAME, True),
        ("w2_weight", NAME, True),
        ("layers", "model.layers.3.mlp.down_proj.weight", True),
        ("3", "model.layers.3.mlp.down_proj.weight", True),
        ("3", "model.layers.13.mlp.down_proj.weight", False),
        ("3", "model.layers.30.mlp.down_proj.weight", False),
        # Multi-segment patterns must be a contiguous run, in order.
        ("mlp.experts", NAME, True),
        ("layers.3.mlp", "model.layers.3.mlp.down_proj.weight", True),
        ("layers.3.mlp", "model.layers.13.mlp.down_proj.weight", False),
        ("mlp.w2_weight", NAME, False),
        ("w2_weight.experts", NAME, False),
        ("experts.w2", NAME, False),
        ("xperts.w2_weight", NAME, False),
        # Longer than the name, or a prefix/suffix of a segment.
        ("mlp.experts.w2_weight.extra", NAME, False),
        ("down", "mlp.down_proj.weight", False),
        ("proj.weight", "mlp.down_proj.weight", False),
        # Case matters.
        ("Experts", NAME, False),
    ],
)
def test_segment_match_table(pattern, name, expected):
    assert segment_match(pattern, name) is expected


@pytest.mark.parametrize(
    ("patterns", "name", "expected"),
    [
        ((), NAME, True),
        (frozenset(), NAME, True),
        ([], "anything.at.all", True),
        (frozenset({"experts"}), NAME, True),
        (frozenset({"expert", "w2"}), NAME, False),
        (frozenset({"attn", "w2_weight"}), NAME, True),
        (["w13_weight"], "mlp.experts.w13_weight_scale", False),
    ],
)
def test_matches_any_table(patterns, name, expected):
    assert matches_any(patterns, name) is expected


def test_matches_any_accepts_a_one_shot_iterator():
    # The patterns are consumed once: an empty generator still means "everything".
    assert matches_any((p for p in ()), NAME) is True
    assert matches_any((p for p in ["w2"]), NAME) is False
    assert matches_any((p for p in ["w2", "experts"]), NAME) is True


@pytest.mark.parametrize(
    ("patterns", "names", "expected"),
    [
        ((), [NAME], ()),
        (["experts"], [NAME], ()),
        (["expert"], [NAME], ("expert",)),
        (["w2", "experts", "attn"], [NAME, "self_attn.q_proj.weight"], ("attn", "w2")),
        (["zeta", "alpha", "experts"], [NAME], ("alpha", "zeta")),
        (["experts"], [], ("experts",)),
        (["w13_weight"], ["mlp.experts.w13_weight_scale"], ("w13_weight",)),
    ],
)
def test_unmatched_patterns_table(patterns, names, expected):
    assert unmatched_patterns(patterns, names) == expected


def test_unmatched_patterns_accepts_a_one_shot_iterator_of_names():
    names = iter(["a.experts.w1", "b.attn.q"])
    assert unmatched_patterns(["experts", "attn", "mlp"], names) == ("mlp",)
