"""Mutants of the installed package, for tests that must fail when a piece of code is gone.

``statements(attrs)`` finds the expression statements that call a method named in ``attrs``
(e.g. ``wait_event``) in the package's source; ``run_mutant`` copies the package with some of
them replaced by ``pass`` into a temporary directory and runs pytest on chosen tests against
that copy, in a subprocess.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import hydra_offload

PACKAGE = Path(hydra_offload.__file__).parent
TESTS = Path(__file__).parent
ROOT = TESTS.parent


@dataclass(frozen=True)
class Statement:
    path: str  # relative to the package
    line: int
    function: str  # the enclosing function (Class.method)
    source: str

    def __str__(self) -> str:
        return f"{self.path}:{self.function}:{self.source.split('(')[0]}"


def statements(attrs: set[str], exclude: set[str] = frozenset()) -> list[Statement]:
    """One-line statements ``<expr>.<attr>(...)`` in the package, for ``attr`` in ``attrs``."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative in exclude:
            continue
        lines = path.read_text().splitlines()
        for function, node in _walk(ast.parse(path.read_text()), ""):
            if (
                isinstance(node, ast.Expr)
                and isinstance(node.value, ast.Call)
                and isinstance(node.value.func, ast.Attribute)
                and node.value.func.attr in attrs
                and node.lineno == node.end_lineno
            ):
                source = lines[node.lineno - 1].split("#")[0].strip()
                found.append(Statement(relative, node.lineno, function, source))
    return found


def _walk(node: ast.AST, scope: str):
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield from _walk(child, f"{scope}.{child.name}" if scope else child.name)
        else:
            yield scope, child
            yield from _walk(child, scope)


def run_mutant(
    removed: list[Statement], arguments: list[str], workdir: Path
) -> subprocess.CompletedProcess:
    """pytest with ``arguments`` (file names under tests/, then options) against a copy of
    the package in which the ``removed`` statements are replaced by ``pass``."""
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(PACKAGE, workdir / "hydra_offload", ignore=ignore)
    for statement in removed:
        path = workdir / "hydra_offload" / statement.path
        lines = path.read_text().splitlines(keepends=True)
        line = lines[statement.line - 1]
        indent = line[: len(line) - len(line.lstrip())]
        lines[statement.line - 1] = f"{indent}pass  # mutant\n"
        path.write_text("".join(lines))
    env = {**os.environ, "PYTHONPATH": str(workdir), "PYTHONDONTWRITEBYTECODE": "1"}
    command = [
        sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
        "-c", str(ROOT / "pyproject.toml"), "--rootdir", str(ROOT),
        *[str(TESTS / a) if a.endswith(".py") else a for a in arguments],
    ]  # fmt: skip
    return subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True)
