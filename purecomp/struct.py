"""Frozen state structs that are optree pytrees, and helpers for torch.func boundaries.

Tensors are leaves; fields declared with ``static_field()`` are metadata (part of the tree
structure, compared for equality, never transformed). torch.func does not read optree
trees, so flatten to a list of leaves before crossing a torch.func boundary and unflatten
inside the transformed function.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

import optree
import optree.dataclasses as optree_dataclasses

NAMESPACE = "purecomp"
T = TypeVar("T")


def struct(cls: type[T]) -> type[T]:
    """Make ``cls`` a frozen dataclass registered as an optree node in the ``purecomp`` namespace."""
    return optree_dataclasses.dataclass(cls, frozen=True, namespace=NAMESPACE)


def static_field(**kwargs: Any) -> Any:
    """A dataclass field that is pytree metadata rather than a leaf."""
    return optree_dataclasses.field(pytree_node=False, **kwargs)


replace = dataclasses.replace


def tree_flatten(tree: Any) -> tuple[list[Any], optree.PyTreeSpec]:
    """Flatten a tree that may hold purecomp structs (``None`` is kept as a leaf-free node)."""
    return optree.tree_flatten(tree, namespace=NAMESPACE)


def tree_unflatten(spec: optree.PyTreeSpec, leaves: list[Any]) -> Any:
    return optree.tree_unflatten(spec, leaves)


def tree_map(fn: Callable[..., Any], tree: Any, *rest: Any) -> Any:
    return optree.tree_map(fn, tree, *rest, namespace=NAMESPACE)


def tree_leaves(tree: Any) -> list[Any]:
    return optree.tree_leaves(tree, namespace=NAMESPACE)
