"""The Hydra side: the shipped ``offload`` group, the schema, and ``to_offload_config``."""

from __future__ import annotations

import importlib.resources
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from hydra_offload import OffloadConfig, OffloadConfigError, plan_offload, to_offload_config
from hydra_offload.models import DecoderLM

APP_DIR = Path(__file__).parent / "hydra_app"


def compose_app(*overrides: str):
    """Compose the plain test app's config (it names the offload group, nothing more)."""
    with initialize_config_dir(config_dir=str(APP_DIR / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_group_files_ship_inside_the_installed_package():
    group = importlib.resources.files("hydra_offload.conf") / "offload"
    assert sorted(p.name for p in group.iterdir() if p.name.endswith(".yaml")) == [
        "none.yaml",
        "prefetch.yaml",
        "uva.yaml",
    ]


@pytest.mark.parametrize(
    ("option", "backend"), [("none", "none"), ("uva", "uva"), ("prefetch", "prefetch")]
)
def test_each_group_option_composes_into_a_valid_config(option, backend):
    cfg = compose_app(f"offload={option}")
    assert to_offload_config(cfg.offload).resolved_backend == backend


@pytest.mark.parametrize(
    ("option", "offloads"), [("none", False), ("uva", True), ("prefetch", True)]
)
def test_group_option_alone_offloads_something_on_a_real_model(option, offloads):
    torch.manual_seed(0)
    model = DecoderLM(num_layers=4)
    plan = plan_offload(model, compose_app(f"offload={option}").offload)
    assert (plan.offloaded_bytes > 0) is offloads
    assert (plan.device_bytes_saved > 0) is offloads


def test_overrides_reach_the_validated_config():
    cfg = compose_app(
        "offload=prefetch",
        "offload.prefetch.offload_group_size=8",
        "offload.prefetch.offload_num_in_group=2",
        "offload.prefetch.offload_params=[experts,w2_weight]",
        "offload.layers=model.layers",
    )
    offload = to_offload_config(cfg.offload)
    assert offload.prefetch.offload_group_size == 8
    assert offload.prefetch.offload_num_in_group == 2
    assert offload.prefetch.offload_params == {"experts", "w2_weight"}
    assert offload.layers == "model.layers"


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("offload.prefetch.offload_group_size=abc", "offload.prefetch.offload_group_size"),
        ("offload.uva.cpu_offload_gb=lots", "offload.uva.cpu_offload_gb"),
        ("offload.offload_backend=cuda", "expected one of [auto, uva, prefetch]"),
        ("offload.uva.cpu_offload_params=experts", "offload.uva.cpu_offload_params"),
    ],
)
def test_compose_rejects_wrong_types(override, fragment):
    with pytest.raises(ConfigCompositionException) as info:
        compose_app("offload=prefetch", override)
    cause = info.value.__cause__ or info.value
    assert fragment in f"{info.value} {cause}"


@pytest.mark.parametrize("plus", ["", "+"])
def test_an_unknown_key_is_refused_by_validation_naming_the_allowed_keys(plus):
    # Hydra's own refusal would suggest forcing the key in with `+`, which only defers the
    # error: the schema lets it through, and validation (at job start, in a Hydra job)
    # refuses it with the keys allowed there.
    cfg = compose_app("offload=prefetch", f"{plus}offload.prefetch.offload_group_sise=3")
    with pytest.raises(OffloadConfigError) as info:
        to_offload_config(cfg.offload)
    assert str(info.value) == (
        "offload.prefetch.offload_group_sise: unknown key; did you mean 'offload_group_size'? "
        "allowed keys: offload_group_size, offload_num_in_group, offload_prefetch_step, "
        "offload_params"
    )


def test_the_schema_is_not_an_option_of_the_group():
    with pytest.raises(ConfigCompositionException) as info:
        compose_app("offload=schema")
    message = str(info.value)
    assert "Could not find 'offload/schema'" in message
    assert "Available options in 'offload':\n\tnone\n\tprefetch\n\tuva\n" in message


def test_compose_users_get_only_the_offload_node_and_hydra_gets_the_job_callback():
    assert list(compose_app("offload=prefetch")) == ["offload", "app_name"]
    with initialize_config_dir(config_dir=str(APP_DIR / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True)
    assert OmegaConf.to_container(cfg.hydra.callbacks) == {
        "hydra_offload": {
            "_target_": "hydra_offload.integrations.hydra_callback.OffloadJobCallback"
        }
    }


def test_dictconfig_with_interpolations_is_resolved():
    node = OmegaConf.create(
        {"g": 4, "offload": {"prefetch": {"offload_group_size": "${g}"}}}
    ).offload
    assert to_offload_config(node).prefetch.offload_group_size == 4


def test_offload_config_passes_through_unchanged():
    cfg = OffloadConfig(uva={"cpu_offload_gb": 1})
    assert to_offload_config(cfg) is cfg


def test_plain_dict_with_nested_dictconfig_is_accepted():
    data = {"uva": OmegaConf.create({"cpu_offload_gb": 2, "cpu_offload_params": ["experts"]})}
    assert to_offload_config(data).uva.cpu_offload_params == {"experts"}


# A bad value -> the dotted key the error must start with, and fragments it must contain.
BAD_INPUTS = [
    (
        {"prefetch": {"offload_group_size": 2, "offload_num_in_group": 3}},
        "offload.prefetch.offload_num_in_group",
        ["got 3", "must be <= offload_group_size (2)"],
    ),
    (
        {"offload_backend": "prefetch"},
        "offload.prefetch.offload_num_in_group",
        ["got 1", "must be <= offload_group_size (0)"],
    ),
    (
        {"prefetch": {"offload_group_size": 2, "offload_prefetch_step": 0}},
        "offload.prefetch.offload_prefetch_step",
        ["got 0", "must be >= 1 when prefetch offloading is enabled"],
    ),
    ({"uva": {"cpu_offload_gb": -1}}, "offload.uva.cpu_offload_gb", ["got -1", ">= 0"]),
    ({"uva": {"cpu_offload_gb": float("inf")}}, "offload.uva.cpu_offload_gb", ["finite"]),
    ({"uva": {"cpu_offload_gb": "4"}}, "offload.uva.cpu_offload_gb", ["got '4'", "number"]),
    (
        {"prefetch": {"offload_group_size": "8"}},
        "offload.prefetch.offload_group_size",
        ["got '8'", "integer"],
    ),
    (
        {"offload_backend": "gpu"},
        "offload.offload_backend",
        ["got 'gpu'", "'auto', 'uva' or 'prefetch'"],
    ),
    (
        {"prefetch": {"offload_group_sise": 8}},
        "offload.prefetch.offload_group_sise",
        ["unknown key", "did you mean 'offload_group_size'", "allowed keys"],
    ),
    ({"backend": "uva"}, "offload.backend", ["unknown key", "allowed keys: offload_backend"]),
    (
        {"uva": {"cpu_offload_params": "experts"}},
        "offload.uva.cpu_offload_params",
        ["got 'experts'", "must be a list of name segments, e.g. [experts]"],
    ),
    ({"layers": []}, "offload.layers", ["at least one module path"]),
]


@pytest.mark.parametrize(("data", "key", "fragments"), BAD_INPUTS)
def test_errors_name_the_full_dotted_key_the_value_and_what_is_allowed(data, key, fragments):
    with pytest.raises(OffloadConfigError) as info:
        to_offload_config(data)
    message = str(info.value)
    assert message.startswith(f"{key}: ")
    for fragment in fragments:
        assert fragment in message
    assert "pydantic" not in message


def test_several_problems_give_one_line_each():
    with pytest.raises(OffloadConfigError) as info:
        to_offload_config({"uva": {"cpu_offload_gb": -1}, "prefetch": {"offload_group_size": -1}})
    assert [key for key, _ in info.value.problems] == [
        "offload.uva.cpu_offload_gb",
        "offload.prefetch.offload_group_size",
    ]
    assert len(str(info.value).splitlines()) == 2


def test_error_prefix_follows_the_key_argument():
    with pytest.raises(OffloadConfigError, match=r"^model\.offload\.uva\.cpu_offload_gb: "):
        to_offload_config({"uva": {"cpu_offload_gb": -1}}, key="model.offload")


def test_a_non_mapping_is_refused():
    with pytest.raises(OffloadConfigError, match="expected a mapping"):
        to_offload_config(["uva"])


@pytest.fixture
def plain_app(tmp_path: Path) -> Path:
    """The plain app copied outside the source tree, so only the installed package serves it."""
    target = tmp_path / "app"
    shutil.copytree(APP_DIR, target)
    return target


def run_app(app: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(app / "app.py"), f"hydra.run.dir={app / 'out'}", *overrides],
        cwd=app,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_any_hydra_app_finds_the_group_through_the_installed_plugin(plain_app):
    result = run_app(plain_app, "offload=prefetch", "offload.prefetch.offload_group_size=8")
    assert result.returncode == 0, result.stderr
    composed = OmegaConf.create(result.stdout)
    assert composed.offload.offload_backend == "prefetch"
    assert composed.offload.prefetch.offload_group_size == 8
    assert composed.app_name == "plain-hydra-app"


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        # refused while composing
        ("offload.prefetch.offload_group_size=abc", "offload.prefetch.offload_group_size"),
        # refused when the job starts, by the callback the group adds to hydra.callbacks
        ("offload.prefetch.offload_group_sise=3", "error: offload.prefetch.offload_group_sise"),
    ],
)
def test_the_plain_app_refuses_bad_settings_before_its_task_runs(plain_app, override, fragment):
    result = run_app(plain_app, "offload=prefetch", override)
    assert result.returncode != 0
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr
    assert "plain-hydra-app" not in result.stdout  # the task prints the config: it never ran


def test_the_plugin_does_not_load_torch_into_every_hydra_app():
    # Hydra imports the plugin in every app, and builds the job callback in every app that
    # selects the group.
    code = (
        "import sys, hydra_plugins.hydra_offload.searchpath; "
        "import hydra_offload.integrations.hydra_callback; "
        "print('torch' in sys.modules, 'lightning' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.split() == ["False", "False"]


STRUCTURED_APP = """
from dataclasses import dataclass, field
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore


@dataclass
class Config:
    defaults: list = field(default_factory=lambda: ["_self_", {{"offload": "prefetch"}}])
    lr: float = 0.1
{declaration}

ConfigStore.instance().store(name="config", node=Config)


@hydra.main(version_base="1.3", config_name="config", config_path=None)
def main(cfg) -> None:
    print("offload_group_size", cfg.offload.prefetch.offload_group_size)


main()
"""


@pytest.mark.parametrize("declared", [False, True], ids=["undeclared", "declared"])
def test_a_structured_config_without_an_offload_field_gets_one_line_saying_what_to_declare(
    tmp_path, declared
):
    app = tmp_path / "app.py"
    declaration = "    offload: Any = None" if declared else ""
    app.write_text(STRUCTURED_APP.format(declaration=declaration))
    result = subprocess.run(
        [sys.executable, str(app), f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if declared:
        assert result.returncode == 0, result.stderr
        assert "offload_group_size 2" in result.stdout
        return
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [EXPLAINED]  # and nothing else: no hint about stack traces
    assert result.stdout == ""


EXPLAINED = (
    "the primary config Config (a structured config) has no field 'offload' for the "
    "offload group to fill: declare `offload: Any = None` in it (hydra-zen: "
    "make_config(offload=None, ...))"
)


def test_with_hydra_full_error_the_explained_error_comes_with_its_stack_trace(tmp_path):
    app = tmp_path / "app.py"
    app.write_text(STRUCTURED_APP.format(declaration=""))
    result = subprocess.run(
        [sys.executable, str(app), f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={**os.environ, "HYDRA_FULL_ERROR": "1"},
    )  # fmt: skip
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert f"ConfigCompositionException: {EXPLAINED}" in result.stderr


def test_compose_raises_the_explained_error():
    from dataclasses import dataclass, field

    from hydra import initialize
    from hydra.core.config_store import ConfigStore

    @dataclass
    class Config:
        defaults: list = field(default_factory=lambda: ["_self_", {"offload": "prefetch"}])
        lr: float = 0.1

    ConfigStore.instance().store(name="undeclared_offload_app", node=Config)
    with (
        initialize(version_base="1.3", config_path=None),
        pytest.raises(ConfigCompositionException) as raised,
    ):
        compose("undeclared_offload_app")
    assert str(raised.value) == EXPLAINED
