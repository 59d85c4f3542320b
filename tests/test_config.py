"""OffloadConfig follows docs/spec.md §2: fields, bounds, cross-field rules, warnings, hash."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
from pydantic import ValidationError

from hydra_offload import (
    OffloadConfig,
    OffloadConfigWarning,
    PrefetchOffloadConfig,
    UVAOffloadConfig,
)


def build(backend: str = "auto", gb: float = 0, group: int = 0, k: int = 1, step: int = 1):
    return OffloadConfig(
        offload_backend=backend,
        uva={"cpu_offload_gb": gb},
        prefetch={
            "offload_group_size": group,
            "offload_num_in_group": k,
            "offload_prefetch_step": step,
        },
    )


def test_defaults_match_the_spec_table():
    cfg = OffloadConfig()
    assert cfg.offload_backend == "auto"
    assert cfg.uva == UVAOffloadConfig(cpu_offload_gb=0, cpu_offload_params=[])
    assert cfg.prefetch.offload_group_size == 0
    assert cfg.prefetch.offload_num_in_group == 1
    assert cfg.prefetch.offload_prefetch_step == 1
    assert cfg.prefetch.offload_params == frozenset()
    assert cfg.layers is None
    assert cfg.resolved_backend == "none"


@pytest.mark.parametrize(
    ("section", "field", "value", "error_type"),
    [
        ("uva", "cpu_offload_gb", -0.5, "greater_than_equal"),
        ("uva", "cpu_offload_gb", float("nan"), "finite_number"),
        ("uva", "cpu_offload_gb", float("inf"), "finite_number"),
        ("uva", "cpu_offload_gb", "4", "float_type"),
        ("uva", "cpu_offload_gb", True, "float_type"),
        ("prefetch", "offload_group_size", -1, "greater_than_equal"),
        ("prefetch", "offload_group_size", "8", "int_type"),
        ("prefetch", "offload_group_size", 8.0, "int_type"),
        ("prefetch", "offload_group_size", True, "int_type"),
        ("prefetch", "offload_num_in_group", 0, "greater_than_equal"),
        ("prefetch", "offload_prefetch_step", -1, "greater_than_equal"),
    ],
)
def test_field_bounds_and_types_are_enforced(section, field, value, error_type):
    with pytest.raises(ValidationError) as info:
        OffloadConfig.model_validate({section: {field: value}})
    (error,) = info.value.errors()
    assert error["loc"] == (section, field)
    assert error["type"] == error_type


@pytest.mark.parametrize("value", [0, 0.0, 1, 2.5, 1e-9])
def test_cpu_offload_gb_accepts_finite_non_negative_numbers(value):
    assert UVAOffloadConfig(cpu_offload_gb=value).cpu_offload_gb == float(value)


def test_unknown_backend_lists_the_allowed_values():
    with pytest.raises(ValidationError, match="'auto', 'uva' or 'prefetch'"):
        OffloadConfig(offload_backend="cuda")


# (backend, group, num_in_group, step) -> the error message, or None when valid.
CROSS_FIELD_RULES = [
    ("auto", 0, 1, 1, None),
    ("auto", 0, 5, 0, None),  # prefetch off: neither rule applies
    ("uva", 0, 3, 0, None),
    ("auto", 8, 2, 1, None),
    ("auto", 8, 8, 1, None),
    ("auto", 8, 9, 1, "offload_num_in_group (9) must be <= offload_group_size (8)"),
    ("uva", 4, 5, 1, "offload_num_in_group (5) must be <= offload_group_size (4)"),
    ("prefetch", 0, 1, 1, "offload_num_in_group (1) must be <= offload_group_size (0)"),
    ("prefetch", 2, 1, 1, None),
    (
        "prefetch",
        2,
        1,
        0,
        "offload_prefetch_step (0) must be >= 1 when prefetch offloading is enabled",
    ),
    ("auto", 4, 1, 0, "offload_prefetch_step (0) must be >= 1 when prefetch offloading is enabled"),
    ("auto", 4, 1, 3, None),
]


@pytest.mark.parametrize(("backend", "group", "k", "step", "message"), CROSS_FIELD_RULES)
def test_cross_field_rules_when_prefetch_is_on(backend, group, k, step, message):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OffloadConfigWarning)
        if message is None:
            build(backend, group=group, k=k, step=step)
        else:
            with pytest.raises(
                ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")
            ):
                build(backend, group=group, k=k, step=step)


# (backend, cpu_offload_gb, group_size) -> substring of the one warning, or None.
WARNINGS = [
    ("auto", 0, 0, None),
    ("auto", 2, 0, None),
    ("auto", 0, 4, None),
    ("auto", 2, 4, "prefetch backend will be selected"),
    ("uva", 2, 0, None),
    ("uva", 0, 4, "prefetch settings will be ignored"),
    ("uva", 2, 4, "prefetch settings will be ignored"),  # first match wins
    ("prefetch", 0, 4, None),
    ("prefetch", 2, 4, "UVA settings will be ignored"),
]


@pytest.mark.parametrize(("backend", "gb", "group", "expected"), WARNINGS)
def test_conflict_warnings_at_most_one_first_match_wins(backend, gb, group, expected):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build(backend, gb=gb, group=group)
    offload_warnings = [w for w in caught if issubclass(w.category, OffloadConfigWarning)]
    if expected is None:
        assert offload_warnings == []
    else:
        assert len(offload_warnings) == 1
        assert expected in str(offload_warnings[0].message)


def test_non_empty_selection_alone_activates_nothing():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = OffloadConfig(
            offload_backend="uva",
            uva={"cpu_offload_params": ["experts"]},
            prefetch={"offload_params": ["experts"]},
        )
    assert caught == []
    assert not cfg.uva_active
    assert not cfg.prefetch_active


def test_warning_is_an_offload_config_warning_pointing_at_the_callers_line():
    assert issubclass(OffloadConfigWarning, UserWarning)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = sys._getframe().f_lineno + 1
        OffloadConfig(offload_backend="uva", prefetch={"offload_group_size": 2})
    (warning,) = caught
    assert warning.filename == __file__
    assert warning.lineno == line


@pytest.mark.parametrize(
    ("backend", "gb", "group", "resolved"),
    [
        ("auto", 0, 0, "none"),
        ("auto", 1, 0, "uva"),
        ("auto", 0, 2, "prefetch"),
        ("auto", 1, 2, "prefetch"),
        ("uva", 0, 0, "uva"),
        ("uva", 1, 2, "uva"),
        ("prefetch", 0, 2, "prefetch"),
        ("prefetch", 1, 2, "prefetch"),
    ],
)
def test_resolved_backend_follows_the_auto_rule(backend, gb, group, resolved):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OffloadConfigWarning)
        assert build(backend, gb=gb, group=group).resolved_backend == resolved


@pytest.mark.parametrize(
    ("data", "loc", "hint"),
    [
        ({"offload_backnd": "uva"}, (), "did you mean 'offload_backend'?"),
        ({"prefetch": {"offload_group_sise": 8}}, ("prefetch",), "'offload_group_size'"),
        ({"uva": {"cpu_offload_GB": 1}}, ("uva",), "allowed keys: cpu_offload_gb"),
    ],
)
def test_unknown_keys_are_rejected_by_name_with_the_allowed_keys(data, loc, hint):
    with pytest.raises(ValidationError) as info:
        OffloadConfig.model_validate(data)
    (error,) = info.value.errors()
    assert error["type"] == "unknown_key"
    assert error["loc"] == loc
    unknown = next(iter(data[loc[0]] if loc else data))
    assert f"unknown key '{unknown}'" in error["msg"]
    assert hint in error["msg"]


@pytest.mark.parametrize("value", [["experts", "w2"], ("experts", "w2"), {"experts", "w2"}])
def test_segment_sets_accept_lists_tuples_and_sets(value):
    assert UVAOffloadConfig(cpu_offload_params=value).cpu_offload_params == {"experts", "w2"}
    assert PrefetchOffloadConfig(offload_params=value).offload_params == {"experts", "w2"}


@pytest.mark.parametrize("model", [UVAOffloadConfig, PrefetchOffloadConfig])
def test_a_bare_string_for_a_segment_set_says_to_use_a_list(model):
    field = "cpu_offload_params" if model is UVAOffloadConfig else "offload_params"
    with pytest.raises(
        ValidationError, match=r"must be a list of name segments, e\.g\. \[experts\]"
    ):
        model(**{field: "experts"})


@pytest.mark.parametrize("bad", [[""], ["a..b"], [".experts"], ["experts "], [3], [None]])
def test_malformed_segments_are_rejected(bad):
    with pytest.raises(ValidationError, match="cpu_offload_params"):
        UVAOffloadConfig(cpu_offload_params=bad)


def test_config_is_frozen():
    cfg = OffloadConfig()
    with pytest.raises(ValidationError, match="frozen"):
        cfg.offload_backend = "uva"
    with pytest.raises(ValidationError, match="frozen"):
        cfg.prefetch.offload_group_size = 4
    assert isinstance(cfg.uva.cpu_offload_params, frozenset)


@pytest.mark.parametrize(
    ("value", "stored", "paths"),
    [
        (None, None, None),
        ("model.layers", "model.layers", ("model.layers",)),
        (["model.layers"], "model.layers", ("model.layers",)),
        (["encoder.block", "decoder.block"], ("encoder.block", "decoder.block"),
         ("encoder.block", "decoder.block")),
    ],
)  # fmt: skip
def test_layers_takes_a_path_or_a_list_of_paths(value, stored, paths):
    cfg = OffloadConfig(layers=value)
    assert cfg.layers == stored
    assert cfg.layer_paths == paths


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([], "at least one module path"),
        (["a", "a"], "names a path twice"),
        ("model..layers", "not a valid module path"),
        (3, "must be null, a dotted module path or a list"),
    ],
)
def test_bad_layers_values_are_rejected(value, message):
    with pytest.raises(ValidationError, match=message):
        OffloadConfig(layers=value)


def test_hash_is_a_hex_sha256_and_equal_for_equal_configs():
    a = build(group=8, k=2)
    b = OffloadConfig.model_validate(
        {"prefetch": {"offload_group_size": 8, "offload_num_in_group": 2}}
    )
    assert a == b
    assert a.compute_hash() == b.compute_hash()
    assert len(a.compute_hash()) == 64
    int(a.compute_hash(), 16)


# Eight members: a set iterates in sorted order only by chance (1 in 8!). Two sets built in
# different orders often iterate alike within one process, so only a pinned digest shows that
# no order, in any process, reaches the hash.
SEGMENTS = ["experts", "w2_weight", "gate", "up_proj", "down_proj", "q_proj", "k_proj", "v_proj"]


@pytest.mark.parametrize(
    ("section", "field", "digest"),
    [
        ("uva", "cpu_offload_params",
         "3a3ce22359b381925af07022b1a825dfd39ec5a6031482e8f5dca58a3d24d958"),
        ("prefetch", "offload_params",
         "ab6cd2f4fe21ca1d10e9cee11c70cf367aca0b333545aac46594a6e99895ace7"),
    ],
    ids=["uva", "prefetch"],
)  # fmt: skip
def test_hash_ignores_the_order_of_set_members(section, field, digest):
    orders = [SEGMENTS, SEGMENTS[::-1], tuple(sorted(SEGMENTS)), set(SEGMENTS)]
    digests = {
        OffloadConfig.model_validate({section: {field: members}}).compute_hash()
        for members in orders
    }
    assert digests == {digest}


def test_hash_keeps_the_order_of_layer_stacks():
    forward = OffloadConfig(layers=["encoder.block", "decoder.block"])
    backward = OffloadConfig(layers=["decoder.block", "encoder.block"])
    assert forward.compute_hash() != backward.compute_hash()


CHANGES = [
    {"offload_backend": "uva"},
    {"uva": {"cpu_offload_gb": 0.5}},
    {"uva": {"cpu_offload_params": ["experts"]}},
    {"prefetch": {"offload_group_size": 4}},
    {"prefetch": {"offload_num_in_group": 2}},
    {"prefetch": {"offload_prefetch_step": 2}},
    {"prefetch": {"offload_params": ["experts"]}},
    {"layers": "model.layers"},
    {"layers": ["encoder.block", "decoder.block"]},
    {"share_host_memory": False},
]


def test_hash_changes_when_any_field_changes():
    digests = {OffloadConfig().compute_hash()}
    for change in CHANGES:
        digests.add(OffloadConfig.model_validate(change).compute_hash())
    assert len(digests) == len(CHANGES) + 1


# compute_hash() of these settings, computed once: the docs promise the same digest in
# every process and Python version, and plans and Lightning checkpoints record it. A change of
# the hash format must change the schema version in the payload, and these values with it.
PINNED_HASHES = [
    pytest.param(
        {}, "2e6ddb73af4e856a46e23dd027992d4c89a0a69be51917acf861eaccdcc97776", id="default"
    ),
    pytest.param(
        {
            "offload_backend": "uva",
            "uva": {
                "cpu_offload_gb": 2.5,
                "cpu_offload_params": ["shared_experts", "experts", "gate", "w1", "w2", "w3"],
            },
        },
        "fb61330e7ef7332af88a5176cc0c6705a13981407c4c7635f0533f4cb5e686ea",
        id="uva",
    ),
    pytest.param(
        {
            "prefetch": {
                "offload_group_size": 8,
                "offload_num_in_group": 2,
                "offload_prefetch_step": 2,
                "offload_params": ["self_attn.q_proj", "mlp", "@experts"],
            },
            "layers": ["encoder.block", "decoder.block"],
        },
        "bb414dda687ffd5d9c4580bde7e0f19dea64f2d14384f55339e3602d5e29f678",
        id="prefetch-params-and-layers",
    ),
    pytest.param(  # the run summary shown in README.md and docs/getting-started.md
        {"offload_backend": "prefetch", "prefetch": {"offload_group_size": 8}},
        "ef5febca912589a4bc0f7632ffcb52b04b61cc700bd91b935177c2438e0df66e",
        id="readme-run",
    ),
]


@pytest.mark.parametrize(("data", "digest"), PINNED_HASHES)
def test_hash_values_are_pinned(data, digest):
    assert OffloadConfig.model_validate(data).compute_hash() == digest


@pytest.mark.parametrize("seed", ["1", "2"])
def test_pinned_hash_values_do_not_depend_on_the_string_hash_seed(seed):
    configs = [p.values[0] for p in PINNED_HASHES]
    code = (
        "import json, sys; from hydra_offload import OffloadConfig; "
        "print(json.dumps([OffloadConfig.model_validate(d).compute_hash() "
        "for d in json.loads(sys.argv[1])]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(configs)],
        env={**os.environ, "PYTHONHASHSEED": seed}, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert json.loads(out.stdout) == [p.values[1] for p in PINNED_HASHES]


def test_dump_round_trips_and_lists_sets_sorted():
    cfg = OffloadConfig(uva={"cpu_offload_gb": 2, "cpu_offload_params": ["b", "a"]})
    dumped = cfg.model_dump(mode="json")
    assert dumped["uva"]["cpu_offload_params"] == ["a", "b"]
    assert OffloadConfig.model_validate(dumped) == cfg
