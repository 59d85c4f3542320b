"""Hydra integration: the structured-config schema of the ``offload`` group and the bridge
from a composed Hydra node to a validated :class:`~hydra_offload.config.OffloadConfig`.

The package's search-path plugin, which Hydra imports before composing any app's config,
registers two hidden configs in Hydra's ``ConfigStore`` (at its root, so neither is an option
of the group nor a group of its own):

- ``hydra_offload_schema``: the schema, dataclasses generated from the pydantic models of
  :mod:`hydra_offload.config` (same keys, same defaults), so the two cannot drift apart
  (``tests/test_schema_parity.py`` checks it). The group files shipped in
  ``hydra_offload/conf/offload/`` extend it (``defaults: [/hydra_offload_schema, ...]``), so a
  command-line override with the wrong type fails at compose time, naming the key. An unknown
  key passes composition (Hydra's own refusal would suggest forcing it in with ``+``) and is
  refused when the job starts, with the keys allowed there.
- ``hydra_offload_callback``: adds
  :class:`~hydra_offload.integrations.hydra_callback.OffloadJobCallback` to the app's
  ``hydra.callbacks``. The group files extend it too, so every job that selects the group is
  validated before its task function runs, and is warned at its end when a backend was
  selected but nothing applied it.

Rules that involve several fields (``offload_num_in_group <= offload_group_size``) are checked
when the job starts by :func:`~hydra_offload.config.to_offload_config`, whose errors name the
full dotted key.

This module imports neither torch nor the runtime, so the plugin stays cheap for Hydra apps
that never offload anything.

Example:
    >>> from hydra_offload import to_offload_config
    >>> to_offload_config({"prefetch": {"offload_group_size": 4}}).resolved_backend
    'prefetch'
"""

from __future__ import annotations

import copy
import os
import re
import sys
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from dataclasses import field, fields, is_dataclass, make_dataclass
from enum import Enum
from functools import partial
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from omegaconf import MISSING, DictConfig, OmegaConf
from pydantic import BaseModel

from hydra_offload.config import (
    OffloadBackend,
    OffloadConfig,
    PrefetchOffloadConfig,
    UVAOffloadConfig,
)

__all__ = [
    "OffloadBackendName",
    "CALLBACK_KEY",
    "CALLBACK_NAME",
    "OffloadSchema",
    "PrefetchOffloadSchema",
    "SCHEMA_NAME",
    "UVAOffloadSchema",
    "register_configs",
]

SCHEMA_NAME = "hydra_offload_schema"
"""Name of the schema in Hydra's ConfigStore (at its root: not an option of ``offload``)."""

CALLBACK_NAME = "hydra_offload_callback"
"""Name of the ConfigStore entry (package ``_global_``) that adds the job callback to
``hydra.callbacks``; every option of the ``offload`` group extends it."""

CALLBACK_KEY = "hydra_offload"
"""The key of the job callback under ``hydra.callbacks``."""

PROVIDER = "hydra-offload"


def _schema_enum(name: str, literal: Any, doc: str) -> type[Enum]:
    """A ``str`` Enum whose members are the values of ``literal``, in its order."""
    values = get_args(literal)
    enum = Enum(name, [(value, value) for value in values], type=str, module=__name__)
    enum.__doc__ = doc
    return enum


OffloadBackendName = _schema_enum(
    "OffloadBackendName",
    OffloadBackend,
    """The ``offload_backend`` values, as an Enum so OmegaConf checks overrides at compose
    time and lists the allowed values when one is wrong. Made from
    :data:`~hydra_offload.config.OffloadBackend`.""",
)

# The Enum standing for each ``Literal`` of the pydantic models, keyed by its values. A new
# Literal field needs its Enum here (bound at module level, so pickles can find it).
_SCHEMA_ENUMS: dict[tuple[Any, ...], type[Enum]] = {get_args(OffloadBackend): OffloadBackendName}

_SCHEMAS: dict[type[BaseModel], type] = {}
_PRIMITIVES = (bool, int, float, str)
_SEQUENCES = (list, tuple, set, frozenset, Sequence, AbstractSet)


def _schema_of(model: type[BaseModel]) -> type:
    """The structured-config dataclass of ``model``: one field per pydantic field, with the
    type OmegaConf checks while composing and the same default.

    The dataclasses are generated, not written out, so the Hydra schema cannot drift from
    :mod:`hydra_offload.config`; the value rules (bounds, segment names, cross-field rules)
    stay with the pydantic models, which :func:`to_offload_config` applies.
    """
    if model in _SCHEMAS:
        return _SCHEMAS[model]
    specs = []
    for name, info in model.model_fields.items():
        kind = _schema_type(info.annotation, f"{model.__name__}.{name}")
        if info.is_required():
            spec = field(default=MISSING)
        else:
            default = _schema_value(info.get_default(call_default_factory=True), kind)
            if isinstance(default, (list, dict)) or is_dataclass(default):
                spec = field(default_factory=partial(copy.deepcopy, default))
            else:
                spec = field(default=default)
        specs.append((name, kind, spec))
    schema = make_dataclass(model.__name__.removesuffix("Config") + "Schema", specs)
    schema.__module__ = __name__
    schema.__doc__ = (
        f"Compose-time types and defaults of :class:`~{model.__module__}.{model.__name__}`, "
        "generated from its fields."
    )
    _SCHEMAS[model] = schema
    return schema


def _schema_type(annotation: Any, where: str) -> Any:
    """The type OmegaConf structured configs accept for a pydantic field's annotation."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _schema_type(args[0], where)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return _schema_of(annotation)
    if annotation in _PRIMITIVES or annotation is Any:
        return annotation
    if origin is Literal:
        if args not in _SCHEMA_ENUMS:
            raise TypeError(f"{where}: no Enum for {annotation}; add one to _SCHEMA_ENUMS")
        return _SCHEMA_ENUMS[args]
    if origin in _SEQUENCES:
        items = [arg for arg in args if arg is not Ellipsis]
        if len(items) == 1 and items[0] in _PRIMITIVES:
            return list[items[0]]  # type: ignore[valid-type]
    if origin in (Union, UnionType):
        arms = [arg for arg in args if arg is not type(None)]
        if len(arms) == 1:  # X | None
            inner = _schema_type(arms[0], where)
            return inner if inner is Any else inner | None
        # OmegaConf has no union of a string and a list: the value is checked by
        # to_offload_config.
        return Any
    raise TypeError(f"{where}: no OmegaConf type for {annotation}; extend _schema_type")


def _schema_value(value: Any, kind: Any) -> Any:
    """A pydantic default as the schema's default: sets and tuples become sorted or plain
    lists, nested models dataclass instances, Literal strings Enum members."""
    if isinstance(value, BaseModel):
        schema = _schema_of(type(value))
        kinds = {spec.name: spec.type for spec in fields(schema)}
        return schema(**{name: _schema_value(getattr(value, name), kinds[name]) for name in kinds})
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(kind, type) and issubclass(kind, Enum) and value is not None:
        return kind(value)
    return value


UVAOffloadSchema = _schema_of(UVAOffloadConfig)
"""Compose-time types of ``offload.uva`` (see :class:`UVAOffloadConfig` for meaning)."""

PrefetchOffloadSchema = _schema_of(PrefetchOffloadConfig)
"""Compose-time types of ``offload.prefetch`` (see :class:`PrefetchOffloadConfig`)."""

OffloadSchema = _schema_of(OffloadConfig)
"""Compose-time types of the ``offload`` node (see :class:`OffloadConfig`). ``layers`` is
typed ``Any`` because OmegaConf has no union of a string and a list; its value is checked by
:func:`to_offload_config`."""


_MISSING_FIELD = re.compile(
    rf"^In '{SCHEMA_NAME}': ConfigKeyError raised while composing config:\n"
    r"Key '(?P<key>[^']+)' not in '(?P<owner>[^']+)'"
)


def explain_missing_offload_field() -> None:
    """Make the error of an app whose structured primary config (a dataclass in the
    ConfigStore, a hydra-zen ``make_config``) has no field for the ``offload`` group one line
    that says what to declare, instead of Hydra's composition error naming this package's
    hidden schema (idempotent; the plugin calls it).

    Hydra merges each group option into the primary config; a structured config refuses a key
    it does not declare. Only that error, raised while merging the schema, is reworded; every
    other passes as it is. Under ``@hydra.main`` (and without ``HYDRA_FULL_ERROR``) the line is
    all the app prints before it exits with status 1: Hydra would add its hint about stack
    traces, which have nothing to show here. Elsewhere (``hydra.compose``) it is raised as a
    ``ConfigCompositionException``.
    """
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.errors import ConfigCompositionException

    compose = ConfigLoaderImpl._compose_config_from_defaults_list
    if getattr(compose, "_explains_missing_offload_field", False):
        return

    def compose_or_explain(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return compose(self, *args, **kwargs)
        except ConfigCompositionException as err:
            found = _MISSING_FIELD.match(str(err))
            if found is None:
                raise
            key, owner = found["key"], found["owner"]
            message = (
                f"the primary config {owner} (a structured config) has no field '{key}' for "
                f"the offload group to fill: declare `{key}: Any = None` in it (hydra-zen: "
                f"make_config({key}=None, ...))"
            )
            if _reported_by_hydra_main():
                sys.stderr.write(message + "\n")
                raise SystemExit(1) from None
            raise ConfigCompositionException(message) from None

    compose_or_explain._explains_missing_offload_field = True  # type: ignore[attr-defined]
    ConfigLoaderImpl._compose_config_from_defaults_list = compose_or_explain  # type: ignore[method-assign]


def _reported_by_hydra_main() -> bool:
    """Whether an exception raised here reaches ``@hydra.main``'s error report (Hydra's
    ``run_and_report`` is on the stack) and that report would be the short one (no
    ``HYDRA_FULL_ERROR``, no debugger)."""
    from hydra._internal import utils

    if os.environ.get("HYDRA_FULL_ERROR") == "1" or utils.is_under_debugger():
        return False
    report = utils.run_and_report.__code__
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is report:
            return True
        frame = frame.f_back  # type: ignore[assignment]
    return False


def register_configs() -> None:
    """Store the schema and the job-callback config in Hydra's ConfigStore (idempotent).

    Hydra's plugin discovery calls this before composition; call it yourself only when you
    compose configs with Hydra's plugins disabled.

    Both are stored at the root of the ConfigStore, so ``offload``'s options stay the group
    files (``none``, ``uva``, ``prefetch``). The schema's nodes accept keys they do not declare,
    so that an unknown key reaches validation, which names the allowed keys.

    Example:
        >>> from hydra.core.config_store import ConfigStore
        >>> register_configs()
        >>> "hydra_offload_schema.yaml" in ConfigStore.instance().list("")
        True
    """
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    schema = OmegaConf.structured(OffloadSchema)
    _accept_unknown_keys(schema)
    store.store(name=SCHEMA_NAME, node=schema, provider=PROVIDER)
    target = "hydra_offload.integrations.hydra_callback.OffloadJobCallback"
    store.store(
        name=CALLBACK_NAME,
        node={"hydra": {"callbacks": {CALLBACK_KEY: {"_target_": target}}}},
        package="_global_",
        provider=PROVIDER,
    )


def _accept_unknown_keys(node: DictConfig) -> None:
    """Let ``node`` and the mappings inside it take keys the schema does not declare.

    Hydra refuses an unknown key of a closed node with "To append to your config use +key",
    and a key added that way is refused later anyway. Left open, the key reaches
    :func:`to_offload_config`, whose one line names the key, a close match and the allowed
    keys. The types of the declared keys are still checked while composing.
    """
    OmegaConf.set_struct(node, False)
    for key in node:
        child = node[key]
        if isinstance(child, DictConfig):
            _accept_unknown_keys(child)
