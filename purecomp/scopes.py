"""Which call sites a method may compress: ``ignored_scopes`` / ``target_scopes`` patterns.

A pattern names sites of a recorded ``ModelGraph``: a plain string equals a site
(``layer1.0.conv1/conv2d#0``), its module scope (``layer1.0.conv1``) or a module scope above it
(``layer1`` covers everything inside ``layer1``); ``{re}<regex>`` matches a site whose name the
regex *searches* successfully (``re.search``, as NNCF does: ``{re}conv1`` matches
``layer1.0.conv1/conv2d#0``; anchor with ``^...$`` for a full match).

NNCF's internal names (``ResNet/Sequential[layer1]/BasicBlock[0]/NNCFConv2d[conv1]/conv2d_0``,
with an optional ``|WEIGHT`` / ``|OUTPUT`` suffix) are translated to purecomp's
(``layer1.0.conv1/conv2d#0``, ``layer1.0.conv1.weight``, ``...:out0``) by ``from_nncf_name``:
drop the model class, keep each ``[name]``, and turn the trailing ``op_N`` into ``op#N`` (NNCF's
in-place and dunder spellings ``relu_``, ``__iadd__`` become ``relu``, ``add``). A pattern that
still matches nothing raises ``ScopeError`` naming the nearest sites.
A ``Scope`` bundles ignored and target patterns; ``purecomp.scoped`` hands one to a method's
``init`` (``InitContext.scope``) and every built-in method selects its sites with ``select_sites``.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Iterable, Sequence

from .errors import ConfigError, ScopeError
from .graph import ModelGraph, OpNode

_NNCF_MODULE = re.compile(r"^[A-Za-z_][\w.]*\[(?P<name>[^\[\]/]+)\]$")
_NNCF_OP = re.compile(r"^(?P<op>[A-Za-z_][\w]*?)_(?P<index>\d+)$")
_NNCF_INPUT = re.compile(r"^/?nncf_model_input_(?P<index>\d+)$")
_NNCF_SUFFIXES = ("|WEIGHT", "|OUTPUT")
_DUNDER_OPS = {"iadd": "add", "radd": "add", "imul": "mul", "rmul": "mul", "isub": "sub", "rsub": "sub",
               "itruediv": "truediv", "rtruediv": "truediv", "getitem": "getitem", "matmul": "matmul"}


def _nncf_op(name: str) -> str:
    """NNCF's spelling of an op (``relu_``, ``__iadd__``, ``__add__``) -> the recorder's (``relu``, ``add``)."""
    bare = name.strip("_")
    return _DUNDER_OPS.get(bare, bare) if name.startswith("__") else name.rstrip("_")


def from_nncf_name(pattern: str) -> str | None:
    """purecomp's name for an NNCF-internal scope name, or ``None`` when ``pattern`` is not one.

    ``Model/Type[a]/Type[0]/NNCFConv2d[conv1]/conv2d_0`` -> ``a.0.conv1/conv2d#0`` (a site);
    ``Model/Type[a]/Type[b]`` -> ``a.b`` (a module scope); ``...|WEIGHT`` -> ``a.b.weight`` (the
    parameter a weight quantizer is keyed by); ``...op_N|OUTPUT`` -> ``scope/op#N:out0`` (an
    activation quantizer key); ``/nncf_model_input_N`` -> ``input:N``. ``{re}`` patterns are not
    translated (a regex over NNCF's names cannot be rewritten reliably)."""
    if pattern.startswith("{re}") or "/" not in pattern:
        return None
    suffix = next((s for s in _NNCF_SUFFIXES if pattern.endswith(s)), "")
    body = pattern[: len(pattern) - len(suffix)]
    found = _NNCF_INPUT.match(body)
    if found:
        return f"input:{found['index']}"
    parts = body.split("/")
    head, rest = parts[0], parts[1:]
    if not rest or (head and not re.fullmatch(r"[A-Za-z_]\w*", head)):
        return None
    names: list[str] = []
    op: str | None = None
    for i, part in enumerate(rest):
        module = _NNCF_MODULE.match(part)
        if module:
            names.append(module["name"])
            continue
        call = _NNCF_OP.match(part)
        if call and i == len(rest) - 1:
            op = f"{_nncf_op(call['op'])}#{call['index']}"
            continue
        return None
    scope = ".".join(names)
    if suffix == "|WEIGHT":
        return f"{scope}.weight" if scope else None
    if op is None:
        return scope or None if not suffix else None
    site = f"{scope}/{op}" if scope else op  # the recorder names a top-level call ``add#0``
    return f"{site}:out0" if suffix == "|OUTPUT" else site


_NNCF_REGEX_MODULE = re.compile(r"^[A-Za-z_]\w*\\\[(?P<name>.+?)\\\](?P<rest>.*)$")


def from_nncf_regex(regex: str) -> str | None:
    """purecomp's regex for a ``{re}`` regex written over NNCF's names, or ``None`` when it has no
    NNCF module component (``Type\\[name\\]``). ``ResNet/NNCFLinear\\[fc\\]/.*`` -> ``^fc[./].*``: a
    leading model class becomes ``^``, each ``Type\\[name\\]`` its ``name``, a trailing ``op_N`` ``op#N``,
    and ``/`` between components ``[./]`` (purecomp joins modules with ``.`` and the op with ``/``)."""
    if "\\[" not in regex:
        return None
    parts = regex.split("/")
    out: list[str] = []
    anchor = ""
    for i, part in enumerate(parts):
        if i == 0 and re.fullmatch(r"\^?[A-Za-z_]\w*", part) and len(parts) > 1:
            anchor = "^"  # NNCF's names start with the model class
            continue
        module = _NNCF_REGEX_MODULE.match(part)
        call = _NNCF_OP.match(part)
        if module:
            out.append(module["name"] + module["rest"])
        elif call and i == len(parts) - 1:
            out.append(f"{_nncf_op(call['op'])}#{call['index']}")
        else:
            out.append(part)
    return anchor + "[./]".join(out)


def _regex_search(regex: str, name: str) -> bool:
    """NNCF's rule (``re.search``), trying the regex as written, then its NNCF translation."""
    if re.search(regex, name) is not None:
        return True
    translated = from_nncf_regex(regex)
    return translated is not None and re.search(translated, name) is not None


def _translated(pattern: str) -> str:
    return from_nncf_name(pattern) or pattern


def scope_matches(pattern: str, node: OpNode) -> bool:
    """``{re}<regex>`` searches the site name (``re.search``, NNCF's rule); a plain string equals
    the site, its module scope, or a module scope above it (``layer1`` covers
    ``layer1.0.conv1/conv2d#0``); an NNCF-internal name is translated first (``from_nncf_name``)."""
    if pattern.startswith("{re}"):
        return _regex_search(pattern[4:], node.site)
    pattern = _translated(pattern)
    return pattern in (node.site, node.scope) or node.scope.startswith(pattern + ".")


def key_matches(pattern: str, key: str) -> bool:
    """The same for a quantizer key (a parameter name ``layer1.0.conv1.weight`` or a tensor key
    ``layer1.0/relu#0:out0``): equal, below ``pattern`` as a module scope, or ``{re}`` search."""
    if pattern.startswith("{re}"):
        return _regex_search(pattern[4:], key)
    pattern = _translated(pattern)
    return key == pattern or key.startswith(pattern + ".") or key.startswith(pattern + "/")


def nearest(pattern: str, names: Iterable[str], n: int = 3) -> list[str]:
    """Up to ``n`` of ``names`` closest to ``pattern`` (its NNCF translation when it has one)."""
    names = list(dict.fromkeys(names))
    target = (from_nncf_regex(pattern[4:]) or pattern[4:]).strip("^$") if pattern.startswith("{re}") \
        else _translated(pattern)
    containing = sorted((name for name in names if target and target in name), key=len)[:n]
    rest = difflib.get_close_matches(target, [m for m in names if m not in containing], n=n, cutoff=0.0)
    return (containing + rest)[:n]


def check_patterns(graph: ModelGraph, patterns: Sequence[str], path: str) -> None:
    """Raise ``ScopeError`` at ``path[i]`` for a pattern that is not a valid regex or matches no site."""
    for i, pattern in enumerate(patterns):
        try:
            matched = any(scope_matches(pattern, node) for node in graph)
        except re.error as exc:
            raise ScopeError(f"{path}[{i}]", f"invalid regular expression {pattern!r}: {exc}") from None
        if not matched:
            near = nearest(pattern, [n.site for n in graph] + [n.scope for n in graph if n.scope])
            translated = from_nncf_regex(pattern[4:]) if pattern.startswith("{re}") else from_nncf_name(pattern)
            via = f" (read as NNCF's name for {translated!r})" if translated else ""
            raise ScopeError(
                f"{path}[{i}]",
                f"{pattern!r}{via} matches no site of the model; the nearest are {near}; expected a site name, "
                "a module scope, or '{re}<regex>' (set validate_scopes: false to allow patterns that match nothing)",
            )


def _patterns(value: Sequence[str] | None, name: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    out = (value,) if isinstance(value, str) else tuple(value)  # NNCF: one pattern may be a bare string
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
    ignored: Sequence[str] | str,
    target: Sequence[str] | str | None,
    origin: str,
    scope: Scope | None = None,
    validate: bool = True,
) -> frozenset[str]:
    """Sites left compressible by ``ignored_scopes`` / ``target_scopes`` (one pattern or a list;
    with ``validate``, each pattern must match a site: ``ScopeError`` at
    ``<origin>ignored_scopes[i]`` otherwise; NNCF's ``validate_scopes: false`` turns it off),
    further restricted by ``scope`` (``InitContext.scope``, from ``purecomp.scoped``)."""
    ignored = (ignored,) if isinstance(ignored, str) else tuple(ignored)
    target = (target,) if isinstance(target, str) else target
    if validate:
        check_patterns(graph, ignored, f"{origin}ignored_scopes")
        check_patterns(graph, target or (), f"{origin}target_scopes")
    own = Scope(ignored, None if target is None else tuple(target)).restrict(scope)
    return frozenset(node.site for node in graph if own.allows(node))
