"""Name-segment matching and selectors follow docs/spec.md §3."""

from __future__ import annotations

import pytest

from hydra_offload.selection import SELECTORS, matches_any, segment_match, unmatched_patterns

NAME = "mlp.experts.w2_weight"


@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    [
        # The examples of docs/spec.md §3.1.
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


# (selector, a name it must match, a name it must not match)
SELECTOR_TABLE = [
    ("@attention", "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight"),
    ("@attention", "transformer.h.0.attn.c_attn.weight", "transformer.h.0.mlp.c_fc.weight"),
    ("@attention", "decoder.block.0.layer.1.EncDecAttention.q.weight", "shared.weight"),
    ("@attention", "encoder.layer.0.attention.self.query.weight", "encoder.layer.0.output.dense.w"),
    ("@mlp", "model.layers.3.mlp.down_proj.weight", "model.layers.3.self_attn.o_proj.weight"),
    (
        "@mlp",
        "encoder.block.0.layer.1.DenseReluDense.wi.w",
        "encoder.block.0.layer.0.SelfAttention.q.w",
    ),
    (
        "@mlp",
        "encoder.layer.0.intermediate.dense.weight",
        "encoder.layer.0.attention.output.dense.w",
    ),
    (
        "@experts",
        "model.layers.0.block_sparse_moe.experts.3.w1.w",
        "model.layers.0.block_sparse_moe.gate.w",
    ),
    (
        "@experts",
        "model.layers.0.mlp.experts.gate_up_proj",
        "model.layers.0.mlp.shared_expert.up_proj.w",
    ),
    ("@embeddings", "model.embed_tokens.weight", "lm_head.weight"),
    ("@embeddings", "transformer.wte.weight", "transformer.ln_f.weight"),
    ("@embeddings", "embeddings.word_embeddings.weight", "pooler.dense.weight"),
    ("@embeddings", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight"),
]


@pytest.mark.parametrize(("selector", "hit", "miss"), SELECTOR_TABLE)
def test_selectors_cover_the_common_architectures_names(selector, hit, miss):
    assert matches_any({selector}, hit)
    assert not matches_any({selector}, miss)


def test_selectors_and_segments_combine():
    patterns = {"@experts", "lm_head"}
    assert matches_any(patterns, "model.layers.0.mlp.experts.3.w1.weight")
    assert matches_any(patterns, "lm_head.weight")
    assert not matches_any(patterns, "model.norm.weight")


def test_a_selector_matching_nothing_is_reported_unmatched():
    assert unmatched_patterns({"@experts", "mlp"}, ["layers.0.mlp.up.weight"]) == ("@experts",)


def test_every_selector_is_documented_in_the_configuration_page():
    from pathlib import Path

    page = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
    text = page.read_text(encoding="utf-8")
    for name, segments in SELECTORS.items():
        row = next(line for line in text.splitlines() if line.startswith(f"| `@{name}` |"))
        assert all(f"`{segment}`" in row for segment in segments)
