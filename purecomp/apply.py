"""``purecomp.apply``: run a model with a compression method, purely.

``apply(model, method, params, state, *args)`` computes
``functional_call(model, method.params(params, state), args)`` with ``method.sites(state)``
applied at their call sites. ``model`` itself is not modified (BatchNorm running statistics
update the buffer tensors passed in ``params`` in train mode, exactly as a normal forward
updates the module's own).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import optree
import torch
from torch import Tensor, nn
from torch.func import functional_call

from .compression import with_training
from .graph import flatten_inputs
from .intercept import Interceptor, ScopeStack, SiteFn

if TYPE_CHECKING:
    from .compression import Compression


def transform_inputs(args: tuple, kwargs: dict, fns: Mapping[str, SiteFn]) -> tuple[tuple, dict]:
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
    with intercepting(model, sites):
        args, kwargs = transform_inputs(args, kwargs, input_sites(sites))
        return functional_call(model, dict(params), args, kwargs)


def input_sites(sites: Mapping[str, SiteFn]) -> dict[str, SiteFn]:
    return {k: fn for k, fn in sites.items() if k.startswith("input:")}


@contextlib.contextmanager
def intercepting(model: nn.Module, sites: Mapping[str, SiteFn]) -> Iterator[None]:
    """Scope hooks on ``model`` and the interception mode for op-call ``sites``, for one block."""
    op_fns = {k: fn for k, fn in sites.items() if not k.startswith("input:")}
    if not op_fns:
        yield
        return
    scopes = ScopeStack(model)
    with scopes.attached(), Interceptor(scopes, sites=op_fns):
        yield


def apply(
    model: nn.Module,
    method: Compression,
    params: Mapping[str, Tensor],
    state: Any,
    *args: Any,
    **kwargs: Any,
) -> Any:
    """Run ``model`` on ``args`` with ``method``'s weight transform and activation transforms.

    Stochastic parts of the state (RB sparsity gates) follow ``model.training``."""
    state = with_training(state, model.training)
    return call_with_sites(model, method.params(params, state), method.sites(state), args, kwargs)


def compile_apply(model: nn.Module, method: Compression, **compile_kwargs: Any) -> Callable[..., Any]:
    """``apply`` with the model call compiled by ``torch.compile(**compile_kwargs)``.

    Returns ``run(params, state, *args, **kwargs)``. The scope hooks and the interception mode
    are set up around the compiled call (torch.compile cannot trace hook registration), and
    the weight transform and every site transform are compiled with the model.
    """

    def call(params: Mapping[str, Tensor], state: Any, args: tuple, kwargs: dict) -> Any:
        state = with_training(state, model.training)
        args, kwargs = transform_inputs(args, kwargs, input_sites(method.sites(state)))
        return functional_call(model, method.params(params, state), args, kwargs)

    compiled = torch.compile(call, **compile_kwargs)

    def run(params: Mapping[str, Tensor], state: Any, *args: Any, **kwargs: Any) -> Any:
        with intercepting(model, method.sites(state)):
            return compiled(params, state, args, kwargs)

    return run
