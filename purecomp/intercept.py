"""Call-site interception: name every torch op call of a forward and transform its tensors.

A site is ``<module scope>/<op>#<call index>`` (``layer1.0/add#0``; ``conv2d#0`` at the root),
the index counting calls of that op inside that scope during one forward. The scope stack
comes from forward pre/post hooks registered on the model's modules for the duration of
one call only; the ops come from a ``TorchFunctionMode``, so functional ops (``torch.add``,
``F.relu``, ``x + y``, ``out += identity``) are seen as well as module calls.

Transform keys: ``"<site>:in<k>"`` (the k-th tensor argument of the call),
``"<site>:out<j>"`` (the j-th tensor of its result).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import optree
import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

SiteFn = Callable[[Tensor], Tensor]
Recorder = Callable[[str, str, str, int, Any, Any, Any], None]

_KNOWN_FUNCTIONS: dict[Any, str] = {
    torch.nn.functional.max_pool1d: "max_pool1d",
    torch.nn.functional.max_pool2d: "max_pool2d",
    torch.nn.functional.max_pool3d: "max_pool3d",
    torch.nn.functional.adaptive_max_pool1d: "adaptive_max_pool1d",
    torch.nn.functional.adaptive_max_pool2d: "adaptive_max_pool2d",
    torch.nn.functional.adaptive_max_pool3d: "adaptive_max_pool3d",
}

_DUNDER_ALIASES = {"truediv": "div", "floordiv": "floor_divide", "and": "logical_and"}


_KIND_CACHE: dict[Any, str] = {}


@torch.compiler.assume_constant_result
def op_kind(func: Any) -> str:
    """Normalized op name: ``Tensor.__iadd__``, ``Tensor.add_``, ``torch.add`` all give ``add``.

    A pure function of ``func`` (cached; a constant to torch.compile)."""
    kind = _KIND_CACHE.get(func)
    if kind is None:
        kind = _KIND_CACHE[func] = _op_kind(func)
    return kind


def _op_kind(func: Any) -> str:
    known = _KNOWN_FUNCTIONS.get(func)
    if known is not None:
        return known
    name = getattr(func, "__name__", None) or type(func).__name__
    if name.startswith("__") and name.endswith("__"):
        name = name[2:-2]
        if name.startswith(("i", "r")) and name[1:] in {
            "add", "sub", "mul", "truediv", "floordiv", "matmul", "pow", "and", "or", "xor", "mod",
        }:
            name = name[1:]
        return _DUNDER_ALIASES.get(name, name)
    if name.endswith("_") and not name.startswith("_"):
        name = name[:-1]
    return name.lstrip("_")


def site_name(scope: str, kind: str, index: int) -> str:
    return f"{scope}/{kind}#{index}" if scope else f"{kind}#{index}"


def split_site(site: str) -> tuple[str, str, int]:
    """Inverse of ``site_name``: ``(scope, op, index)``."""
    scope, _, rest = site.rpartition("/")
    kind, _, index = rest.partition("#")
    return scope, kind, int(index)


class ScopeStack:
    """Module-name stack kept by forward hooks registered only while ``attached``."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.stack: list[str] = []
        self.module_types: dict[str, str] = {}

    @property
    def current(self) -> str:
        return self.stack[-1] if self.stack else ""

    @property
    def active(self) -> bool:
        return bool(self.stack)

    @contextlib.contextmanager
    def attached(self) -> Iterator[ScopeStack]:
        handles = []
        for name, module in self.model.named_modules():
            self.module_types[name] = type(module).__name__
            handles.append(module.register_forward_pre_hook(self._enter(name)))
            handles.append(module.register_forward_hook(self._leave, always_call=True))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            self.stack.clear()

    def _enter(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            self.stack.append(name)

        return hook

    def _leave(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.stack:
            self.stack.pop()


def _tensor_leaves(tree: Any) -> tuple[list[Any], optree.PyTreeSpec, list[int]]:
    leaves, spec = optree.tree_flatten(tree)
    positions = [i for i, leaf in enumerate(leaves) if isinstance(leaf, Tensor)]
    return leaves, spec, positions


def _transform_tensors(tree: Any, fns: Mapping[int, SiteFn]) -> Any:
    """Apply ``fns[k]`` to the k-th tensor leaf of ``tree``."""
    leaves, spec, positions = _tensor_leaves(tree)
    for k, fn in fns.items():
        if k < len(positions):
            leaves[positions[k]] = fn(leaves[positions[k]])
    return optree.tree_unflatten(spec, leaves)


class Interceptor(TorchFunctionMode):
    """Names each op call, applies site transforms, and reports calls to an optional recorder."""

    def __init__(
        self,
        scopes: ScopeStack,
        sites: Mapping[str, SiteFn] | None = None,
        recorder: Recorder | None = None,
    ) -> None:
        super().__init__()
        self.scopes = scopes
        self.recorder = recorder
        self.counts: dict[tuple[str, str], int] = defaultdict(int)
        self.input_fns: dict[str, dict[int, SiteFn]] = defaultdict(dict)
        self.output_fns: dict[str, dict[int, SiteFn]] = defaultdict(dict)
        for key, fn in (sites or {}).items():
            site, _, port = key.rpartition(":")
            table = self.input_fns if port.startswith("in") else self.output_fns
            table[site][int(port[2:] if port.startswith("in") else port[3:])] = fn
        # only calls in these scopes need a name (all of them while recording)
        self.scopes_with_sites = {split_site(site)[0] for site in (*self.input_fns, *self.output_fns)}

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if not self.scopes.active:
            return func(*args, **kwargs)
        scope = self.scopes.current
        if self.recorder is None and scope not in self.scopes_with_sites:
            return func(*args, **kwargs)
        kind = op_kind(func)
        key = (scope, kind)
        index = self.counts[key]
        self.counts[key] = index + 1
        site = site_name(scope, kind, index)
        in_fns = self.input_fns.get(site)
        if in_fns:
            args, kwargs = _transform_tensors((args, kwargs), in_fns)
        out = func(*args, **kwargs)
        if self.recorder is not None:
            self.recorder(site, kind, scope, index, args, kwargs, out)
        out_fns = self.output_fns.get(site)
        if out_fns:
            out = _transform_tensors(out, out_fns)
        return out
