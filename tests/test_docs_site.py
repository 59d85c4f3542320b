"""The documentation site: it builds strictly, its snippets run, and it covers every message.

- ``mkdocs build --strict`` passes (broken links and anchors, pages missing from the nav and
  mkdocstrings errors are warnings, which fail it);
- the troubleshooting page has a section for every exception and warning class the package
  defines (found by walking the package, not listed here);
- every ```python block of README.md and docs/*.md runs on a CPU, each in a fresh process,
  except blocks marked ``<!-- not run: reason -->`` on the line right before the fence;
- every ``python run.py ...`` command of the ```bash blocks composes with Hydra (all the jobs
  of a sweep, hydra.* overrides included) and its ``offload`` node validates; the README's main
  job runs and prints the summary the README shows.
"""

from __future__ import annotations

import importlib
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
    assert marked <= 5, "keep the snippets that cannot run on a CPU in CI few"


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


def run_py_commands() -> list:
    params = []
    for path in PAGES:
        for line, code, _ in fenced_blocks(path, "bash"):
            joined = re.sub(r"\\\n\s*", " ", code)
            for offset, command in enumerate(joined.splitlines()):
                if command.startswith("python run.py"):
                    words = shlex.split(command, comments=True)[2:]
                    name = f"{path.relative_to(ROOT)}:{line}+{offset}"
                    params.append(pytest.param(words, id=name))
    return params


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


def test_the_docs_show_run_py_commands():
    assert len(run_py_commands()) >= 10


@pytest.mark.parametrize("words", run_py_commands())
def test_run_py_command_composes(words):
    from hydra import compose, initialize_config_dir

    from hydra_offload import to_offload_config

    jobs = jobs_of(words)
    assert jobs
    for overrides in jobs:
        with initialize_config_dir(str(ROOT / "conf"), version_base="1.3", job_name="docs"):
            cfg = compose("config", overrides=overrides, return_hydra_config=True)
        # OffloadConfigWarning is an error in this suite (pyproject.toml): a sweep that crosses
        # one backend with the other's keys fails here.
        to_offload_config(cfg.offload)


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
