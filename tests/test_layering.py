"""The package's import graph: no cycle, and the layers import only inward.

The layers, innermost first (docs/contributing.md, "Layout"):

- core: the config, selection, layer stacks, the plan and its schedule, statistics,
  ``apply_offload``, the backends, the runtime and the weight adapters. It knows nothing of
  Hydra, Lightning, rendering, tuning or the demo models.
- ``render``: rich tables of plans and statistics; ``pictures``: matplotlib pictures of plans.
- ``tuning``: the step-time simulator, the settings search, measurements.
- ``integrations``: Hydra, Lightning, sweeps, ``run.py``'s job.

Every import counts, also those inside functions and under ``TYPE_CHECKING``: a cycle hidden
behind a function-level import is still a cycle for whoever reads the code. Run this file
(``python tests/test_layering.py``) to print the graph.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = "hydra_offload"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

CORE = (
    "config",
    "errors",
    "selection",
    "stacks",
    "plan",
    "schedule",
    "stats",
    "offload",
    "backends",
    "runtime",
    "weights",
    "_applied",
    "_format",
    "_warnings",
)
"""Module names (or subpackages) under ``hydra_offload`` that make up the core."""

OUTER = {
    "render": ("integrations", "tuning", "models", "pictures"),
    "pictures": ("integrations", "tuning", "models", "render"),
    "tuning": ("integrations",),
}
"""What each outer layer must not import (besides what the core must not)."""

NOT_IN_CORE = ("render", "pictures", "tuning", "integrations", "models")
"""The package's own modules the core must not import."""

THIRD_PARTY_NOT_IN_CORE = (
    "hydra",
    "lightning",
    "pytorch_lightning",
    "rich",
    "omegaconf",
    "matplotlib",
)
"""Libraries the core must not import. One exception: ``config`` reads OmegaConf nodes in
:func:`~hydra_offload.config.to_offload_config`, importing omegaconf inside that function."""

LAZY_EXCEPTIONS = {("config", "omegaconf")}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(name: str, modules: set[str]) -> str | None:
    """The most specific module of the package that ``name`` refers to."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


class Import:
    def __init__(self, target: str, lazy: bool, line: int) -> None:
        self.target, self.lazy, self.line = target, lazy, line


def imports_of(path: Path, name: str) -> list[Import]:
    """Every import of the module at ``path``; ``lazy`` when inside a function."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import):
                found.extend(Import(alias.name, inner, child.lineno) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                # ``from pkg import module`` imports the submodule when there is one.
                found.extend(
                    Import(f"{base}.{alias.name}", inner, child.lineno) for alias in child.names
                )
            visit(child, inner)

    visit(tree, False)
    return found


def package_imports() -> dict[str, list[Import]]:
    return {
        module_name(path): imports_of(path, module_name(path))
        for path in sorted(ROOT.rglob("*.py"))
        if "conf" not in path.relative_to(ROOT).parts
    }


def graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (the package's own ``__init__``, the
    public facade that re-exports lazily, is left out)."""
    found = package_imports()
    modules = set(found) - {PACKAGE}
    edges: dict[str, set[str]] = {}
    for name, imports in found.items():
        if name == PACKAGE:
            continue
        targets = {resolve(i.target, modules) for i in imports if i.target.startswith(PACKAGE)}
        edges[name] = {t for t in targets if t is not None and t != name}
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            connect(node)
    return found


def layer_of(name: str) -> str:
    """The first component under the package: ``backends`` for ``hydra_offload.backends.uva``."""
    return name.split(".")[1] if name.count(".") else name


def in_core(name: str) -> bool:
    return layer_of(name) in CORE


def violations() -> list[str]:
    """Each import that breaks the layering, as ``module:line imports target``."""
    found = []
    for name, imports in package_imports().items():
        layer = layer_of(name)
        for i in imports:
            top = i.target.split(".")[0]
            if in_core(name):
                inward = not (top == PACKAGE and layer_of(i.target) in NOT_IN_CORE)
                allowed = top not in THIRD_PARTY_NOT_IN_CORE or (
                    i.lazy and (layer, top) in LAZY_EXCEPTIONS
                )
                if not (inward and allowed):
                    found.append(f"{name}:{i.line} imports {i.target}")
            elif layer in OUTER and top == PACKAGE and layer_of(i.target) in OUTER[layer]:
                found.append(f"{name}:{i.line} imports {i.target}")
    return found


# --------------------------------------------------------------------------------------------


def test_every_module_of_the_package_belongs_to_a_known_layer():
    known = set(CORE) | set(NOT_IN_CORE)
    assert {layer_of(name) for name in graph()} <= known


def test_the_import_graph_has_no_cycle():
    assert cycles(graph()) == []


def test_the_core_imports_no_integration_rendering_or_tuning():
    assert violations() == []


def test_the_core_loads_without_hydra_lightning_rich_or_the_quantization_libraries():
    # What the static check says, at run time: importing the core and planning an offload
    # loads none of the integration libraries, nor bitsandbytes, torchao or PEFT for a model
    # that has none of their weights.
    code = (
        "import sys, torch\n"
        "from hydra_offload.plan import plan_offload\n"
        "from hydra_offload.offload import apply_offload\n"
        "from hydra_offload.config import to_offload_config\n"
        "handle = apply_offload(torch.nn.Linear(4, 4), {'uva': {'cpu_offload_gb': 1}})\n"
        "handle.stats; handle.remove()\n"
        "names = ('hydra', 'lightning', 'rich', 'omegaconf', 'bitsandbytes', 'torchao', 'peft')\n"
        "print(sorted(m for m in names if m in sys.modules))\n"
    )

    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == "[]", result.stderr


@pytest.mark.parametrize(
    ("edges", "expected"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, [["a", "b", "c"]]),
        ({"a": {"b"}, "b": {"a"}, "c": {"a"}}, [["a", "b"]]),
    ],
)
def test_the_cycle_finder_finds_cycles(edges, expected):
    assert cycles(edges) == expected


def test_the_layering_check_sees_a_function_level_import(tmp_path, monkeypatch):
    # A core module that imports the rendering layer inside a function is reported.
    package = tmp_path / PACKAGE
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "render.py").write_text("")
    (package / "plan.py").write_text("def f():\n    from hydra_offload.render import x\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", package)
    assert violations() == ["hydra_offload.plan:2 imports hydra_offload.render.x"]


if __name__ == "__main__":
    for module, targets in sorted(graph().items()):
        print(f"{module} -> {', '.join(sorted(targets)) or '-'}")
    print("cycles:", cycles(graph()) or "none")
    print("layering violations:", violations() or "none")
