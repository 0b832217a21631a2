"""Which call sites a method may compress: ``ignored_scopes`` / ``target_scopes`` patterns.

A pattern names sites of a recorded ``ModelGraph``: a plain string equals a site
(``layer1.0.conv1/conv2d#0``), its module scope (``layer1.0.conv1``) or a module scope above it
(``layer1`` covers everything inside ``layer1``); ``{re}<regex>`` full-matches the site name.
A ``Scope`` bundles ignored and target patterns; ``purecomp.scoped`` hands one to a method's
``init`` (``InitContext.scope``) and every built-in method selects its sites with ``select_sites``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from .errors import ConfigError, ScopeError
from .graph import ModelGraph, OpNode


def scope_matches(pattern: str, node: OpNode) -> bool:
    """``{re}<regex>`` full-matches the site name; a plain string equals the site, its module
    scope, or a module scope above it (``layer1`` covers ``layer1.0.conv1/conv2d#0``)."""
    if pattern.startswith("{re}"):
        return re.fullmatch(pattern[4:], node.site) is not None
    return pattern in (node.site, node.scope) or node.scope.startswith(pattern + ".")


def key_matches(pattern: str, key: str) -> bool:
    """The same for a quantizer key (a parameter name ``layer1.0.conv1.weight`` or a tensor key
    ``layer1.0/relu#0:out0``): equal, below ``pattern`` as a module scope, or ``{re}`` full match."""
    if pattern.startswith("{re}"):
        return re.fullmatch(pattern[4:], key) is not None
    return key == pattern or key.startswith(pattern + ".") or key.startswith(pattern + "/")


def check_patterns(graph: ModelGraph, patterns: Sequence[str], path: str) -> None:
    """Raise ``ScopeError`` at ``path[i]`` for a pattern that is not a valid regex or matches no site."""
    for i, pattern in enumerate(patterns):
        try:
            matched = any(scope_matches(pattern, node) for node in graph)
        except re.error as exc:
            raise ScopeError(f"{path}[{i}]", f"invalid regular expression {pattern!r}: {exc}") from None
        if not matched:
            raise ScopeError(
                f"{path}[{i}]",
                f"{pattern!r} matches no site of the model; expected a site name such as "
                f"{graph.nodes[0].site!r}, a module scope, or '{{re}}<regex>'",
            )


def _patterns(value: Sequence[str] | None, name: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        raise ConfigError(name, f"expected a list of patterns, got the string {value!r}")
    out = tuple(value)
    for i, p in enumerate(out):
        if not isinstance(p, str):
            raise ConfigError(f"{name}[{i}]", f"expected a string pattern, got {p!r}")
    return out


@dataclasses.dataclass(frozen=True)
class Scope:
    """Sites allowed by ``ignored`` / ``target`` patterns: a site is allowed when some ``target``
    pattern matches it (any site when ``target`` is ``None``; none when it is empty), no
    ``ignored`` pattern does, and ``within`` (another scope, from ``restrict``) allows it too."""

    ignored: tuple[str, ...] = ()
    target: tuple[str, ...] | None = None
    within: Scope | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "ignored", _patterns(self.ignored, "ignored"))
        object.__setattr__(self, "target", _patterns(self.target, "target"))

    def allows(self, node: OpNode) -> bool:
        """Whether ``node``'s site may be compressed."""
        if self.target is not None and not any(scope_matches(p, node) for p in self.target):
            return False
        if any(scope_matches(p, node) for p in self.ignored):
            return False
        return self.within is None or self.within.allows(node)

    def restrict(self, other: Scope | None) -> Scope:
        """The scope allowing what both ``self`` and ``other`` allow."""
        if other is None:
            return self
        flat = self.within is None and other.within is None
        if flat and (self.target is None or other.target is None or set(self.target) == set(other.target)):
            ignored = self.ignored + tuple(p for p in other.ignored if p not in self.ignored)
            return Scope(ignored, self.target if self.target is not None else other.target)
        return dataclasses.replace(self, within=other if self.within is None else self.within.restrict(other))

    def check(self, graph: ModelGraph, origin: str = "") -> None:
        """Raise ``ScopeError`` (at ``<origin>ignored[i]`` / ``<origin>target[i]``) for a pattern
        matching no site of ``graph``; ``within`` is checked where it was made."""
        check_patterns(graph, self.ignored, f"{origin}ignored")
        check_patterns(graph, self.target or (), f"{origin}target")


def select_sites(
    graph: ModelGraph,
    ignored: Sequence[str],
    target: Sequence[str] | None,
    origin: str,
    scope: Scope | None = None,
) -> frozenset[str]:
    """Sites left compressible by ``ignored_scopes`` / ``target_scopes`` (each pattern must match
    a site: ``ScopeError`` at ``<origin>ignored_scopes[i]`` otherwise), further restricted by
    ``scope`` (``InitContext.scope``, from ``purecomp.scoped``)."""
    check_patterns(graph, ignored, f"{origin}ignored_scopes")
    check_patterns(graph, target or (), f"{origin}target_scopes")
    own = Scope(tuple(ignored), None if target is None else tuple(target)).restrict(scope)
    return frozenset(node.site for node in graph if own.allows(node))
