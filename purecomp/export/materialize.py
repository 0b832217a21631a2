"""``materialize``: turn (model, method, params, state) into an ordinary stateful module.

The result computes what ``purecomp.apply`` computes in eval mode, with export-friendly
pieces: weight-side transforms baked into the weights (masks become zeros), quantized
weights stored as integers behind a ``purecomp::dq`` parametrization, and every activation
quantizer as a ``purecomp::qdq`` module applied at its call site. With the traced graph,
BatchNorm that directly follows a conv or linear is folded into it. For symmetric weights
this is exact on the integer grid: the integers are kept, the per-channel scale becomes
``step * |gamma / sigma|``, and the sign moves into the integers.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from purecomp.apply import input_sites, intercepting, transform_inputs
from purecomp.compression import with_training
from purecomp.errors import StateError
from purecomp.graph import ModelGraph, TensorRef
from purecomp.op_kinds import BN_FOLDABLE_OPS
from purecomp.protocol import HasExportRule, states_with

from .modules import integer_grid, owner
from .rules import ExportContext

__all__ = ["MaterializedModel", "fold_batchnorms", "integer_grid", "materialize"]

log = logging.getLogger(__name__)


class MaterializedModel(nn.Module):
    """``model`` (a modified copy) run with its activation quantizers at their call sites."""

    def __init__(self, model: nn.Module, quantizers: Mapping[str, nn.Module]) -> None:
        super().__init__()
        self.model = model
        self.site_keys = list(quantizers)
        self.quantizers = nn.ModuleList(quantizers.values())

    def sites(self) -> dict[str, nn.Module]:
        return dict(zip(self.site_keys, self.quantizers))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        sites = self.sites()
        with intercepting(self.model, sites):
            args, kwargs = transform_inputs(args, kwargs, input_sites(sites))
            return self.model(*args, **kwargs)


def _bake_params(copy_model: nn.Module, final: Mapping[str, Tensor]) -> None:
    """Write the transformed parameters and buffers into the copy."""
    with torch.no_grad():
        named = dict(copy_model.named_parameters()) | dict(copy_model.named_buffers())
        for name, value in final.items():
            if name in named:
                named[name].copy_(value.detach())


def materialize(
    model: nn.Module,
    method: Any,
    params: Mapping[str, Tensor],
    state: Any,
    graph: ModelGraph | None = None,
) -> MaterializedModel:
    """An eval-mode stateful module computing ``apply(model, method, params, state, ...)``.

    The weight transform is baked into a copy of the model; then every state struct's export
    rule (``purecomp.export.rules``) rewrites it phase by phase. ``graph`` (from
    ``purecomp.trace``) enables BatchNorm folding, which ONNX runtimes need to fuse convolutions
    into integer kernels. The user's model is not modified.
    """
    state = with_training(state, False)
    rules = [s.export_rule() for s in states_with(state, HasExportRule)]
    sites = method.sites(state)
    final = method.params(params, state)
    copy_model = copy.deepcopy(model).eval()
    _bake_params(copy_model, final)
    context = ExportContext(copy_model, graph, dict(final), dict(sites))
    for rule in rules:
        rule.restructure(context)
    for rule in rules:
        rule.encode_weights(context)
    if graph is not None:
        context.remap = fold_batchnorms(copy_model, graph, context.encoded)
    for rule in rules:
        rule.site_modules(context)
    unknown = sorted(set(sites) - context.handled)
    if unknown:
        raise StateError(f"cannot materialize the activation transforms at {unknown[:5]}: no export rule of the "
                         "state handles them")
    for rule in rules:
        rule.finish(context)
    for p in copy_model.parameters():
        p.requires_grad_(False)
    return MaterializedModel(copy_model, context.modules).eval()


# ------------------------------------------------------------------ BatchNorm folding

_FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def foldable_pair(copy_model: nn.Module, graph: ModelGraph, node: Any) -> tuple[nn.Module, nn.Module, Any] | None:
    """``(layer, batchnorm, batchnorm's node)`` when ``node`` is a conv / linear whose output only
    an eval-mode BatchNorm reads (what ``fold_batchnorms`` folds), else None."""
    if node.op not in BN_FOLDABLE_OPS or not node.scope:
        return None
    consumers = graph.consumers(TensorRef("node", node.site, 0))
    if len(consumers) != 1 or consumers[0][0].op != "batch_norm" or consumers[0][1] != 0:
        return None
    bn_node = consumers[0][0]
    layer = copy_model.get_submodule(node.scope)
    bn = copy_model.get_submodule(bn_node.scope) if bn_node.scope else None
    if not isinstance(layer, _FOLDABLE) or not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        return None
    if node.params[:1] != (f"{node.scope}.weight",) or bn.running_mean is None:
        return None
    return layer, bn, bn_node


def fold_batchnorms(copy_model: nn.Module, graph: ModelGraph, encoded: Mapping[str, bool]) -> dict[str, str]:
    """Fold eval-mode BatchNorm into the conv/linear before it; returns the moved site keys.

    ``encoded[name]`` says whether weight ``name``, stored as integers, may take the fold: a float
    weight (absent) is scaled, ``w' = w a`` with ``a = gamma / sqrt(var + eps)`` per output
    channel; a foldable integer weight keeps its integers and its scale becomes ``step |a|``;
    any other integer weight leaves its BatchNorm unfolded."""
    remap: dict[str, str] = {}
    for node in graph:
        pair = foldable_pair(copy_model, graph, node)
        if pair is None:
            continue
        layer, bn, bn_node = pair
        with torch.no_grad():
            a = bn.running_var.float().add(bn.eps).rsqrt()
            if bn.weight is not None:
                a = a * bn.weight.float()
            shift = -bn.running_mean.float() * a + (bn.bias.float() if bn.bias is not None else 0.0)
            if not _fold_weight(layer, a, encoded.get(f"{node.scope}.weight")):
                continue
            bias = layer.bias.float() * a + shift if layer.bias is not None else shift
            layer.bias = nn.Parameter(bias, requires_grad=False)
        parent, attr = owner(copy_model, bn_node.scope)
        setattr(parent, attr, nn.Identity())
        remap[f"{bn_node.site}:out0"] = f"{node.site}:out0"
    return remap


def _fold_weight(layer: nn.Module, a: Tensor, foldable: bool | None) -> bool:
    shape = [-1] + [1] * (layer.weight.dim() - 1)
    if foldable is None:
        layer.weight.mul_(a.reshape(shape))
        return True
    dq = layer.parametrizations.weight[0]
    ints = layer.parametrizations.weight.original
    symmetric_int8 = foldable and ints.dtype == torch.int8 and not bool(dq.zero_point.any())
    if not symmetric_int8 or (a == 0).any() or (ints == -128).any():
        log.info("BatchNorm after %s left unfolded (needs symmetric int8 weights without -128)", type(layer).__name__)
        return False
    step = dq.scale if dq.scale.dim() else dq.scale.expand_as(a)
    dq.scale = (step * a.abs()).contiguous()
    dq.zero_point = torch.zeros_like(dq.scale, dtype=torch.int8)
    dq.axis = 0
    flip = torch.where(a < 0, -1, 1).to(torch.int8).reshape(shape)
    layer.parametrizations.weight.original = nn.Parameter(ints * flip, requires_grad=False)
    return True
