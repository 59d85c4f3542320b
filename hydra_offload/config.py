"""The validated offload configuration: the contract every other module reads.

Three frozen pydantic models mirror the YAML layout of the ``offload`` config group::

    offload:
      offload_backend: auto | uva | prefetch
      uva:      {cpu_offload_gb, cpu_offload_params}
      prefetch: {offload_group_size, offload_num_in_group, offload_prefetch_step, offload_params}
      layers:   null | "model.layers" | [encoder.block, decoder.block]
      share_host_memory: true | false

Validation follows the project specification, ``docs/spec.md §2``: field bounds, the two
cross-field errors when prefetch is on, and at most one :class:`OffloadConfigWarning` for
conflicting settings. On top of that the models reject unknown keys, strings where numbers
belong, and bare strings where a list of name segments belongs.

:func:`to_offload_config` turns what users hand over (a Hydra ``DictConfig``, a ``dict``, a
jsonargparse ``Namespace``) into an ``OffloadConfig``; its :class:`OffloadConfigError` has one
line per problem, naming the dotted key. omegaconf is imported only when a node is given.

Example:
    >>> from hydra_offload import OffloadConfig
    >>> cfg = OffloadConfig(prefetch={"offload_group_size": 8, "offload_num_in_group": 2})
    >>> cfg.resolved_backend
    'prefetch'
    >>> len(cfg.compute_hash())
    64
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import sys
from collections.abc import Iterable, Mapping
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from hydra_offload._warnings import warn_at_caller

__all__ = [
    "OffloadBackend",
    "OffloadConfig",
    "OffloadConfigError",
    "OffloadConfigWarning",
    "PrefetchOffloadConfig",
    "ResolvedBackend",
    "UVAOffloadConfig",
    "to_offload_config",
]

OffloadBackend = Literal["auto", "uva", "prefetch"]
"""What the user asks for: ``auto`` picks by the settings, the others force a backend."""

ResolvedBackend = Literal["none", "uva", "prefetch"]
"""What actually runs once ``auto`` has been resolved."""

_HASH_SCHEMA = "hydra-offload/OffloadConfig/v2"

# ``Strict`` keeps pydantic from turning "8" into 8 or True into 1: a number in the wrong
# form is a mistake in the user's YAML, not something to guess about.
_StrictInt = Annotated[int, Strict()]
_StrictFloat = Annotated[float, Strict()]
_StrictBool = Annotated[bool, Strict()]


class OffloadConfigWarning(UserWarning):
    """Issued when settings conflict and some of them will be ignored.

    Example:
        >>> import warnings
        >>> from hydra_offload import OffloadConfig, OffloadConfigWarning
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     _ = OffloadConfig(offload_backend="uva", prefetch={"offload_group_size": 4})
        >>> caught[0].category is OffloadConfigWarning
        True
    """


def _segments(field: str, value: Any) -> frozenset[str]:
    """Turn a YAML list / tuple / set of name segments into a frozenset, refusing bare strings."""
    if isinstance(value, str):
        raise PydanticCustomError(
            "segments_not_a_list",
            "{field} must be a list of name segments, e.g. [{value}], "
            "not the bare string '{value}'",
            {"field": field, "value": value},
        )
    if not isinstance(value, Iterable) or isinstance(value, (bytes, dict)):
        raise PydanticCustomError(
            "segments_not_a_list",
            "{field} must be a list of name segments, e.g. [experts]; got {kind}",
            {"field": field, "kind": type(value).__name__},
        )
    items = list(value)
    for item in items:
        if isinstance(item, str) and item.startswith("@"):
            _check_selector(field, item)
        else:
            _check_dotted(field, item, what="name segment")
    return frozenset(items)


def _check_selector(field: str, item: str) -> None:
    from hydra_offload.selection import SELECTORS

    if item[1:] not in SELECTORS:
        raise PydanticCustomError(
            "unknown_selector",
            "{field}: {item} is not a selector; selectors are {known}",
            {"field": field, "item": repr(item), "known": ", ".join(f"@{n}" for n in SELECTORS)},
        )


def _check_dotted(field: str, item: Any, *, what: str) -> None:
    """Refuse anything that is not a non-empty dotted name such as ``experts.w2_weight``."""
    if not isinstance(item, str):
        raise PydanticCustomError(
            "dotted_name",
            "{field}: each {what} must be a string, got {item} ({kind})",
            {"field": field, "what": what, "item": repr(item), "kind": type(item).__name__},
        )
    if not item or any(part == "" or part.strip() != part for part in item.split(".")):
        raise PydanticCustomError(
            "dotted_name",
            "{field}: {item} is not a valid {what}; use dot-separated names without "
            "spaces or empty parts, e.g. 'experts' or 'mlp.experts.w2_weight'",
            {"field": field, "what": what, "item": repr(item)},
        )


class _Frozen(BaseModel):
    """Shared model settings: immutable, unknown keys rejected, docstrings as descriptions."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        # Says which keys exist (and the likely one) instead of pydantic's bare
        # "extra inputs are not permitted"; extra="forbid" stays as the backstop.
        if isinstance(data, dict):
            allowed = list(cls.model_fields)
            for key in data:
                if key not in cls.model_fields:
                    close = difflib.get_close_matches(str(key), allowed, n=1)
                    hint = f"did you mean '{close[0]}'? " if close else ""
                    raise PydanticCustomError(
                        "unknown_key",
                        "unknown key {quoted}; {hint}allowed keys: {allowed}",
                        {"quoted": repr(key), "name": str(key), "hint": hint,
                         "allowed": ", ".join(allowed)},
                    )  # fmt: skip
        return data

    @field_serializer("*", when_used="always")
    def _sorted_sets(self, value: Any) -> Any:
        # Sets serialize as sorted lists so dumps (and the hash) do not depend on
        # iteration order, which changes between processes.
        if isinstance(value, frozenset):
            return sorted(value)
        return value


class UVAOffloadConfig(_Frozen):
    """Settings of the UVA backend: weights stay in pinned host memory and GPU kernels read
    them zero-copy over the interconnect.

    Example:
        >>> UVAOffloadConfig(cpu_offload_gb=10, cpu_offload_params=["experts"]).cpu_offload_gb
        10.0
    """

    cpu_offload_gb: _StrictFloat = Field(default=0.0, ge=0, allow_inf_nan=False)
    """GiB of parameters per device to keep in host memory; 0 turns UVA off. Parameters are
    taken in ``named_parameters()`` order until the budget is reached (the last one may
    overshoot it)."""

    cpu_offload_params: frozenset[str] = frozenset()
    """Name segments selecting the parameters UVA may offload (``experts`` matches
    ``mlp.experts.w2_weight``, ``expert`` does not), or selectors such as ``@experts``.
    Empty: any parameter."""

    @field_validator("cpu_offload_params", mode="before")
    @classmethod
    def _params_as_set(cls, value: Any) -> frozenset[str]:
        return _segments("cpu_offload_params", value)


class PrefetchOffloadConfig(_Frozen):
    """Settings of the prefetch backend: the layer stack is cut into groups, the last layers
    of each group live in host memory and are copied into a static device buffer pool a few
    offloaded layers ahead of use.

    Example:
        >>> p = PrefetchOffloadConfig(offload_group_size=8, offload_num_in_group=2)
        >>> [i for i in range(16) if i % 8 >= 8 - 2]
        [6, 7, 14, 15]
    """

    offload_group_size: _StrictInt = Field(default=0, ge=0)
    """Layers per group; 0 turns prefetch off."""

    offload_num_in_group: _StrictInt = Field(default=1, ge=1)
    """How many of the last layers of each group are offloaded; at most
    ``offload_group_size``."""

    offload_prefetch_step: _StrictInt = Field(default=1, ge=0)
    """How many offloaded layers ahead the copies run; each step costs one device slot per
    distinct parameter. At least 1 when prefetch is on; ``>= offload_num_in_group`` hides
    the copies of adjacent offloaded layers."""

    offload_params: frozenset[str] = frozenset()
    """Name segments (or selectors such as ``@mlp``) selecting which parameters of an
    offloaded layer move to the host. Empty: all of them."""

    @field_validator("offload_params", mode="before")
    @classmethod
    def _params_as_set(cls, value: Any) -> frozenset[str]:
        return _segments("offload_params", value)


class OffloadConfig(_Frozen):
    """The whole offload configuration, validated and immutable.

    Build it from keyword arguments, from a dict with ``OffloadConfig.model_validate``, or
    from a Hydra node with :func:`hydra_offload.to_offload_config` (whose errors name the
    dotted key). Conflicting settings emit one :class:`OffloadConfigWarning`.

    Example:
        >>> cfg = OffloadConfig(uva={"cpu_offload_gb": 4})
        >>> cfg.resolved_backend
        'uva'
        >>> cfg == OffloadConfig(uva={"cpu_offload_gb": 4.0})
        True
    """

    offload_backend: OffloadBackend = "auto"
    """``auto`` chooses prefetch when ``offload_group_size > 0``, else UVA when
    ``cpu_offload_gb > 0``, else nothing; ``uva`` and ``prefetch`` force a backend."""

    uva: UVAOffloadConfig = Field(default_factory=UVAOffloadConfig)
    """Settings of the UVA backend."""

    prefetch: PrefetchOffloadConfig = Field(default_factory=PrefetchOffloadConfig)
    """Settings of the prefetch backend."""

    layers: str | tuple[str, ...] | None = None
    """Dotted path(s), from the model root, of the layer stack(s) the prefetch backend walks,
    e.g. ``model.layers`` or ``[encoder.block, decoder.block]`` (a list of one path is stored
    as that path). ``null``: auto-detect."""

    share_host_memory: _StrictBool = True
    """Data-parallel processes of one node keep one host copy of the frozen offloaded
    weights, in memory they share, instead of one each (under Lightning's DDP strategies, or
    ``apply_offload(..., process_group=...)``); ``false``: each process keeps its own."""

    @field_validator("layers", mode="before")
    @classmethod
    def _layers_paths(cls, value: Any) -> str | tuple[str, ...] | None:
        if value is None:
            return None
        if isinstance(value, str):
            _check_dotted("layers", value, what="module path")
            return value
        if isinstance(value, (list, tuple)):
            if not value:
                raise PydanticCustomError(
                    "layers_empty",
                    "layers must name at least one module path, or be null to auto-detect",
                )
            for item in value:
                _check_dotted("layers", item, what="module path")
            if len(set(value)) != len(value):
                raise PydanticCustomError(
                    "layers_repeated",
                    "layers names a path twice: {value}",
                    {"value": str(list(value))},
                )
            # One path in a list means the same as the bare path: store it one way only, so
            # equal settings compare and hash equal.
            return value[0] if len(value) == 1 else tuple(value)
        raise PydanticCustomError(
            "layers_type",
            "layers must be null, a dotted module path or a list of them; got {kind}",
            {"kind": type(value).__name__},
        )

    @property
    def prefetch_enabled(self) -> bool:
        """Whether the prefetch rules apply: backend ``prefetch`` or a group size above 0."""
        return self.offload_backend == "prefetch" or self.prefetch.offload_group_size > 0

    @property
    def uva_active(self) -> bool:
        """Whether the UVA settings would offload anything (``cpu_offload_gb > 0``)."""
        return self.uva.cpu_offload_gb > 0

    @property
    def prefetch_active(self) -> bool:
        """Whether the prefetch settings would offload anything (``offload_group_size > 0``)."""
        return self.prefetch.offload_group_size > 0

    @property
    def resolved_backend(self) -> ResolvedBackend:
        """The backend that runs: ``none``, ``uva`` or ``prefetch`` (``auto`` resolved)."""
        if self.offload_backend != "auto":
            return self.offload_backend
        if self.prefetch_active:
            return "prefetch"
        if self.uva_active:
            return "uva"
        return "none"

    @property
    def layer_paths(self) -> tuple[str, ...] | None:
        """``layers`` as a tuple of paths, or ``None`` for auto-detection."""
        if self.layers is None:
            return None
        return (self.layers,) if isinstance(self.layers, str) else self.layers

    @model_validator(mode="after")
    def _cross_field_rules(self) -> OffloadConfig:
        prefetch = self.prefetch
        if self.prefetch_enabled:
            why = (
                "offload_backend='prefetch'"
                if prefetch.offload_group_size == 0
                else f"offload_group_size = {prefetch.offload_group_size} > 0"
            )
            if prefetch.offload_num_in_group > prefetch.offload_group_size:
                hint = (
                    "; offload_backend='prefetch' needs offload_group_size > 0"
                    if prefetch.offload_group_size == 0
                    else ""
                )
                raise PydanticCustomError(
                    "offload_constraint",
                    "offload_num_in_group ({k}) must be <= offload_group_size ({g}){hint}",
                    {
                        "key": "prefetch.offload_num_in_group",
                        "k": prefetch.offload_num_in_group,
                        "g": prefetch.offload_group_size,
                        "hint": hint,
                    },
                )
            if prefetch.offload_prefetch_step < 1:
                raise PydanticCustomError(
                    "offload_constraint",
                    "offload_prefetch_step ({s}) must be >= 1 when prefetch offloading is "
                    "enabled ({why})",
                    {
                        "key": "prefetch.offload_prefetch_step",
                        "s": prefetch.offload_prefetch_step,
                        "why": why,
                    },
                )
        message = self._conflict()
        if message:
            warn_at_caller(message, OffloadConfigWarning)
        return self

    def _conflict(self) -> str | None:
        """The one conflict worth a warning, first match wins (docs/spec.md §2.5)."""
        if self.offload_backend == "uva" and self.prefetch_active:
            return (
                "Prefetch offload fields are set but offload_backend='uva': "
                "the prefetch settings will be ignored."
            )
        if self.offload_backend == "prefetch" and self.uva_active:
            return (
                "UVA offload fields are set but offload_backend='prefetch': "
                "the UVA settings will be ignored."
            )
        if self.offload_backend == "auto" and self.uva_active and self.prefetch_active:
            return (
                "Both UVA and prefetch offload fields are set with offload_backend='auto': "
                "the prefetch backend will be selected. Set offload_backend explicitly to "
                "silence this warning."
            )
        return None

    def compute_hash(self) -> str:
        """A SHA-256 hex digest of every field, nested ones included.

        Equal configs give equal digests in any process and Python version; the order of
        set members does not matter; any change of a field changes the digest.

        Example:
            >>> a = OffloadConfig(uva={"cpu_offload_params": ["b", "a"]})
            >>> b = OffloadConfig(uva={"cpu_offload_params": ["a", "b"]})
            >>> a.compute_hash() == b.compute_hash()
            True
        """
        payload = json.dumps(
            {"schema": _HASH_SCHEMA, "config": self.model_dump(mode="json")},
            sort_keys=True,
            separators=(",", ":"),
            allow_nan=False,
        )
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------
# Coercion: a Hydra node, a mapping or a jsonargparse Namespace to an OffloadConfig
# --------------------------------------------------------------------------------------------


class OffloadConfigError(ValueError):
    """A configuration that cannot be used, with one line per problem.

    Each line names the full dotted key, the value given and what is allowed, e.g.
    ``offload.prefetch.offload_num_in_group: got 3; offload_num_in_group (3) must be <=
    offload_group_size (2)``.

    Attributes:
        problems: one ``(key, message)`` pair per problem.
    """

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("\n".join(f"{key}: {message}" for key, message in problems))


def to_offload_config(cfg: Any, *, key: str = "offload") -> OffloadConfig:
    """Validate a Hydra node, a mapping or an :class:`OffloadConfig` into an ``OffloadConfig``.

    Args:
        cfg: a ``DictConfig`` (interpolations are resolved), a ``dict`` or another mapping,
            or an ``OffloadConfig`` (returned as it is).
        key: the dotted key of ``cfg`` in the user's config; error messages start with it.

    Raises:
        OffloadConfigError: one line per problem, each naming the dotted key
            (``offload.prefetch.offload_group_size``), the bad value and what is allowed.

    Example:
        >>> from omegaconf import OmegaConf
        >>> node = OmegaConf.create({"prefetch": {"offload_group_size": 2}})
        >>> to_offload_config(node).prefetch.offload_group_size
        2
        >>> try:
        ...     to_offload_config({"prefetch": {"offload_group_size": -2}})
        ... except OffloadConfigError as err:
        ...     print(err)
        offload.prefetch.offload_group_size: got -2; expected a value >= 0
    """
    if isinstance(cfg, OffloadConfig):
        return cfg
    if isinstance(cfg, argparse.Namespace):  # jsonargparse (LightningCLI) hands these over
        cfg = _namespace_dict(cfg)
    if _is_omegaconf_node(cfg):
        data: Any = _omegaconf_container(cfg)
    elif isinstance(cfg, Mapping):
        data = {k: _plain(v) for k, v in cfg.items()}
    else:
        raise OffloadConfigError(
            [(key, f"expected a mapping of offload settings, got {type(cfg).__name__}")]
        )
    try:
        return OffloadConfig.model_validate(data)
    except ValidationError as err:
        raise OffloadConfigError(_describe(err, key, data)) from None


def _is_omegaconf_node(value: Any) -> bool:
    """Whether ``value`` is an OmegaConf node; omegaconf is imported only where one can exist
    (a program that made a node has imported it), so plain Python callers never load it."""
    if "omegaconf" not in sys.modules:
        return False
    from omegaconf import OmegaConf

    return OmegaConf.is_config(value)


def _omegaconf_container(node: Any) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True, enum_to_str=True)


def _namespace_dict(namespace: argparse.Namespace) -> dict[str, Any]:
    return {
        key: _namespace_dict(value) if isinstance(value, argparse.Namespace) else value
        for key, value in vars(namespace).items()
    }


def _plain(value: Any) -> Any:
    """Plain Python values from OmegaConf nodes and Enums found inside a mapping."""
    if isinstance(value, Enum):
        return value.value
    if _is_omegaconf_node(value):
        return _omegaconf_container(value)
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _describe(err: ValidationError, key: str, data: Any) -> list[tuple[str, str]]:
    problems = []
    for error in err.errors(include_url=False):
        ctx = error.get("ctx") or {}
        loc = tuple(str(part) for part in error["loc"])
        if "key" in ctx:  # a cross-field rule: it names the field it is about
            loc = tuple(ctx["key"].split("."))
            value = _lookup(data, loc)
        else:
            value = error["input"]
        if error["type"] == "unknown_key":
            loc = (*loc, ctx["name"])
        dotted = ".".join((key, *loc)) if key else ".".join(loc)
        if error["type"] == "unknown_key":
            message = error["msg"].replace(f"unknown key {ctx['quoted']}", "unknown key", 1)
        elif error["type"] == "extra_forbidden":
            message = _unknown_key(loc)
        elif isinstance(value, (Mapping, list)) and not loc:
            message = error["msg"]
        else:
            message = f"got {value!r}; {_allowed(error)}"
        problems.append((dotted, message))
    return problems


def _lookup(data: Any, loc: tuple[str, ...]) -> Any:
    for part in loc:
        if not isinstance(data, Mapping) or part not in data:
            return _default(loc)
        data = data[part]
    return data


def _default(loc: tuple[str, ...]) -> Any:
    value: Any = OffloadConfig()
    for part in loc:
        value = getattr(value, part)
    return value


def _allowed(error: Any) -> str:
    """What is allowed, in words, for one pydantic error."""
    ctx = error.get("ctx") or {}
    kind = error["type"]
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return "expected an integer"
    if kind in ("float_type", "float_parsing"):
        return "expected a number"
    if kind == "greater_than_equal":
        bound = ctx["ge"]
        if isinstance(bound, float) and bound.is_integer():
            bound = int(bound)
        return f"expected a value >= {bound}"
    if kind == "finite_number":
        return "expected a finite number"
    if kind == "literal_error":
        return f"expected one of {ctx['expected']}"
    return error["msg"]


def _unknown_key(loc: tuple[str, ...]) -> str:
    model: type[BaseModel] = OffloadConfig
    for part in loc[:-1]:
        annotation = model.model_fields[part].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            break
        model = annotation
    allowed = list(model.model_fields)
    close = difflib.get_close_matches(loc[-1], allowed, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f"unknown key; {hint}allowed keys: {', '.join(allowed)}"
