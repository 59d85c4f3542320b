"""Bad offload settings, one table, every entry point: each gives one clear message that names
the key, the bad value (where there is one) and what is allowed.

The table rows are ``(id, settings, key, fragments)``: ``settings`` is the nested mapping of
the bad ``offload`` settings (on top of the defaults), ``key`` the dotted key below
``offload`` the message must name, ``fragments`` what ``to_offload_config``'s one line must
contain (the value as ``got <repr>`` and what is allowed). The same rows drive the Python
constructor, ``to_offload_config``, Hydra overrides, YAML files, ``run.py`` and LightningCLI.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from pydantic import ValidationError

from hydra_offload import OffloadConfig, OffloadConfigError, to_offload_config

ROOT = Path(__file__).resolve().parents[1]
APP_CONF = Path(__file__).parent / "hydra_app" / "conf"
LIGHTNING_APPS = Path(__file__).parent / "lightning_apps"

BACKENDS = "'auto', 'uva' or 'prefetch'"
TOP_KEYS = "allowed keys: offload_backend, uva, prefetch, layers"
UVA_KEYS = "allowed keys: cpu_offload_gb, cpu_offload_params"
PREFETCH_KEYS = (
    "allowed keys: offload_group_size, offload_num_in_group, offload_prefetch_step, offload_params"
)
SELECTORS = "selectors are @attention, @mlp, @experts, @embeddings"
SEGMENT_RULE = "use dot-separated names without spaces or empty parts"


def uva(**kw: Any) -> dict[str, Any]:
    return {"uva": kw}


def pre(**kw: Any) -> dict[str, Any]:
    return {"prefetch": kw}


GB = "uva.cpu_offload_gb"
GROUP = "prefetch.offload_group_size"
NUM = "prefetch.offload_num_in_group"
STEP = "prefetch.offload_prefetch_step"
UVA_PARAMS = "uva.cpu_offload_params"
PRE_PARAMS = "prefetch.offload_params"

# fmt: off
ROWS: list[Any] = [
    # --- numbers out of range ---------------------------------------------------------------
    ("gb-negative", uva(cpu_offload_gb=-1.0), GB, ["got -1.0", "expected a value >= 0"]),
    ("gb-negative-small", uva(cpu_offload_gb=-0.5), GB, ["got -0.5", "expected a value >= 0"]),
    ("gb-nan", uva(cpu_offload_gb=math.nan), GB, ["got nan", "expected a finite number"]),
    ("gb-inf", uva(cpu_offload_gb=math.inf), GB, ["got inf", "expected a finite number"]),
    ("gb-minus-inf", uva(cpu_offload_gb=-math.inf), GB, ["got -inf", "expected a finite number"]),
    ("group-negative", pre(offload_group_size=-1), GROUP, ["got -1", "expected a value >= 0"]),
    ("num-zero", pre(offload_num_in_group=0), NUM, ["got 0", "expected a value >= 1"]),
    ("num-negative", pre(offload_num_in_group=-2), NUM, ["got -2", "expected a value >= 1"]),
    # --- numbers in the wrong form ----------------------------------------------------------
    ("gb-string-number", uva(cpu_offload_gb="4"), GB, ["got '4'", "expected a number"]),
    ("gb-string-word", uva(cpu_offload_gb="abc"), GB, ["got 'abc'", "expected a number"]),
    ("gb-bool", uva(cpu_offload_gb=True), GB, ["got True", "expected a number"]),
    ("group-string-number", pre(offload_group_size="4"), GROUP,
     ["got '4'", "expected an integer"]),
    ("group-string-word", pre(offload_group_size="abc"), GROUP,
     ["got 'abc'", "expected an integer"]),
    ("group-bool", pre(offload_group_size=True), GROUP, ["got True", "expected an integer"]),
    ("group-float", pre(offload_group_size=8.5), GROUP, ["got 8.5", "expected an integer"]),
    ("num-float", pre(offload_group_size=8, offload_num_in_group=1.5), NUM,
     ["got 1.5", "expected an integer"]),
    ("step-bool", pre(offload_prefetch_step=False), STEP, ["got False", "expected an integer"]),
    ("step-string", pre(offload_prefetch_step="2"), STEP, ["got '2'", "expected an integer"]),
    # --- cross-field rules when prefetch is on ----------------------------------------------
    ("num-over-group", pre(offload_group_size=2, offload_num_in_group=3), NUM,
     ["got 3", "offload_num_in_group (3) must be <= offload_group_size (2)"]),
    ("num-over-group-large", pre(offload_group_size=8, offload_num_in_group=9), NUM,
     ["got 9", "offload_num_in_group (9) must be <= offload_group_size (8)"]),
    ("num-over-group-one", pre(offload_group_size=1, offload_num_in_group=2), NUM,
     ["got 2", "offload_num_in_group (2) must be <= offload_group_size (1)"]),
    ("backend-prefetch-group-zero", {"offload_backend": "prefetch"}, NUM,
     ["got 1", "offload_num_in_group (1) must be <= offload_group_size (0)"]),
    ("step-zero-group-on", pre(offload_group_size=4, offload_prefetch_step=0), STEP,
     ["got 0", "offload_prefetch_step (0) must be >= 1"]),
    ("step-zero-backend-prefetch",
     {"offload_backend": "prefetch", **pre(offload_group_size=2, offload_prefetch_step=0)},
     STEP, ["got 0", "offload_prefetch_step (0) must be >= 1"]),
    # --- backend ----------------------------------------------------------------------------
    ("backend-cuda", {"offload_backend": "cuda"}, "offload_backend", ["got 'cuda'", BACKENDS]),
    ("backend-upper", {"offload_backend": "UVA"}, "offload_backend", ["got 'UVA'", BACKENDS]),
    ("backend-empty", {"offload_backend": ""}, "offload_backend", ["got ''", BACKENDS]),
    # --- unknown keys -----------------------------------------------------------------------
    ("typo-group-size", pre(offload_group_sise=2), "prefetch.offload_group_sise",
     ["unknown key", "did you mean 'offload_group_size'?", PREFETCH_KEYS]),
    ("typo-gb-case", uva(cpu_offload_GB=4.0), "uva.cpu_offload_GB",
     ["unknown key", "did you mean 'cpu_offload_gb'?", UVA_KEYS]),
    ("typo-backend", {"offload_backnd": "uva"}, "offload_backnd",
     ["unknown key", "did you mean 'offload_backend'?", TOP_KEYS]),
    ("typo-section", {"prefetc": {"offload_group_size": 2}}, "prefetc",
     ["unknown key", "did you mean 'prefetch'?", TOP_KEYS]),
    ("unrelated-top", {"learning_rate": 0.1}, "learning_rate", ["unknown key", TOP_KEYS]),
    ("unrelated-uva", uva(zzz=1), "uva.zzz", ["unknown key", UVA_KEYS]),
    ("unrelated-prefetch", pre(batch_size=4), "prefetch.batch_size",
     ["unknown key", PREFETCH_KEYS]),
    # --- the set fields ---------------------------------------------------------------------
    ("uva-params-bare-string", uva(cpu_offload_params="experts"), UVA_PARAMS,
     ["got 'experts'", "must be a list of name segments, e.g. [experts]"]),
    ("pre-params-bare-string", pre(offload_params="mlp"), PRE_PARAMS,
     ["got 'mlp'", "must be a list of name segments, e.g. [mlp]"]),
    ("uva-params-int-member", uva(cpu_offload_params=["experts", 3]), UVA_PARAMS,
     ["got ['experts', 3]", "must be a string, got 3 (int)"]),
    ("pre-params-none-member", pre(offload_params=[None]), PRE_PARAMS,
     ["got [None]", "must be a string, got None (NoneType)"]),
    ("params-empty-segment", uva(cpu_offload_params=[""]), UVA_PARAMS,
     ["got ['']", "'' is not a valid name segment", SEGMENT_RULE]),
    ("params-double-dot", pre(offload_params=["a..b"]), PRE_PARAMS,
     ["got ['a..b']", "'a..b' is not a valid name segment", SEGMENT_RULE]),
    ("params-leading-space", uva(cpu_offload_params=[" experts"]), UVA_PARAMS,
     ["got [' experts']", "' experts' is not a valid name segment", SEGMENT_RULE]),
    ("selector-singular", uva(cpu_offload_params=["@expert"]), UVA_PARAMS,
     ["got ['@expert']", "'@expert' is not a selector", SELECTORS]),
    ("selector-case", pre(offload_params=["@MLP"]), PRE_PARAMS,
     ["got ['@MLP']", "'@MLP' is not a selector", SELECTORS]),
    # --- layers -----------------------------------------------------------------------------
    ("layers-empty-list", {"layers": []}, "layers",
     ["got []", "layers must name at least one module path, or be null to auto-detect"]),
    ("layers-repeated", {"layers": ["model.layers", "model.layers"]}, "layers",
     ["got ['model.layers', 'model.layers']", "layers names a path twice"]),
    ("layers-double-dot", {"layers": "model..layers"}, "layers",
     ["got 'model..layers'", "is not a valid module path", SEGMENT_RULE]),
    ("layers-int", {"layers": 3}, "layers",
     ["got 3", "layers must be null, a dotted module path or a list of them; got int"]),
    ("layers-dict", {"layers": {"model": "layers"}}, "layers",
     ["got {'model': 'layers'}", "layers must be null, a dotted module path or a list"]),
    ("layers-int-member", {"layers": ["model.layers", 7]}, "layers",
     ["got ['model.layers', 7]", "must be a string, got 7 (int)"]),
]
# fmt: on

# Rows that a command-line override cannot express as a bad value: Hydra's schema converts it
# into a good one (or the override grammar cannot write it), so nothing is left to reject.
NOT_AN_OVERRIDE = {
    "gb-string-number": "OmegaConf converts the string '4' to the float 4.0 for a float field",
    "group-string-number": "OmegaConf converts the string '4' to the int 4 for an int field",
    "step-string": "OmegaConf converts the string '2' to the int 2 for an int field",
    "uva-params-int-member": "OmegaConf converts the int 3 to the string '3' in a list[str]",
}

YAML_ROWS = [
    "gb-negative",
    "gb-nan",
    "group-float",
    "num-over-group",
    "step-zero-group-on",
    "backend-cuda",
    "typo-group-size",
    "uva-params-bare-string",
    "selector-singular",
    "layers-repeated",
]

CLI_ROWS = ["gb-negative", "num-over-group", "backend-cuda", "typo-group-size"]
# Of those, the rows Hydra's schema refuses while composing, with its own message: the job
# never starts. The others (unknown keys included) reach to_offload_config when the job
# starts, which ends it with one line.
COMPOSE_ROWS = ["backend-cuda"]

LIGHTNING_ROWS = ["num-over-group", "gb-negative", "backend-upper"]

BY_ID = {row[0]: row for row in ROWS}


def table(ids: list[str] | None = None) -> list[Any]:
    rows = ROWS if ids is None else [BY_ID[i] for i in ids]
    return [pytest.param(*row[1:], id=row[0]) for row in rows]


# --- helpers -----------------------------------------------------------------------------


def to_pydantic(fragment: str) -> str:
    """A fragment of ``to_offload_config``'s line as pydantic's own message words it."""
    if fragment.startswith("got "):
        return "input_value=" + fragment[4:]
    for ours, theirs in [
        ("expected a value >= ", "greater than or equal to "),
        ("expected an integer", "valid integer"),
        ("expected a number", "valid number"),
        ("expected a finite number", "finite number"),
    ]:
        if fragment.startswith(ours):
            return theirs + fragment[len(ours) :]
    return fragment


def literal(value: Any) -> str:
    """A value in Hydra's override grammar."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return "'" + value.replace("'", "\\'") + "'"
    if isinstance(value, list):
        return "[" + ",".join(literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{literal(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


def overrides(settings: dict[str, Any], prefix: str = "offload") -> list[str]:
    """``offload.a.b=value`` for every leaf of ``settings`` (``layers`` is always a leaf)."""
    out = []
    for name, value in settings.items():
        path = f"{prefix}.{name}"
        if isinstance(value, dict) and name != "layers":
            out += overrides(value, path)
        else:
            out.append(f"{path}={literal(value)}")
    return out


def chain(err: BaseException) -> str:
    """An exception's message with those of its causes."""
    parts = []
    while err is not None:
        parts.append(str(err))
        err = err.__cause__ or err.__context__
    return "\n".join(parts)


def check_line(err: OffloadConfigError, key: str, fragments: list[str]) -> None:
    line = str(err)
    assert "\n" not in line, line
    assert line.startswith(f"offload.{key}: "), line
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    assert "pydantic" not in line
    assert "Traceback" not in line


def check_composed(conf_dir: Path, args: list[str], key: str, fragments: list[str]) -> None:
    """Composition fails naming the key, or the composed node fails validation naming it."""
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        try:
            cfg = compose(config_name="config", overrides=args)
        except ConfigCompositionException as err:
            text = chain(err)
            assert f"offload.{key}" in text, text
            return
    with pytest.raises(OffloadConfigError) as info:
        to_offload_config(cfg.offload)
    check_line(info.value, key, fragments)


# --- 1. the Python constructor -----------------------------------------------------------


@pytest.mark.parametrize(("settings", "key", "fragments"), table())
def test_model_validate_names_the_key_and_value(settings, key, fragments):
    with pytest.raises(ValidationError) as info:
        OffloadConfig.model_validate(settings)
    text = str(info.value)
    assert key.rsplit(".", 1)[-1] in text, text
    for fragment in fragments:
        if fragment.startswith("got ") and to_pydantic(fragment) not in text:
            # A cross-field rule's input is the whole mapping: the value is in the words.
            assert f"({fragment[4:]})" in text, (fragment, text)
        else:
            assert to_pydantic(fragment) in text, (to_pydantic(fragment), text)


@pytest.mark.parametrize(("settings", "key", "fragments"), table())
def test_keyword_constructor_raises_the_same(settings, key, fragments):
    with pytest.raises(ValidationError) as info:
        OffloadConfig(**settings)
    assert key.rsplit(".", 1)[-1] in str(info.value)


# --- 2. to_offload_config ----------------------------------------------------------------


@pytest.mark.parametrize(("settings", "key", "fragments"), table())
def test_to_offload_config_gives_one_line_naming_the_dotted_key(settings, key, fragments):
    with pytest.raises(OffloadConfigError) as info:
        to_offload_config(settings)
    check_line(info.value, key, fragments)
    assert info.value.problems == [(f"offload.{key}", str(info.value).split(": ", 1)[1])]


# --- 3. Hydra command-line overrides -----------------------------------------------------


@pytest.mark.parametrize(("settings", "key", "fragments"), table())
def test_hydra_override_fails_naming_the_key(request, settings, key, fragments):
    row_id = request.node.callspec.id
    if row_id in NOT_AN_OVERRIDE:
        pytest.skip(NOT_AN_OVERRIDE[row_id])
    check_composed(APP_CONF, overrides(settings), key, fragments)


def test_override_builder_writes_hydra_syntax():
    assert overrides({"prefetch": {"offload_group_size": -1}}) == [
        "offload.prefetch.offload_group_size=-1"
    ]
    assert overrides({"layers": ["a", "b"]}) == ["offload.layers=['a','b']"]
    assert overrides({"uva": {"cpu_offload_gb": math.nan}}) == ["offload.uva.cpu_offload_gb=nan"]


# --- 4. YAML files -----------------------------------------------------------------------


@pytest.mark.parametrize(("settings", "key", "fragments"), table(YAML_ROWS))
def test_yaml_file_fails_naming_the_key(tmp_path, settings, key, fragments):
    document = {"defaults": [{"offload": "none"}, "_self_"], "offload": settings}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(document))
    check_composed(tmp_path, [], key, fragments)


# --- 5. run.py and 6. LightningCLI, in subprocesses ---------------------------------------
# Every process is started at once (module fixture) and each test reads its own result, so
# the imports of torch and Lightning overlap instead of adding up.


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}


def run_py_command(tmp: Path, settings: dict[str, Any]) -> list[str]:
    dirs = [f"hydra.run.dir={tmp / 'run'}", f"hydra.sweep.dir={tmp / 'sweep'}"]
    args = ["+dry_run=true", "offload=prefetch", *overrides(settings), *dirs]
    return [sys.executable, str(ROOT / "run.py"), *args]


def lightning_command(settings: dict[str, Any]) -> list[str]:
    flow = yaml.safe_dump(settings, default_flow_style=True).strip()
    return [
        sys.executable,
        "cli.py",
        "predict",
        "--trainer.accelerator=cpu",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.callbacks+=hydra_offload.OffloadCallback",
        f"--trainer.callbacks.config={flow}",
    ]


@pytest.fixture(scope="module")
def processes(tmp_path_factory) -> dict[tuple[str, str], tuple[int, str, str]]:
    """``(entry, row id) -> (exit code, stdout, stderr)`` for every subprocess row."""
    started = {}
    for row_id in CLI_ROWS:
        tmp = tmp_path_factory.mktemp(f"run-{row_id}")
        command = run_py_command(tmp, BY_ID[row_id][1])
        started["run.py", row_id] = subprocess.Popen(
            command, cwd=tmp, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
    for row_id in LIGHTNING_ROWS:
        apps = tmp_path_factory.mktemp(f"cli-{row_id}") / "apps"
        ignore = shutil.ignore_patterns("__pycache__", "outputs")
        shutil.copytree(LIGHTNING_APPS, apps, ignore=ignore)
        started["cli.py", row_id] = subprocess.Popen(
            lightning_command(BY_ID[row_id][1]), cwd=apps, env=env(),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
    results = {}
    for name, process in started.items():
        try:
            stdout, stderr = process.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
        results[name] = (process.returncode, stdout, stderr)
    return results


@pytest.mark.parametrize(
    ("settings", "key", "fragments"), table([r for r in CLI_ROWS if r not in COMPOSE_ROWS])
)
def test_run_py_ends_with_one_line_naming_the_key_and_exit_2(
    request, processes, settings, key, fragments
):
    code, stdout, stderr = processes["run.py", request.node.callspec.id]
    assert code == 2, stdout + stderr
    (line,) = stderr.strip().splitlines()
    assert line.startswith(f"error: offload.{key}: "), line
    for fragment in fragments:
        assert fragment in line, (fragment, line)


@pytest.mark.parametrize(("settings", "key", "fragments"), table(COMPOSE_ROWS))
def test_run_py_refused_at_compose_time_exits_non_zero_naming_the_key(
    request, processes, settings, key, fragments
):
    code, stdout, stderr = processes["run.py", request.node.callspec.id]
    assert code != 0, stdout
    assert f"offload.{key}" in stderr, stderr
    assert "Traceback" not in stderr, stderr


def lightning_table() -> list[Any]:
    params = []
    for row_id in LIGHTNING_ROWS:
        params.append(pytest.param(*BY_ID[row_id][1:], id=row_id))
    return params


@pytest.mark.parametrize(("settings", "key", "fragments"), lightning_table())
def test_lightning_cli_exits_non_zero_naming_key_and_value(
    request, processes, settings, key, fragments
):
    code, stdout, stderr = processes["cli.py", request.node.callspec.id]
    output = stdout + stderr
    assert code != 0, output[-3000:]
    assert f"offload.{key}" in output, output[-3000:]
    for fragment in fragments:
        assert fragment in output, (fragment, output[-3000:])
