"""The algorithm registry: config name -> builder, schema fragment and state classes.

``register_algorithm`` is how a method outside the core reaches the JSON config and the
checkpoint decoder. Built-in methods register themselves from their own packages the same way.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Mapping
from importlib import resources
from typing import Any

import jsonschema

from .compression import Compression
from .errors import ConfigError

# builder(section, origin[, context=BuildContext]) -> Compression
AlgorithmBuilder = Callable[..., Compression]


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """A registered method: its config ``name``, ``builder``, the JSON schema of its config
    section (``None``: only ``algorithm`` is checked), the shared ``definitions`` that schema
    references as ``#/$defs/<name>``, and the state classes a checkpoint may rebuild."""

    name: str
    builder: AlgorithmBuilder
    schema: Mapping[str, Any] | None = None
    definitions: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    state_classes: tuple[type, ...] = ()


ALGORITHMS: dict[str, Algorithm] = {}
STATE_CLASSES: dict[str, type] = {}
_DEFINITIONS: dict[str, Any] = {}


def class_name(cls: type) -> str:
    """``module:qualname``, the name a checkpoint records for a class."""
    return f"{cls.__module__}:{cls.__qualname__}"


def core_schema() -> dict[str, Any]:
    """The root config schema of the core (input_info, target_device, the compression list)."""
    return json.loads(resources.files("purecomp").joinpath("schema/config.schema.json").read_text())


def schema() -> dict[str, Any]:
    """The root schema with every registered definition under ``$defs``."""
    root = core_schema()
    root["$defs"] = {**root["$defs"], **_DEFINITIONS}
    return root


def _references(node: Any) -> set[str]:
    if isinstance(node, dict):
        refs = {node["$ref"]} if isinstance(node.get("$ref"), str) else set()
        return refs.union(*(_references(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_references(v) for v in node))
    return set()


def _check_schema(name: str, section: Mapping[str, Any] | None, definitions: Mapping[str, Any]) -> None:
    known = set(core_schema()["$defs"]) | set(_DEFINITIONS) | set(definitions)
    for label, fragment in [("schema", section), *((f"definitions[{k!r}]", v) for k, v in definitions.items())]:
        if fragment is None:
            continue
        try:
            jsonschema.Draft202012Validator.check_schema(dict(fragment))
        except jsonschema.SchemaError as exc:
            raise ConfigError(f"register_algorithm({name!r}).{label}", f"not a valid JSON schema: {exc.message}") from None
        for ref in _references(fragment):
            if not ref.startswith("#/$defs/") or ref[len("#/$defs/"):] not in known:
                raise ConfigError(f"register_algorithm({name!r}).{label}",
                                  f"$ref {ref!r} names no definition; expected '#/$defs/<name>' of {sorted(known)}")
    for key, value in definitions.items():
        if key in _DEFINITIONS and _DEFINITIONS[key] != value:
            raise ConfigError(f"register_algorithm({name!r}).definitions[{key!r}]",
                              "a different definition of that name is already registered")


def register_algorithm(
    name: str,
    builder: AlgorithmBuilder,
    *,
    schema: Mapping[str, Any] | None = None,
    definitions: Mapping[str, Any] | None = None,
    state_classes: Iterable[type] = (),
    replace: bool = False,
) -> Algorithm:
    """Make ``{"algorithm": name, ...}`` config sections build ``builder(section, origin)``
    (``builder(section, origin, context=...)`` when it takes a ``context``: a
    ``purecomp.config.BuildContext`` with the loss and data some initializers need).

    ``schema`` validates the section (JSON Schema 2020-12; errors name the JSON path);
    ``definitions`` are shared sub-schemas it references as ``#/$defs/<name>`` (the core's
    ``scopes`` and ``input`` are always there). ``state_classes`` are the dataclasses of the
    method's state that ``purecomp.load_state`` and ``load_compression_state`` may rebuild:
    a checkpoint rebuilds only these and purecomp's own classes, and imports nothing.
    Registering a taken name raises ``ConfigError`` unless ``replace=True``."""
    if not isinstance(name, str) or not name:
        raise ConfigError("algorithm", f"expected a non-empty algorithm name, got {name!r}")
    if not callable(builder):
        raise ConfigError(f"register_algorithm({name!r})", f"the builder must be callable, got {type(builder).__name__}")
    definitions = dict(definitions or {})
    existing = ALGORITHMS.get(name)
    if existing is not None and not replace and existing.builder is not builder:
        raise ConfigError("algorithm", f"{name!r} is already registered (by {existing.builder.__module__}); "
                          "pass replace=True to replace it")
    _check_schema(name, schema, definitions)
    classes = tuple(state_classes)
    for cls in classes:
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            raise ConfigError(f"register_algorithm({name!r}).state_classes", f"expected dataclasses, got {cls!r}")
    algorithm = Algorithm(name, builder, dict(schema) if schema is not None else None, definitions, classes)
    ALGORITHMS[name] = algorithm
    _DEFINITIONS.update(definitions)
    for cls in classes:
        STATE_CLASSES[class_name(cls)] = cls
    return algorithm


def package_schema(package: str) -> dict[str, Any]:
    """The ``config.schema.json`` shipped in ``package``: ``{"algorithms": {...}, "$defs": {...}}``."""
    return json.loads(resources.files(package).joinpath("config.schema.json").read_text())


def register_package(package: str, builders: Mapping[str, AlgorithmBuilder], state_classes: Iterable[type] = ()) -> None:
    """Register each of ``builders`` with its section schema from ``package``'s
    ``config.schema.json`` (its ``$defs`` shared by all of them) and ``state_classes``."""
    shipped = package_schema(package)
    classes = tuple(state_classes)
    for name, builder in builders.items():
        if name not in shipped["algorithms"]:
            raise ConfigError(f"{package}/config.schema.json", f"has no schema for algorithm {name!r}")
        register_algorithm(name, builder, schema=shipped["algorithms"][name], definitions=shipped.get("$defs", {}),
                           state_classes=classes)
