"""``scoped(method, ignored, target)``: a method restricted to some call sites (like ``optax.masked``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from .compression import Compression
from .init_context import InitContext
from .scopes import Scope


def scoped(method: Compression, ignored: Sequence[str] = (), target: Sequence[str] | None = None) -> Compression:
    """``method`` that selects only the sites ``ignored`` / ``target`` allow (patterns as in
    ``ignored_scopes`` / ``target_scopes``: a site, a module scope, or ``{re}<regex>``), on top of
    its own scopes and any enclosing ``scoped``. Wrapping a ``chain`` restricts every member.

    Only ``init`` changes: it hands ``method.init`` a context whose ``scope`` is restricted. A
    pattern that matches no site raises ``ScopeError`` at ``scoped.ignored[i]`` / ``scoped.target[i]``.
    """
    scope = Scope(ignored, target)  # type: ignore[arg-type]  # Scope checks the patterns and makes tuples

    def init(context: InitContext) -> Any:
        scope.check(context.graph, "scoped.")
        inner = scope if context.scope is None else context.scope.restrict(scope)
        return method.init(dataclasses.replace(context, scope=inner))

    return method._replace(init=init)
