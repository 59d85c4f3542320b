"""The Hydra schema of the ``offload`` group and the pydantic models say the same thing.

For every field of :class:`~hydra_offload.config.OffloadConfig` and of the models nested in
it, the structured-config dataclass registered in Hydra's ConfigStore has the same key, a type
OmegaConf checks compatibly and the same default; and it has no key the model lacks. The
checker is written here, independently of how ``hydra.py`` builds the dataclasses, and the
last tests show it reports deliberately altered copies.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from enum import Enum
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import pytest
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf
from pydantic import BaseModel, Field, create_model

import hydra_offload.integrations.hydra as hydra_schema
from hydra_offload.config import OffloadConfig, PrefetchOffloadConfig, UVAOffloadConfig

PRIMITIVES = (bool, int, float, str)
SEQUENCES = (list, tuple, set, frozenset)

# --- the checker -------------------------------------------------------------------------


def schema_mismatches(model: type[BaseModel], schema: type, path: str = "") -> list[str]:
    """One line per disagreement between ``model``'s fields and the dataclass ``schema``.

    Keys both ways, the type of each common key and its default (as OmegaConf builds it from
    the dataclass), recursively into nested models.
    """
    problems: list[str] = []
    fields = {f.name: f for f in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema)
    defaults = OmegaConf.to_container(OmegaConf.structured(schema), enum_to_str=True)
    for name in model.model_fields:
        if name not in fields:
            problems.append(f"{path}{name}: a field of {model.__name__}, missing from the schema")
    for name in fields:
        if name not in model.model_fields:
            problems.append(f"{path}{name}: in the schema, not a field of {model.__name__}")
    for name, info in model.model_fields.items():
        if name not in fields:
            continue
        key = f"{path}{name}"
        kind = hints[name]
        problem = type_problem(info.annotation, kind)
        if problem:
            problems.append(f"{key}: {problem}")
        nested = model_of(info.annotation)
        nested_schema = strip_optional(kind)
        if nested is not None and dataclasses.is_dataclass(nested_schema):
            inside = schema_mismatches(nested, nested_schema, f"{key}.")
            problems += inside
            if inside:  # the nested default differs for these reasons; say them only once
                continue
        if info.is_required():
            expected = "???"  # OmegaConf's MISSING
        else:
            expected = plain(info.get_default(call_default_factory=True))
        if not same(expected, defaults[name]):
            problems.append(
                f"{key}: default {defaults[name]!r} in the schema, {expected!r} in {model.__name__}"
            )
    return problems


def strip_annotated(annotation: Any) -> Any:
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    return annotation


def is_union(annotation: Any) -> bool:
    return get_origin(annotation) in (Union, types.UnionType)


def strip_optional(annotation: Any) -> Any:
    """``X`` for ``X | None``; anything else as it is."""
    if is_union(annotation):
        arms = [a for a in get_args(annotation) if a is not type(None)]
        if len(arms) == 1:
            return arms[0]
    return annotation


def model_of(annotation: Any) -> type[BaseModel] | None:
    annotation = strip_optional(strip_annotated(annotation))
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def type_problem(annotation: Any, kind: Any) -> str | None:
    """Why OmegaConf's ``kind`` does not check what pydantic's ``annotation`` allows, if so."""
    annotation = strip_annotated(annotation)
    origin, args = get_origin(annotation), get_args(annotation)
    wrong = f"type {kind!r} in the schema for {annotation!r}"
    if is_union(annotation):
        arms = [a for a in args if a is not type(None)]
        if len(arms) == 1:  # X | None: the schema must accept None too, and check X
            if kind is Any:
                return None
            if not (is_union(kind) and type(None) in get_args(kind)):
                return f"{wrong}: not optional"
            return type_problem(arms[0], strip_optional(kind))
        # OmegaConf has no union of a string and a list: only Any lets every arm through.
        return None if kind is Any else f"{wrong}: expected Any"
    if model_of(annotation) is not None:
        return None if dataclasses.is_dataclass(kind) else f"{wrong}: expected a dataclass"
    if annotation in PRIMITIVES:
        return None if kind is annotation else f"{wrong}: expected {annotation.__name__}"
    if origin is Literal:
        if not (isinstance(kind, type) and issubclass(kind, Enum)):
            return f"{wrong}: expected an Enum"
        values = [member.value for member in kind]
        return None if values == list(args) else f"{wrong}: Enum values {values}"
    if origin in SEQUENCES:
        items = [a for a in args if a is not Ellipsis]
        if get_origin(kind) is list and list(get_args(kind)) == items:
            return None
        return f"{wrong}: expected list[{', '.join(getattr(i, '__name__', str(i)) for i in items)}]"
    return f"no rule for {annotation!r}; extend type_problem"


def plain(value: Any) -> Any:
    """A pydantic default as OmegaConf's ``to_container`` gives the schema's."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def same(a: Any, b: Any) -> bool:
    """Equal, and of the same types all the way down (``0 == 0.0`` is not the same)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def schema_classes(schema: type) -> list[type]:
    """``schema`` and every dataclass and Enum its fields use, recursively."""
    found = [schema]
    for kind in typing.get_type_hints(schema).values():
        kind = strip_optional(kind)
        if dataclasses.is_dataclass(kind):
            found += schema_classes(kind)
        elif isinstance(kind, type) and issubclass(kind, Enum):
            found.append(kind)
    return found


# --- the real schema agrees --------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "schema"),
    [
        (OffloadConfig, hydra_schema.OffloadSchema),
        (UVAOffloadConfig, hydra_schema.UVAOffloadSchema),
        (PrefetchOffloadConfig, hydra_schema.PrefetchOffloadSchema),
    ],
)
def test_schema_matches_the_model_field_by_field(model, schema):
    assert schema_mismatches(model, schema) == []


def test_registered_schema_node_holds_the_model_defaults():
    hydra_schema.register_configs()
    node = ConfigStore.instance().load(f"{hydra_schema.SCHEMA_NAME}.yaml").node
    composed = OmegaConf.to_container(node, enum_to_str=True)
    assert same(composed, OffloadConfig().model_dump(mode="json"))


def test_every_schema_class_is_importable_by_its_name():
    # Hydra's launchers pickle composed configs, whose nodes refer to these classes by name.
    for cls in schema_classes(hydra_schema.OffloadSchema):
        assert cls.__module__ == hydra_schema.__name__, cls
        assert getattr(hydra_schema, cls.__qualname__) is cls, cls


def test_backend_enum_lists_the_literal_values_in_order():
    assert [m.value for m in hydra_schema.OffloadBackendName] == ["auto", "uva", "prefetch"]
    assert all(isinstance(m, str) for m in hydra_schema.OffloadBackendName)


# --- the checker catches drift -----------------------------------------------------------


def altered(schema: type, *, drop=(), add=(), change=None) -> type:
    """A copy of the dataclass ``schema`` with fields dropped, added or replaced.

    ``change`` maps a field name to ``(type, dataclasses.field(...))``; ``add`` is a list of
    ``(name, type, dataclasses.field(...))``.
    """
    change = change or {}
    hints = typing.get_type_hints(schema)
    specs = []
    for f in dataclasses.fields(schema):
        if f.name in drop:
            continue
        if f.name in change:
            specs.append((f.name, *change[f.name]))
            continue
        if f.default is not dataclasses.MISSING:
            spec = dataclasses.field(default=f.default)
        else:
            spec = dataclasses.field(default_factory=f.default_factory)
        specs.append((f.name, hints[f.name], spec))
    return dataclasses.make_dataclass(f"Altered{schema.__name__}", [*specs, *add])


def with_prefetch(prefetch_schema: type) -> type:
    """The top-level schema with ``prefetch`` replaced by ``prefetch_schema``."""
    spec = dataclasses.field(default_factory=prefetch_schema)
    return altered(hydra_schema.OffloadSchema, change={"prefetch": (prefetch_schema, spec)})


def test_a_changed_nested_default_is_reported():
    prefetch = altered(
        hydra_schema.PrefetchOffloadSchema,
        change={"offload_num_in_group": (int, dataclasses.field(default=2))},
    )
    assert schema_mismatches(OffloadConfig, with_prefetch(prefetch)) == [
        "prefetch.offload_num_in_group: default 2 in the schema, 1 in PrefetchOffloadConfig"
    ]


def test_a_default_of_the_wrong_type_is_reported():
    uva = altered(
        hydra_schema.UVAOffloadSchema,
        change={"cpu_offload_gb": (Any, dataclasses.field(default=0))},
    )
    problems = schema_mismatches(UVAOffloadConfig, uva)
    assert problems == [
        "cpu_offload_gb: type typing.Any in the schema for <class 'float'>: expected float",
        "cpu_offload_gb: default 0 in the schema, 0.0 in UVAOffloadConfig",
    ]


def test_a_changed_type_is_reported():
    prefetch = altered(
        hydra_schema.PrefetchOffloadSchema,
        change={"offload_params": (Any, dataclasses.field(default_factory=list))},
    )
    (problem,) = schema_mismatches(PrefetchOffloadConfig, prefetch)
    assert problem.startswith("offload_params: type typing.Any in the schema")
    assert problem.endswith("expected list[str]")


def test_a_missing_key_and_an_extra_key_are_reported():
    prefetch = altered(
        hydra_schema.PrefetchOffloadSchema,
        drop=("offload_prefetch_step",),
        add=[("offload_prefetch_steps", int, dataclasses.field(default=1))],
    )
    assert schema_mismatches(OffloadConfig, with_prefetch(prefetch)) == [
        "prefetch.offload_prefetch_step: a field of PrefetchOffloadConfig, missing from the schema",
        "prefetch.offload_prefetch_steps: in the schema, not a field of PrefetchOffloadConfig",
    ]


def test_an_enum_that_drops_a_literal_value_is_reported():
    short = Enum("ShortBackend", [("auto", "auto"), ("uva", "uva")], type=str)
    schema = altered(
        hydra_schema.OffloadSchema,
        change={"offload_backend": (short, dataclasses.field(default=short.auto))},
    )
    (problem,) = schema_mismatches(OffloadConfig, schema)
    assert problem.startswith("offload_backend: type <enum 'ShortBackend'>")
    assert problem.endswith("Enum values ['auto', 'uva']")


def test_a_model_field_the_schema_lacks_is_reported():
    # The reverse direction: the model grows a field, the schema does not.
    grown = create_model(
        "GrownUVAOffloadConfig",
        __base__=UVAOffloadConfig,
        cpu_offload_pin=(bool, Field(default=True)),
    )
    assert schema_mismatches(grown, hydra_schema.UVAOffloadSchema) == [
        "cpu_offload_pin: a field of GrownUVAOffloadConfig, missing from the schema"
    ]


def test_a_nested_default_that_differs_from_the_nested_class_is_reported():
    # The nested dataclass agrees with the nested model, but the parent's default for the
    # field (its default_factory) holds other values than the model's.
    spec = dataclasses.field(
        default_factory=lambda: hydra_schema.UVAOffloadSchema(cpu_offload_gb=4.0)
    )
    schema = altered(
        hydra_schema.OffloadSchema, change={"uva": (hydra_schema.UVAOffloadSchema, spec)}
    )
    (problem,) = schema_mismatches(OffloadConfig, schema)
    assert problem.startswith("uva: default {'cpu_offload_gb': 4.0")


def test_an_optional_field_must_stay_optional():
    model = create_model("WithLimit", limit=(int | None, None))
    schema = dataclasses.make_dataclass(
        "LimitSchema", [("limit", int, dataclasses.field(default=0))]
    )
    assert schema_mismatches(model, schema) == [
        "limit: type <class 'int'> in the schema for int | None: not optional",
        "limit: default 0 in the schema, None in WithLimit",
    ]


# --- the generator covers the annotations a new field may use ----------------------------


def test_a_new_model_gets_a_schema_that_agrees_with_it():
    inner = create_model("InnerConfig", depth=(int, 3))
    model = create_model(
        "NewConfig",
        backend=(typing.Literal["auto", "uva", "prefetch"], "uva"),
        limit=(int | None, None),
        ratio=(float | None, 0.5),
        sizes=(tuple[int, ...], (1, 2)),
        names=(frozenset[str], frozenset({"b", "a"})),
        where=(str | list[str] | None, None),
        inner=(inner, Field(default_factory=lambda: inner(depth=5))),
        required=(str, ...),
    )
    schema = hydra_schema._schema_of(model)
    assert schema.__name__ == "NewSchema"
    assert schema_mismatches(model, schema) == []


def test_a_literal_without_an_enum_fails_loudly():
    model = create_model("ColourConfig", colour=(typing.Literal["red", "blue"], "red"))
    with pytest.raises(TypeError, match=r"ColourConfig\.colour: no Enum for"):
        hydra_schema._schema_of(model)
