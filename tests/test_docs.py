"""Every example in the public docstrings runs and prints what it claims."""

from __future__ import annotations

import ast
import doctest
import importlib
import os
import re
from pathlib import Path

import pytest

MODULES = [
    "hydra_offload",
    "hydra_offload.config",
    "hydra_offload.integrations.hydra",
    "hydra_offload._applied",
    "hydra_offload.integrations.lightning",
    "hydra_offload.tuning.measure",
    "hydra_offload.models.lightning",
    "hydra_offload.models.decoder",
    "hydra_offload.offload",
    "hydra_offload.plan",
    "hydra_offload.render",
    "hydra_offload.runtime.device",
    "hydra_offload.runtime.grads",
    "hydra_offload.runtime.host",
    "hydra_offload.runtime.params",
    "hydra_offload.runtime.pool",
    "hydra_offload.runtime.shared",
    "hydra_offload.runtime.simulated",
    "hydra_offload.runtime.timing",
    "hydra_offload.schedule",
    "hydra_offload.selection",
    "hydra_offload.stacks",
    "hydra_offload.tuning",
    "hydra_offload.tuning.search",
    "hydra_offload.tuning.simulate",
    "hydra_offload.stats",
    "hydra_offload.backends",
    "hydra_offload.backends.base",
    "hydra_offload.integrations.sweep",
    "hydra_offload.integrations.trial",
    "hydra_offload.integrations.precision",
    "hydra_offload.integrations.strategies",
    "hydra_offload.weights",
    "hydra_offload.weights.base",
    "hydra_offload.weights.subclass",
    "hydra_offload.weights.bitsandbytes",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0


# --------------------------------------------------------------------------------------------
# The specification (docs/spec.md) and the references to it
# --------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "docs" / "spec.md"
SIGN = "\u00a7"  # the section sign, spelled out so this file holds no reference of its own
REFERENCE = re.compile(r"docs/spec\.md " + SIGN + r"(\d+(?:\.\d+)*)")
SECTION = re.compile(SIGN + r"(\d+(?:\.\d+)*)")
HEADING = re.compile(r"^#{2,6} (\d+(?:\.\d+)*)\.? \S", re.MULTILINE)
OLD_NAME = "SPEC" + ".md"  # the file the references used to name, which never existed
# Not the project's files: environments, build and run outputs, caches.
SKIPPED = {"build", "dist", "outputs", "multirun", "node_modules", "__pycache__"}


def project_files(*suffixes: str) -> list[Path]:
    found = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = sorted(
            d for d in dirs
            if not d.startswith(".") and d not in SKIPPED and not d.endswith(".egg-info")
        )  # fmt: skip
        found += [Path(folder, name) for name in sorted(files) if name.endswith(suffixes)]
    return found


def spec_sections() -> list[str]:
    return HEADING.findall(SPEC.read_text(encoding="utf-8"))


def test_the_spec_numbers_its_sections_in_order():
    sections = spec_sections()
    assert sections, "docs/spec.md has no numbered section"
    assert len(set(sections)) == len(sections), "a section number is used twice"
    last: dict[str, int] = {}
    for number in sections:
        parent, _, own = number.rpartition(".")
        assert not parent or parent in sections[: sections.index(number)], number
        assert int(own) == last.get(parent, 0) + 1, f"{SIGN}{number} is out of order"
        last[parent] = int(own)


def test_every_spec_reference_names_a_section_that_exists():
    sections = set(spec_sections())
    references = 0
    for path in project_files(".py", ".md"):
        text = path.read_text(encoding="utf-8")
        name = path.relative_to(ROOT)
        if path == SPEC:  # its own cross-references: bare section numbers
            cited = SECTION.findall(text)
        else:
            cited = REFERENCE.findall(text)
            # A section sign anywhere else must belong to a full reference, which is checked.
            assert text.count(SIGN) == len(cited), f"{name}: a section cited without docs/spec.md"
            references += len(cited)
        missing = sorted(set(cited) - sections)
        assert not missing, f"{name} cites sections docs/spec.md lacks: {missing}"
    assert references, "no file refers to docs/spec.md"


def test_no_file_mentions_the_old_spec_name():
    offenders = [
        str(path.relative_to(ROOT))
        for path in project_files(".py", ".md", ".yaml", ".toml", ".txt", ".cfg", ".ini")
        if OLD_NAME in path.read_text(encoding="utf-8")
    ]
    assert offenders == []


MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+)\)")


def generated_docs_files() -> set[Path]:
    """The files the docs build adds under ``docs/`` (docs/overrides/hooks.py's
    ``GENERATED``), which pages link to though git does not hold them."""
    hooks = ast.parse((ROOT / "docs" / "overrides" / "hooks.py").read_text(encoding="utf-8"))
    for node in hooks.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "GENERATED":
            return {(ROOT / "docs" / name).resolve() for name in ast.literal_eval(node.value)}
    raise AssertionError("docs/overrides/hooks.py has no GENERATED")


def test_markdown_links_point_at_files_inside_the_repository():
    generated = generated_docs_files()
    for path in project_files(".md"):
        for target in MARKDOWN_LINK.findall(path.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # a web address, or an anchor in the same file
            resolved = (path.parent / target.split("#")[0]).resolve()
            if resolved in generated:
                continue  # drawn by the docs build
            name = path.relative_to(ROOT)
            assert resolved.is_relative_to(ROOT), f"{name}: {target} leaves the repository"
            assert resolved.exists(), f"{name}: {target} does not exist"


def test_the_layout_names_every_module_of_the_package():
    # The full tree is on the contributors' page; the README keeps a short one that links to it.
    page = (ROOT / "docs" / "contributing.md").read_text(encoding="utf-8")
    layout = page.split("## Layout", 1)[1].split("```", 2)[1]
    package = ROOT / "hydra_offload"
    # Each module's file name, and the folder it sits in, appear in the tree (the demo models
    # are listed as a folder).
    missing = [
        str(path.relative_to(ROOT))
        for path in sorted(package.rglob("*.py"))
        if f"{path.parent.name}/" not in layout
        or (path.parent.name != "models" and path.name not in layout)
    ]
    assert missing == []


def test_no_code_imports_a_test_helper_as_tests_dot_module():
    """An installed package that ships a top-level ``tests`` (rootutils, a dependency of
    lightning-hydra-template, does) would shadow this repository's: helpers are imported by
    path (``importlib.util.spec_from_file_location``), never as ``tests.<module>``, neither
    in the code nor in the code a test hands to a fresh process."""
    pattern = re.compile(r"\b(?:from|import)\s+tests\b")
    offenders = [
        f"{path.relative_to(ROOT)}:{number}"
        for folder in ("tests", "examples", "benchmarks")
        for path in sorted((ROOT / folder).rglob("*.py"))
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []
