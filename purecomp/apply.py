"""``purecomp.apply``: run a model with a compression method, purely.

``apply(model, method, params, state, *args)`` computes
``functional_call(model, method.params(params, state), args)`` with ``method.sites(state)``
applied at their call sites. ``model`` itself is not modified (BatchNorm running statistics
update the buffer tensors passed in ``params`` in train mode, exactly as a normal forward
updates the module's own).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import optree
from torch import Tensor, nn
from torch.func import functional_call

from .graph import flatten_inputs
from .intercept import Interceptor, ScopeStack, SiteFn

if TYPE_CHECKING:
    from .compression import Compression


def _transform_inputs(args: tuple, kwargs: dict, fns: Mapping[str, SiteFn]) -> tuple[tuple, dict]:
    """Apply ``input:<name>`` transforms to the named model inputs (see ``graph.flatten_inputs``)."""
    if not fns:
        return args, kwargs
    wanted = {key.partition(":")[2]: fn for key, fn in fns.items()}
    replaced = {id(t): wanted[name](t) for name, t in flatten_inputs(args, kwargs) if name in wanted}
    if not replaced:
        return args, kwargs
    swap = lambda leaf: replaced.get(id(leaf), leaf)  # noqa: E731
    return optree.tree_map(swap, args), optree.tree_map(swap, kwargs)


def call_with_sites(
    model: nn.Module,
    params: Mapping[str, Tensor],
    sites: Mapping[str, SiteFn],
    args: tuple,
    kwargs: dict,
) -> Any:
    """``functional_call`` with site transforms (keys ``<site>:in<k>``, ``<site>:out<j>``, ``input:<name>``)."""
    input_fns = {k: fn for k, fn in sites.items() if k.startswith("input:")}
    op_fns = {k: fn for k, fn in sites.items() if not k.startswith("input:")}
    args, kwargs = _transform_inputs(args, kwargs, input_fns)
    if not op_fns:
        return functional_call(model, dict(params), args, kwargs)
    scopes = ScopeStack(model)
    with scopes.attached(), Interceptor(scopes, sites=op_fns):
        return functional_call(model, dict(params), args, kwargs)


def apply(
    model: nn.Module,
    method: Compression,
    params: Mapping[str, Tensor],
    state: Any,
    *args: Any,
    **kwargs: Any,
) -> Any:
    """Run ``model`` on ``args`` with ``method``'s weight transform and activation transforms."""
    return call_with_sites(model, method.params(params, state), method.sites(state), args, kwargs)
