"""The extension protocol: what a state struct tells the core about itself.

The core (statistics, compression stage, export) never imports a method. It walks the state
tree and asks each struct that implements one of these methods:

- ``statistics(graph) -> {table title: [row, ...]}``: rows of the ``purecomp.statistics`` report;
- ``compression_progress() -> float``: progress toward the method's target in ``[0, 1]``
  (``compression_stage``: 0 for all members is UNCOMPRESSED, 1 for all is FULLY_COMPRESSED);
  a state without it counts as fully applied;
- ``export_rule() -> purecomp.export.rules.ExportRule``: how its weights and sites become
  modules (and ONNX nodes) in ``purecomp.export.materialize``;
- ``output_grid() -> (scale, zero_point, qmin, qmax) | None``: the integer grid of a quantizer
  on the model's output (``purecomp.export.check`` measures errors in its steps).

A struct that implements none of them is searched inside (its fields, tuples, lists, dict
values), so a wrapper state exposes the states it holds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

from .graph import ModelGraph

PROTOCOL_METHODS = ("statistics", "compression_progress", "export_rule", "output_grid")


@runtime_checkable
class HasStatistics(Protocol):
    def statistics(self, graph: ModelGraph | None) -> dict[str, list[dict[str, Any]]]: ...


@runtime_checkable
class HasProgress(Protocol):
    def compression_progress(self) -> float: ...


@runtime_checkable
class HasExportRule(Protocol):
    def export_rule(self) -> Any: ...


def _implements(value: Any) -> bool:
    return any(callable(getattr(value, name, None)) for name in PROTOCOL_METHODS)


def method_states(state: Any) -> Iterator[Any]:
    """The structs of a state tree that implement the protocol, in tree order."""
    if _implements(value := state) and not isinstance(value, type):
        yield value
        return
    if isinstance(state, (tuple, list)):
        for item in state:
            yield from method_states(item)
    elif isinstance(state, dict):
        for item in state.values():
            yield from method_states(item)
    elif dataclasses.is_dataclass(state) and not isinstance(state, type):
        for field in dataclasses.fields(state):
            yield from method_states(getattr(state, field.name))


def states_with(state: Any, protocol: type) -> list[Any]:
    """The structs of ``state`` that implement ``protocol`` (``HasStatistics``, ``HasProgress``, ...)."""
    return [s for s in method_states(state) if isinstance(s, protocol)]
