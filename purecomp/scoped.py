"""``scoped(method, ignored, target)``: a method restricted to some call sites (like ``optax.masked``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .compression import Compression
from .init_context import InitContext
from .scopes import Scope


def scoped(
    method: Compression, ignored: Sequence[str] = (), target: Sequence[str] | None = None, *, validate: bool = True
) -> Compression:
    """``method`` that selects only the sites ``ignored`` / ``target`` allow (patterns as in
    ``ignored_scopes`` / ``target_scopes``: a site, a module scope, or ``{re}<regex>``), on top of
    its own scopes and any enclosing ``scoped``. Wrapping a ``chain`` restricts every member.

    Only ``init`` changes: it hands ``method.init`` a context whose ``scope`` is restricted. A
    pattern that matches no site raises ``ScopeError`` at ``scoped.ignored[i]`` / ``scoped.target[i]``
    unless ``validate`` is false (NNCF's ``validate_scopes: false``).
    """
    scope = Scope(ignored, target)  # type: ignore[arg-type]  # Scope checks the patterns and makes tuples

    def init(context: InitContext) -> Any:
        if validate:
            scope.check(context.graph, "scoped.")
        inner = scope if context.scope is None else context.scope.restrict(scope)
        return method.init(dataclasses.replace(context, scope=inner))

    return method._replace(init=init)


def section_scoped(section: Mapping[str, Any], build: Callable[[Sequence[str], Sequence[str] | None], Compression],
                   origin: str = "") -> Compression:
    """A config section's method with its ``ignored_scopes`` / ``target_scopes`` (a pattern or a
    list) and NNCF's ``validate_scopes`` (default true: a pattern matching no site is a
    ``ScopeError`` at ``<origin>ignored_scopes[i]``). ``build(ignored, target)`` makes the method;
    with ``validate_scopes: false`` it is built unscoped and wrapped in an unchecked ``scoped``."""
    ignored = section.get("ignored_scopes", ())
    target = section.get("target_scopes")
    ignored = (ignored,) if isinstance(ignored, str) else tuple(ignored)
    target = (target,) if isinstance(target, str) else None if target is None else tuple(target)
    if section.get("validate_scopes", True):
        return build(ignored, target)
    return scoped(build((), None), ignored, target, validate=False)
