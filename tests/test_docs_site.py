"""The documentation site: it builds strictly, its snippets run, and it covers every message.

- ``mkdocs build --strict`` passes (broken links and anchors, pages missing from the nav and
  mkdocstrings errors are warnings, which fail it);
- the troubleshooting page has a section for every exception and warning class the package
  defines (found by walking the package, not listed here);
- every ```python block of README.md and docs/*.md runs on a CPU, each in a fresh process,
  except blocks marked ``<!-- not run: reason -->`` on the line right before the fence;
- every ``python run.py ...`` command of the ```bash blocks composes with Hydra (all the jobs
  of a sweep, hydra.* overrides included) and its ``offload`` node validates; the README's main
  job runs and prints the summary the README shows;
- every other command of the ```bash blocks is checked by what it is: ``pip install`` lines
  run as ``pip install --dry-run`` here (their extras exist, CI has what they install), the
  ``venv`` line runs, benchmark commands parse with the script's own parser (the scripts run in
  tests/test_benchmarks.py), and the test command is the one .ci/run runs. Blocks marked
  ``<!-- not run: reason -->`` are left out, and a command of no known kind fails.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import itertools
import os
import pkgutil
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
TROUBLESHOOTING = DOCS / "troubleshooting.md"
NOT_RUN = re.compile(r"<!--\s*not run:\s*\S.*?-->")
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```\s*$", re.MULTILINE | re.DOTALL)
ENV = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONWARNINGS": "ignore::DeprecationWarning"}


def fenced_blocks(path: Path, language: str) -> list[tuple[int, str, bool]]:
    """``(line, code, marked not run)`` for each fenced block of ``language`` in ``path``."""
    text = path.read_text(encoding="utf-8")
    blocks = []
    for match in FENCE.finditer(text):
        if match.group(1) != language:
            continue
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        line = text.count("\n", 0, match.start()) + 1
        blocks.append((line, match.group(2), bool(NOT_RUN.fullmatch(before.strip()))))
    return blocks


# --------------------------------------------------------------------------------------------
# The site builds, strictly
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_mkdocs_build_strict_passes(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    site = tmp_path / "site"
    assert (site / "api" / "index.html").is_file()
    # The build draws the main job's plan (docs/overrides/hooks.py), and a page shows it.
    for picture in ("offload_plan.png", "offload_timeline.png"):
        assert (site / "img" / picture).read_bytes()[:4] == b"\x89PNG"
    assert "../img/offload_timeline.png" in (site / "concepts" / "index.html").read_text()
    page = (site / "getting-started" / "index.html").read_text(encoding="utf-8")
    assert "../img/offload_plan.png" in page


def test_every_page_of_the_docs_folder_is_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    missing = [p.name for p in sorted(DOCS.glob("*.md")) if f": {p.name}" not in nav]
    assert missing == []


# --------------------------------------------------------------------------------------------
# Troubleshooting covers every error and warning class
# --------------------------------------------------------------------------------------------


def message_classes() -> set[str]:
    """Every exception or warning class defined in a module of the package."""
    import hydra_offload

    found = set()
    for info in pkgutil.walk_packages(hydra_offload.__path__, "hydra_offload."):
        try:
            module = importlib.import_module(info.name)
        except ModuleNotFoundError as err:  # an optional dependency missing here
            if (err.name or "").startswith("hydra_offload"):
                raise
            continue
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, BaseException) and cls.__module__ == module.__name__:
                found.add(cls.__name__)
    return found


def troubleshooting_sections() -> dict[str, str]:
    text = TROUBLESHOOTING.read_text(encoding="utf-8")
    parts = re.split(r"^## +(.+?)\s*$", text, flags=re.MULTILINE)
    return {title: body for title, body in zip(parts[1::2], parts[2::2], strict=True)}


def test_troubleshooting_has_a_section_for_every_error_and_warning_class():
    classes = message_classes()
    # The walk finds the known ones, so it would find a new one.
    assert {"OffloadError", "OffloadConfigError", "OffloadPlanWarning"} <= classes
    sections = troubleshooting_sections()
    missing = sorted(classes - set(sections))
    assert missing == [], f"docs/troubleshooting.md has no '## <name>' section for {missing}"
    # What a failed trial returns is a message too, though not an exception.
    for name in sorted(classes | {"InfeasibleTrial"}):
        body = sections[name]
        assert "```" in body, f"{name}: no typical message"
        assert "cause" in body.lower(), f"{name}: no cause"
        assert "fix" in body.lower(), f"{name}: no fix"


# --------------------------------------------------------------------------------------------
# Python snippets run
# --------------------------------------------------------------------------------------------


def python_snippets() -> list:
    params, seen = [], {}
    for path in PAGES:
        for line, code, not_run in fenced_blocks(path, "python"):
            name = f"{path.relative_to(ROOT)}:{line}"
            if not_run:
                continue
            if code in seen:  # the same snippet on two pages runs once
                continue
            seen[code] = name
            params.append(pytest.param(code, id=name))
    return params


def test_snippets_are_found_and_few_are_marked_not_run():
    marked = sum(not_run for p in PAGES for _, _, not_run in fenced_blocks(p, "python"))
    assert len(python_snippets()) >= 5
    assert marked <= 1, "keep the snippets that cannot run on a CPU in CI few"


@pytest.mark.parametrize("code", python_snippets())
def test_python_snippet_runs(code, tmp_path):
    # Relative paths in a snippet (Hydra's config_path="conf") mean the main job's configs.
    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    script = tmp_path / "snippet.py"
    script.write_text(code, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=ENV,  # on a GPU machine the snippets take their "cuda" branch
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]


# --------------------------------------------------------------------------------------------
# run.py commands compose
# --------------------------------------------------------------------------------------------


def shell_commands() -> list[tuple[str, list[str]]]:
    """``(where, words)`` for each command of the ```bash blocks not marked not run: lines
    joined across ``\\`` continuations, comments dropped, empty lines skipped."""
    found = []
    for path in PAGES:
        for line, code, not_run in fenced_blocks(path, "bash"):
            if not_run:
                continue
            joined = re.sub(r"\\\n\s*", " ", code)
            for offset, command in enumerate(joined.splitlines()):
                words = shlex.split(command, comments=True)
                if words:
                    found.append((f"{path.relative_to(ROOT)}:{line}+{offset}", words))
    return found


COMPOSED = (["python", "run.py"], ["python", "train.py"])
"""Commands whose overrides compose with the main job's config: ``run.py`` itself, and the
``train.py`` of docs/hydra.md's own-app fragment, whose overrides touch only the offload group
and Hydra's sweeper, as run.py's can."""


def kind_of(words: list[str]) -> str:
    """How a shell command of the docs is checked here."""
    if words[:2] in COMPOSED:
        return "composes"
    if words[:2] == ["pip", "install"]:
        return "pip"
    if words[0] == "python" and words[1].startswith("benchmarks/"):
        return "benchmark"
    if words[:3] == ["python3", "-m", "venv"]:
        return "venv"
    if " ".join(words) == TEST_COMMAND:
        return "test command"
    return "unchecked"


def run_py_commands() -> list:
    return [
        pytest.param(words[2:], id=where)
        for where, words in shell_commands()
        if kind_of(words) == "composes"
    ]


def jobs_of(words: list[str]) -> list[list[str]]:
    """The overrides of each job the command starts: a sweep's choices and ranges expanded."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = [w for w in words if w not in ("-m", "--multirun")]
    parsed = OverridesParser.create().parse_overrides(overrides)
    choices = []
    for override in parsed:
        key = override.get_key_element()
        if override.is_sweep_override():
            values = list(override.sweep_string_iterator())
            choices.append([f"{key}={value}" for value in values])
        else:
            choices.append([override.input_line])
    return [list(job) for job in itertools.product(*choices)]


# --------------------------------------------------------------------------------------------
# The other shell commands run
# --------------------------------------------------------------------------------------------

TEST_COMMAND = "ruff check . && pytest"
"""README.md's test command, which .ci/run ends with."""


def test_every_shell_command_of_the_docs_is_checked():
    unchecked = [where for where, words in shell_commands() if kind_of(words) == "unchecked"]
    assert unchecked == [], "teach kind_of how to check these commands"
    marked = sum(not_run for p in PAGES for _, _, not_run in fenced_blocks(p, "bash"))
    assert marked <= 2, "keep the shell blocks that cannot run in CI few"
    kinds = {kind_of(words) for _, words in shell_commands()}
    assert kinds == {"composes", "pip", "benchmark", "venv", "test command"}


def other_shell_commands() -> list:
    return [
        pytest.param(words, id=where)
        for where, words in shell_commands()
        if kind_of(words) != "composes"
    ]


@pytest.mark.parametrize("words", other_shell_commands())
def test_shell_command_runs(words, tmp_path, monkeypatch):
    kind = kind_of(words)
    if kind == "pip":
        pip_dry_run(words[2:])
    elif kind == "benchmark":
        # The flags parse as the script's own parser reads them; tests/test_benchmarks.py
        # runs each script, at a small size.
        monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
        script = ROOT / words[1]
        spec = importlib.util.spec_from_file_location(f"docs_{script.stem}", script)
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclasses look it up
        spec.loader.exec_module(module)
        module.build_parser().parse_args(words[2:])
    elif kind == "venv":
        done = subprocess.run(["bash", "-c", " ".join(words)],
                              cwd=tmp_path, capture_output=True, text=True,
                              timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert (tmp_path / ".venv" / "bin" / "activate").is_file()
    else:  # the test command: what .ci/run runs, as the README says
        ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()
        assert ci[-1] == TEST_COMMAND


def pip_dry_run(arguments: list[str]) -> None:
    """``pip install --dry-run`` of the line's arguments in this environment, ``hydra-offload``
    standing for this checkout (the wheel it builds is the one published under that name).

    Every extra named must exist, and everything the line installs must be here already: CI
    installs every extra the docs name. A requirement this environment does not meet at all
    (the device's own torch against CI's pin) skips.
    """
    from importlib.metadata import PackageNotFoundError, version

    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name

    project = canonicalize_name("hydra-offload")
    args = []
    for argument in arguments:
        try:
            requirement = Requirement(argument)
        except InvalidRequirement:  # a flag, or a path: ".[dev]"
            args.append(argument)
            continue
        name = canonicalize_name(requirement.name)
        if name == project:
            extras = ",".join(sorted(requirement.extras))
            args.append(f"{ROOT}[{extras}]" if extras else str(ROOT))
            continue
        try:
            installed = version(requirement.name)
        except PackageNotFoundError:
            installed = None
        if installed is None or not requirement.specifier.contains(installed, prereleases=True):
            pytest.skip(f"this environment has {requirement.name} {installed}, not {argument}")
        args.append(argument)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--disable-pip-version-check",
         *args],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "does not provide the extra" not in output, output[-3000:]
    would = re.findall(r"^Would install (.*)$", done.stdout, flags=re.MULTILINE)
    names = {package.rsplit("-", 1)[0] for line in would for package in line.split()}
    assert names <= {"hydra-offload", "hydra_offload"}, f"not installed in CI: {names}"


def test_the_docs_show_run_py_commands():
    assert len(run_py_commands()) >= 10


@pytest.mark.parametrize("words", run_py_commands())
def test_run_py_command_composes(words):
    from hydra import compose, initialize_config_dir

    from hydra_offload import OffloadConfigError, to_offload_config

    jobs = jobs_of(words)
    assert jobs
    # An Optuna study may try settings that cannot run: they become failed trials
    # (docs/spec.md §8.5), so some of its jobs may be refused, not all.
    study = "hydra/sweeper=optuna" in words
    refused = []
    for overrides in jobs:
        with initialize_config_dir(str(ROOT / "conf"), version_base="1.3", job_name="docs"):
            cfg = compose("config", overrides=overrides, return_hydra_config=True)
        # OffloadConfigWarning is an error in this suite (pyproject.toml): a sweep that crosses
        # one backend with the other's keys fails here.
        try:
            to_offload_config(cfg.offload)
        except OffloadConfigError:
            if not study:
                raise
            refused.append(overrides)
    assert len(refused) < len(jobs)


@pytest.mark.slow
def test_the_readme_main_job_prints_its_summary(tmp_path):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    command = "python run.py offload=prefetch offload.prefetch.offload_group_size=8"
    assert command in readme
    done = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *shlex.split(command)[2:]],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    shown = "3.06 MiB (3,213,312 B) planned"
    assert shown in readme
    assert "Run summary" in done.stdout
    assert shown in done.stdout
    # Its output directory has the pictures the docs show.
    (folder,) = (tmp_path / "outputs").glob("*/*")
    for what in ("plan", "timeline"):
        picture = folder / f"offload_{what}.png"
        assert picture.read_bytes()[:4] == b"\x89PNG"
        assert f"{what} picture: {picture}" in done.stdout
