"""Finding the layer stack: the ``nn.ModuleList`` / ``nn.Sequential`` of blocks that the
prefetch backend walks.

Auto-detection looks at every module list in the model that holds parameters and at least
two children of one class, and picks the one whose parameters take the most bytes (shared
parameters counted once); a tie goes to the shallower path, then to the one registered
first. Every other module list is kept as a rejected candidate with the reason, so the choice
can be explained.

Paths given in ``offload.layers`` are read as written in the uncompiled model: a
``torch.compile`` wrapper (``OptimizedModule``) on the way is stepped through, to the module
it holds (``_orig_mod``). The stack found keeps its real path, the one ``named_parameters()``
uses (``net._orig_mod.blocks``), so parameter names in the plan are the model's own. An
entry that selects nothing to offload is an error that says what is there instead.

Example:
    >>> import torch
    >>> from hydra_offload.models import DecoderLM
    >>> with torch.device("meta"):
    ...     model = DecoderLM(num_layers=4)
    >>> choice = find_layer_stacks(model, None)
    >>> choice.stacks[0].path, len(choice.stacks[0].module)
    ('layers', 4)
"""

from __future__ import annotations

import difflib
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, replace

from torch import nn

from hydra_offload.weights import describe

__all__ = [
    "LayerStack",
    "LayerStackError",
    "StackCandidate",
    "StackChoice",
    "child_classes",
    "class_name",
    "find_layer_stacks",
    "unwrap_compiled",
]

_STACK_TYPES = (nn.ModuleList, nn.Sequential)
_MOST_BYTES = "most parameter bytes"
_ONLY_ONE = "the only candidate"
_LISTED = 10
"""How many children, paths or module lists an error message names at most."""


class LayerStackError(ValueError):
    """The layer stack named by ``layers`` is unusable, or none could be found."""


def unwrap_compiled(module: nn.Module) -> nn.Module | None:
    """The module a ``torch.compile`` wrapper holds (its ``_orig_mod``), or ``None`` when
    ``module`` is no such wrapper."""
    # A model can only hold an OptimizedModule once torch.compile has imported its module.
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    wrapper = getattr(eval_frame, "OptimizedModule", None)
    if wrapper is not None and isinstance(module, wrapper):
        return module._modules.get("_orig_mod")
    return None


def _unwrapped(module: nn.Module) -> nn.Module:
    while (inner := unwrap_compiled(module)) is not None:
        module = inner
    return module


def class_name(module: nn.Module) -> str:
    """The class name of ``module``, or of the module a ``torch.compile`` wrapper holds."""
    return type(_unwrapped(module)).__name__


def child_classes(module: nn.Module) -> Counter[str]:
    """How many children of ``module`` there are of each class (compiled ones by the class
    they wrap), a module registered at two positions counted at each, as ``len()`` does."""
    return Counter(class_name(child) for child in module._modules.values() if child is not None)


@dataclass(frozen=True)
class StackCandidate:
    """A module list considered as the layer stack, and what was decided about it."""

    path: str
    """Dotted path from the model root (``""`` is the root itself)."""
    num_children: int
    layer_class: str
    """The most common class among the children."""
    same_class: int
    """How many children are of ``layer_class``; a stack needs at least two."""
    param_bytes: int
    chosen: bool
    reason: str

    @property
    def display_path(self) -> str:
        return self.path or "<root>"

    @property
    def eligible(self) -> bool:
        """Whether auto-detection may choose it: two children of one class, and parameters."""
        return self.same_class >= 2 and self.param_bytes > 0

    @property
    def mixed(self) -> bool:
        """Whether some children are not of ``layer_class``."""
        return self.same_class < self.num_children

    @property
    def class_share(self) -> str:
        """``4/10 Linear``: how many of the children are of the layer class, and which."""
        return f"{self.same_class}/{self.num_children} {self.layer_class}"

    @property
    def description(self) -> str:
        """``8 x Block`` for a homogeneous list, :attr:`class_share` for a mixed one."""
        if self.mixed:
            return self.class_share
        return f"{self.num_children} x {self.layer_class}"


@dataclass(frozen=True)
class LayerStack:
    """A chosen stack: its path and the live module (a ``ModuleList`` or ``Sequential``)."""

    path: str
    """The real dotted path, as ``named_modules()`` gives it."""
    module: nn.Module
    entry: str | None = None
    """The ``offload.layers`` entry that named it (``None`` when auto-detected)."""

    def qualified(self, index: int, local: str = "") -> str:
        """The fully qualified name of layer ``index`` (or of ``local`` inside it)."""
        parts = [p for p in (self.path, str(index), local) if p]
        return ".".join(parts)


@dataclass(frozen=True)
class StackChoice:
    """The stacks used and every candidate looked at (empty when paths were given)."""

    stacks: tuple[LayerStack, ...]
    candidates: tuple[StackCandidate, ...]


def _param_bytes(module: nn.Module) -> int:
    """The true bytes of the module's parameters (a quantized weight's values and state)."""
    return sum(describe(module, name, p).nbytes for name, p in module.named_parameters())


def _candidate(path: str, module: nn.Module) -> StackCandidate:
    classes = child_classes(module)
    top, count = classes.most_common(1)[0] if classes else ("-", 0)
    return StackCandidate(path, len(module), top, count, _param_bytes(module), False, "")


def find_layer_stacks(model: nn.Module, paths: tuple[str, ...] | None) -> StackChoice:
    """Resolve the layer stack(s): the given dotted ``paths``, or auto-detection when ``None``.

    Args:
        model: the model; ``torch.compile`` wrappers inside it are stepped through.
        paths: ``offload.layers`` as a tuple, written as in the uncompiled model (the real
            paths, with ``_orig_mod``, work too); ``None`` to auto-detect.

    Raises:
        LayerStackError: an entry that does not exist, is not a module list, is empty, has
            no parameter that could be offloaded, names the same list as another entry, or
            lies inside another; or, when auto-detecting, no module list with parameters and
            two children of one class.
    """
    if paths is None:
        return _auto_detect(model)
    tree = _Tree(model)
    stacks = [_named_stack(tree, entry) for entry in paths]
    _check_disjoint(stacks)
    names: dict[int, list[str]] = defaultdict(list)
    for name, param in model.named_parameters(remove_duplicate=False):
        names[id(param)].append(name)
    for stack in stacks:
        _check_offloadable(tree, stack, names)
    return StackChoice(tuple(stacks), ())


class _Tree:
    """Every module of a model once, in ``named_modules()`` order, under its real path and
    under the path a user writes (without the ``_orig_mod`` of compiled wrappers)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.real: dict[int, str] = {}
        self.user: dict[int, str] = {}
        self.modules: list[nn.Module] = []
        self._walk(model, "", "")

    def _walk(self, module: nn.Module, real: str, user: str) -> None:
        if id(module) in self.real:
            return
        self.real[id(module)] = real
        self.user[id(module)] = user
        self.modules.append(module)
        inner = unwrap_compiled(module)
        for name, child in module._modules.items():
            if child is None:
                continue
            child_user = user if child is inner else _join(user, name)
            self._walk(child, _join(real, name), child_user)

    def user_path(self, module: nn.Module) -> str:
        return self.user[id(module)] or "<root>"

    def module_lists(self, under: str | None = None) -> str:
        """The module lists with two children of one class (inside ``under`` when given),
        as ``path (8 x Block)``; empty when there is none."""
        found = []
        for module in self.modules:
            path = self.user[id(module)]
            if not isinstance(module, _STACK_TYPES):
                continue
            if under is not None and not path.startswith(under + "."):
                continue
            candidate = _candidate(path, module)
            if candidate.same_class >= 2:
                found.append(f"{candidate.display_path} ({candidate.description})")
        return _listing(found)

    def closest(self, entry: str) -> str:
        """Up to three paths that look like ``entry``, leaving out those inside a layer of a
        module list (``blocks.3.fc``), which would crowd out the rest."""
        paths = sorted(
            {p for p in self.user.values() if p and not any(s.isdigit() for s in p.split("."))}
        )
        return _listing(difflib.get_close_matches(entry, paths, n=3, cutoff=0.6))


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _listing(items: list[str]) -> str:
    if len(items) > _LISTED:
        return ", ".join(items[:_LISTED]) + f", ... ({len(items)} in all)"
    return ", ".join(items)


def _children(module: nn.Module) -> str:
    listed = [
        f"{name} ({class_name(child)})" for name, child in _unwrapped(module).named_children()
    ]
    return f"its children: {_listing(listed)}" if listed else "it has no children"


def _lists_hint(tree: _Tree, under: str | None = None) -> str:
    found = tree.module_lists(under)
    if found:
        return f"module lists {'inside it' if under else 'found'}: {found}"
    return "" if under else "the model has no module list"


def _named_stack(tree: _Tree, entry: str) -> LayerStack:
    module = tree.model
    for atom in entry.split("."):
        child = _child(module, atom)
        if child is None:
            parent = _unwrapped(module)
            hints = [
                f"{tree.user_path(module)} ({type(parent).__name__}) has no submodule {atom!r}",
                _children(parent),
            ]
            closest = tree.closest(entry)
            if closest:
                hints.append(f"closest paths: {closest}")
            hints.append(_lists_hint(tree))
            raise LayerStackError(
                f"offload.layers: {entry!r} does not exist in {type(tree.model).__name__}: "
                + "; ".join(hints)
            )
        module = child
    parent_is_list = isinstance(_parent(tree, module), _STACK_TYPES)
    module = _unwrapped(module)
    if not isinstance(module, _STACK_TYPES):
        path = tree.user[id(module)]
        if parent_is_list:
            hint = (
                f"it is one layer of {path.rpartition('.')[0] or '<root>'!r}; name that "
                "module list instead"
            )
        else:
            hint = _lists_hint(tree, under=path) or f"{_children(module)}; {_lists_hint(tree)}"
        raise LayerStackError(
            f"offload.layers: {entry!r} is a {type(module).__name__}, not an nn.ModuleList or "
            f"nn.Sequential of layers; {hint}"
        )
    if len(module) == 0:
        raise LayerStackError(
            f"offload.layers: {entry!r} is an empty {type(module).__name__}; {_lists_hint(tree)}"
        )
    return LayerStack(tree.real[id(module)], module, entry)


def _child(module: nn.Module, name: str) -> nn.Module | None:
    """The registered child ``name`` of ``module``, looked up through compiled wrappers."""
    current: nn.Module | None = module
    while current is not None:
        child = current._modules.get(name)
        if child is not None:
            return child
        current = unwrap_compiled(current)
    return None


def _parent(tree: _Tree, module: nn.Module) -> nn.Module | None:
    path = tree.real[id(module)]
    if not path:
        return None
    parent_path = path.rpartition(".")[0]
    return tree.model.get_submodule(parent_path) if parent_path else tree.model


def _check_disjoint(stacks: list[LayerStack]) -> None:
    for outer in stacks:
        for inner in stacks:
            if inner is outer:
                continue
            if inner.module is outer.module:
                raise LayerStackError(
                    f"offload.layers: {inner.entry!r} and {outer.entry!r} name the same module "
                    f"list ({inner.path}); name it once"
                )
            if inner.path.startswith(outer.path + "."):
                raise LayerStackError(
                    f"offload.layers: {inner.entry!r} lies inside {outer.entry!r}; a layer can "
                    "belong to one stack only, so name stacks that do not contain each other"
                )


def _check_offloadable(tree: _Tree, stack: LayerStack, names: dict[int, list[str]]) -> None:
    """Refuse a stack none of whose layers holds a parameter registered in that layer only
    (the others stay on the device, so the entry would offload nothing). ``names``: every
    name of each parameter, by ``id``."""
    shared: tuple[str, list[str]] | None = None
    for index, layer in enumerate(stack.module):
        prefix = stack.qualified(index) + "."
        for param in layer.parameters():
            aliases = names[id(param)]
            if all(alias.startswith(prefix) for alias in aliases):
                return
            shared = shared or (aliases[0], aliases)
    kind = _candidate(stack.path, stack.module).description
    if shared is None:
        why = "its layers hold no parameters"
    else:
        name, aliases = shared
        why = (
            "every parameter of its layers is also registered outside its own layer, and "
            f"such parameters stay on the device (e.g. {name} is registered as "
            f"{', '.join(aliases)})"
        )
    raise LayerStackError(
        f"offload.layers: {stack.entry!r} ({kind}) selects nothing to offload: {why}; "
        f"{_lists_hint(tree)}"
    )


def _candidates(model: nn.Module) -> list[StackCandidate]:
    return [
        _candidate(path, module)
        for path, module in model.named_modules()
        if isinstance(module, _STACK_TYPES)
    ]


def _auto_detect(model: nn.Module) -> StackChoice:
    lists = _candidates(model)
    eligible = [c for c in lists if c.eligible]
    if not eligible:
        raise LayerStackError(
            f"no layer stack found in {type(model).__name__}: prefetch offloading needs an "
            "nn.ModuleList or nn.Sequential holding two or more layers of one class, with "
            "parameters. Set offload.layers to the dotted path of the model's layers"
        )
    depth = {c.path: (c.path.count(".") + 1 if c.path else 0) for c in eligible}
    best = min(enumerate(eligible), key=lambda ic: (-ic[1].param_bytes, depth[ic[1].path], ic[0]))[
        1
    ]
    decided = []
    for c in lists:
        if c is best:
            reason = _MOST_BYTES if len(eligible) > 1 else _ONLY_ONE
        elif c.same_class < 2:
            reason = "fewer than two children of one class"
        elif not c.param_bytes:
            reason = "no parameters"
        elif c.param_bytes < best.param_bytes:
            reason = f"fewer parameter bytes ({c.param_bytes:,} < {best.param_bytes:,})"
        else:
            reason = f"same parameter bytes, deeper or later than {best.display_path}"
        decided.append(replace(c, chosen=c is best, reason=reason))
    module = model.get_submodule(best.path) if best.path else model
    return StackChoice((LayerStack(best.path, module),), tuple(decided))
