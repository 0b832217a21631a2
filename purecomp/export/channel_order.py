"""Move a grouped linear's input permutation into the linear that produces its input.

For ``y = L2(f(L1(x)))`` with ``f`` acting on each channel alone (GELU, ReLU...) and a permutation
``P`` of ``L1``'s outputs, ``f(L1(x))[..., P] = f(L1_P(x))`` where ``L1_P`` has the rows of ``L1``'s
weight (and per-row scales, zero points, bias) taken in order ``P``: the same values, so ``L2``
reads its input already in group order and needs no Transpose -> Gather -> Transpose at run time.
Only when ``L1``'s output and ``f``'s output each have exactly one reader and no activation
transform sits on either.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import nn
from torch.nn.utils import parametrize

from purecomp.graph import ModelGraph, OpNode, TensorRef
from purecomp.op_kinds import CHANNELWISE_OPS

from .modules import Dequantize


def _only_reader(graph: ModelGraph, node: OpNode, reader: OpNode) -> bool:
    ref = TensorRef("node", node.site, 0)
    readers = graph.consumers(ref)
    return len(readers) == 1 and readers[0] == (reader, 0) and ref not in graph.outputs


def permutable_producer(graph: ModelGraph, site: str, sites: Collection[str]) -> str | None:
    """The module scope of ``L1`` for the linear call ``site`` reading ``f(L1(x))`` (see module
    docstring), or ``None``. ``sites``: the keys of the activation transforms in the export."""
    node = graph.node(site)
    act = graph.producer(node.inputs[0])
    if act is None or act.op not in CHANNELWISE_OPS or not _only_reader(graph, act, node):
        return None
    first = graph.producer(act.inputs[0])
    if first is None or first.op != "linear" or not first.scope or not _only_reader(graph, first, act):
        return None
    if graph.has_site(f"{first.scope}/linear#1"):
        return None
    if {f"{first.site}:out0", f"{act.site}:in0", f"{act.site}:out0"} & set(sites):
        return None
    return first.scope


def permute_output_rows(model: nn.Module, scope: str, order: torch.Tensor) -> bool:
    """Take the output channels of the linear at ``scope`` in ``order`` (in place): rows of the
    weight (integers and per-row scales / zero points when quantized) and of the bias; for a
    module whose ``row_parts()`` lists the linears that make up its output (a ``GroupedLinear``
    without output quantizer), of each of them. Returns False (and changes nothing) for any other
    module."""
    module = model.get_submodule(scope)
    if callable(getattr(module, "row_parts", None)):
        parts = module.row_parts()
        if parts is None:
            return False
        linears = list(parts)
    elif isinstance(module, nn.Linear):
        linears = [module]
    else:
        return False
    if not all(linear.out_features == order.numel() and _row_permutable(linear) for linear in linears):
        return False
    with torch.no_grad():
        for linear in linears:
            _permute_rows(linear, order)
        if not isinstance(module, nn.Linear) and getattr(module, "bias", None) is not None:
            module.bias = nn.Parameter(module.bias[order].contiguous(), requires_grad=False)
    return True


def _row_permutable(linear: nn.Linear) -> bool:
    if not parametrize.is_parametrized(linear, "weight"):
        return True
    chain = linear.parametrizations.weight
    return len(chain) == 1 and isinstance(chain[0], Dequantize) and (chain[0].scale.dim() == 0 or chain[0].axis == 0)


def _permute_rows(linear: nn.Linear, order: torch.Tensor) -> None:
    if parametrize.is_parametrized(linear, "weight"):
        chain = linear.parametrizations.weight
        dq = chain[0]
        if dq.scale.dim():
            dq.scale = dq.scale[order].contiguous()
            dq.zero_point = dq.zero_point[order].contiguous()
        chain.original = nn.Parameter(chain.original[order].contiguous(), requires_grad=False)
    else:
        linear.weight = nn.Parameter(linear.weight[order].contiguous(), requires_grad=False)
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias[order].contiguous(), requires_grad=False)
