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
from torch.nn.utils import parametrize

from purecomp.apply import _input_sites, _transform_inputs, intercepting
from purecomp.compression import with_training
from purecomp.errors import StateError
from purecomp.graph import ModelGraph, TensorRef
from purecomp.intercept import split_site
from purecomp.op_kinds import BN_FOLDABLE_OPS, SHAPE_OPS
from purecomp.ops import adjust_asymmetric_range
from purecomp.ops.reference import EPS
from purecomp.stats import _states
from purecomp.transforms.quantize import AsymmetricQuantizer, QuantizationState, SymmetricQuantizer
from purecomp.transforms.quantize.grouped import GroupedQuantizer

from .embedding import replace_quantized_embeddings
from .grouped_linear import output_key, split_grouped_linear
from .pruning import prune_channels, slice_quantizer
from .qdq_ops import container_for

log = logging.getLogger(__name__)


def integer_grid(quantizer: SymmetricQuantizer | AsymmetricQuantizer | GroupedQuantizer) -> tuple[Tensor, Tensor, int, int]:
    """``(scale, zero_point, qmin, qmax)`` of a quantizer in ONNX terms (MATH.md, Export); one
    scale and zero point per group for a ``GroupedQuantizer``.

    ``y_scale = (high - low) / (qh - ql)``; ``y_zero_point = round(ql - low / y_scale)`` (0 for
    symmetric quantizers); the zero point's dtype (int8 / uint8) is the container.
    """
    ql, qh = quantizer.levels
    if isinstance(quantizer, SymmetricQuantizer):
        scale = (quantizer.scale.detach().float().abs() + EPS) / qh
        zero_point = torch.zeros_like(scale)
    else:
        low, rng = adjust_asymmetric_range(
            quantizer.input_low.detach().float(), quantizer.input_range.detach().float().abs() + EPS, qh
        )
        scale = rng / qh
        zero_point = torch.clamp(torch.round(-low / scale), ql, qh)
    return scale, zero_point.to(container_for(ql, qh)), ql, qh


class QuantizeDequantize(nn.Module):
    """An activation quantizer in export form: ``purecomp::qdq`` with constant scale and zero point."""

    def __init__(self, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> None:
        super().__init__()
        self.register_buffer("scale", scale.reshape(()))
        self.register_buffer("zero_point", zero_point.reshape(()))
        self.qmin, self.qmax = qmin, qmax

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.purecomp.qdq(x, self.scale, self.zero_point, self.qmin, self.qmax, 1)

    def extra_repr(self) -> str:
        return f"levels=[{self.qmin}, {self.qmax}], scale={float(self.scale):.4g}, zero_point={int(self.zero_point)}"


class Dequantize(nn.Module):
    """Parametrization ``weight = (q - zero_point) * scale`` over an integer ``original``."""

    def __init__(self, scale: Tensor, zero_point: Tensor, axis: int) -> None:
        super().__init__()
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero_point)
        self.axis = axis

    def forward(self, q: Tensor) -> Tensor:
        return torch.ops.purecomp.dq(q, self.scale, self.zero_point, self.axis)


class BinarizeActivation(nn.Module):
    """An activation binarizer in export form: ``where(x > s t, s, 0)`` with constant ``s`` and
    per-channel ``s t`` (ONNX: Greater, Where)."""

    def __init__(self, scale: Tensor, threshold: Tensor, axis: int, rank: int) -> None:
        super().__init__()
        shape = [1] * rank
        shape[axis] = -1
        self.register_buffer("scale", scale.reshape(()))
        self.register_buffer("threshold", threshold.reshape(shape))
        self.register_buffer("zero", torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        return torch.where(x.float() > self.threshold, self.scale, self.zero).to(x.dtype)

    def extra_repr(self) -> str:
        return f"scale={float(self.scale):.4g}, channels={self.threshold.numel()}"


class BinarizedWeight:
    """Marks a binarized weight for BatchNorm folding (which leaves its layer unfolded)."""


def _binarize_weight(module: nn.Module, attr: str, weight: Tensor) -> None:
    """Store ``sign * alpha`` as int8 signs behind a per-filter ``purecomp::dq`` (exactly the same values)."""
    w = weight.detach().float()
    dims = tuple(range(1, w.dim()))
    alpha = w.abs().amax(dim=dims) if dims else w.abs()
    signs = torch.where(w > 0, 1, -1).to(torch.int8)
    zero_point = torch.zeros_like(alpha, dtype=torch.int8)
    parametrize.register_parametrization(module, attr, Dequantize(alpha.contiguous(), zero_point, 0), unsafe=True)
    getattr(module.parametrizations, attr).original = nn.Parameter(signs, requires_grad=False)


def _binarizers(state: Any, graph: ModelGraph | None) -> tuple[tuple[str, ...], dict[str, nn.Module]]:
    """(binarized weight names, export modules of the activation binarizers) of the enabled stages."""
    from purecomp.transforms.binarize import BinarizationState

    found = _states(state, BinarizationState)
    if len(found) > 1:
        raise StateError(f"materialize supports one binarization method in a chain; found {len(found)}")
    if not found:
        return (), {}
    bstate = found[0]
    weights = bstate.weights if bstate.weights_on else ()
    modules: dict[str, nn.Module] = {}
    if bstate.activations_on:
        for key, b in bstate.activations.items():
            site = key.rsplit(":", 1)[0]
            if graph is not None and graph.has_site(site):
                rank = len(graph.node(site).input_info[0].shape)
            else:
                rank = 4  # binarized inputs are those of conv2d
            with torch.no_grad():
                scale = b.scale.detach().float()
                threshold = (scale.reshape(()) * b.threshold.detach().float())
            modules[key] = BinarizeActivation(scale, threshold, b.axis % rank, rank)
    return weights, modules


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
            args, kwargs = _transform_inputs(args, kwargs, _input_sites(sites))
            return self.model(*args, **kwargs)


def _quantization_state(state: Any) -> QuantizationState | None:
    found = _states(state, QuantizationState)
    if len(found) > 1:
        raise StateError("materialize supports one quantization method in a chain; found " f"{len(found)}")
    return found[0] if found else None


def _pruning_state(state: Any) -> Any:
    from purecomp.transforms.prune import FilterPruningState

    found = _states(state, FilterPruningState)
    if len(found) > 1:
        raise StateError(f"materialize supports one filter pruning method in a chain; found {len(found)}")
    return found[0] if found else None


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (model.get_submodule(path) if path else model), attr


def _bake_params(copy_model: nn.Module, final: Mapping[str, Tensor]) -> None:
    """Write the transformed parameters and buffers into the copy."""
    with torch.no_grad():
        named = dict(copy_model.named_parameters()) | dict(copy_model.named_buffers())
        for name, value in final.items():
            if name in named:
                named[name].copy_(value.detach())


def _quantize_weight(module: nn.Module, attr: str, weight: Tensor, quantizer: Any) -> None:
    scale, zero_point, _, _ = integer_grid(quantizer)
    axis = quantizer.axis if quantizer.axis is not None else 0
    shape = [1] * weight.dim()
    if quantizer.axis is not None:
        shape[axis] = -1
    ints = torch.round(weight.detach() / scale.reshape(shape)) + zero_point.float().reshape(shape if quantizer.axis is not None else [])
    ints = ints.to(zero_point.dtype)
    parametrize.register_parametrization(module, attr, Dequantize(scale, zero_point, axis), unsafe=True)
    getattr(module.parametrizations, attr).original = nn.Parameter(ints, requires_grad=False)


def materialize(
    model: nn.Module,
    method: Any,
    params: Mapping[str, Tensor],
    state: Any,
    graph: ModelGraph | None = None,
) -> MaterializedModel:
    """An eval-mode stateful module computing ``apply(model, method, params, state, ...)``.

    ``graph`` (from ``purecomp.trace``) enables BatchNorm folding, which ONNX runtimes need to
    fuse convolutions into integer kernels. Channels pruned by ``filter_pruning`` are removed
    physically (``prune_channels``). The user's model is not modified.
    """
    state = with_training(state, False)
    qstate = _quantization_state(state)
    binarized, binarizers = _binarizers(state, graph)
    sites = method.sites(state)
    known = (set(qstate.activations) if qstate else set()) | set(binarizers)
    unknown = sorted(set(sites) - known)
    if unknown:
        raise StateError(f"cannot materialize the activation transforms at {unknown[:5]}: only quantizers are supported")
    final = method.params(params, state)
    copy_model = copy.deepcopy(model).eval()
    _bake_params(copy_model, final)
    weights = dict(qstate.weights) if qstate else {}
    pstate = _pruning_state(state)
    if pstate is not None and (binarized or binarizers):
        raise StateError("materialize does not combine filter pruning with binarization; materialize one of them")
    if pstate is not None:
        kept = prune_channels(copy_model, pstate)
        current = dict(copy_model.named_parameters())
        final = {**final, **{name: current[name] for name in kept if name in current}}
        weights = {name: slice_quantizer(q, kept.get(name, {})) for name, q in weights.items()}
    for name, quantizer in weights.items():
        module, attr = _owner(copy_model, name)
        _quantize_weight(module, attr, final[name], quantizer)
    for name in binarized:
        module, attr = _owner(copy_model, name)
        _binarize_weight(module, attr, final[name])
    remap: dict[str, str] = {}
    if graph is not None:
        remap = fold_batchnorms(copy_model, graph, {**weights, **{name: BinarizedWeight() for name in binarized}})
    quantizers: dict[str, nn.Module] = dict(binarizers)
    grouped: dict[str, GroupedQuantizer] = {}
    for key, quantizer in (qstate.activations.items() if qstate else []):
        if isinstance(quantizer, GroupedQuantizer):
            if pstate is not None:
                raise StateError("materialize does not combine filter pruning with grouped quantizers")
            grouped[key] = quantizer
            continue
        scale, zero_point, qmin, qmax = integer_grid(quantizer)
        quantizers[remap.get(key, key)] = QuantizeDequantize(scale, zero_point, qmin, qmax)
        if graph is not None:
            for site in _requantized_inputs(graph, key, qstate.consumers_of(key)):
                quantizers[site] = QuantizeDequantize(scale, zero_point, qmin, qmax)
    sites = set(quantizers)
    for key, quantizer in grouped.items():
        split_grouped_linear(copy_model, key, quantizer, graph, output=quantizers.pop(output_key(key), None), sites=sites)
    replace_quantized_embeddings(copy_model, keep=_scopes_with_sites(quantizers, "embedding"))
    for p in copy_model.parameters():
        p.requires_grad_(False)
    return MaterializedModel(copy_model, quantizers).eval()


def _scopes_with_sites(quantizers: Mapping[str, nn.Module], op: str) -> set[str]:
    """Module scopes that hold an activation transform at a call of ``op`` (their calls must stay as they are)."""
    scopes = set()
    for key in quantizers:
        site = key.rpartition(":")[0]
        if "#" not in site:
            continue  # a model input ("input:<name>")
        scope, kind, _ = split_site(site)
        if kind == op:
            scopes.add(scope)
    return scopes


def _requantized_inputs(graph: ModelGraph, key: str, consumers: tuple[str, ...]) -> list[str]:
    """Consumer inputs that reach quantizer ``key`` only through shape ops (flatten, view...).

    Repeating the quantize-dequantize there changes no value (it is idempotent on the grid) and
    spares runtimes from moving DequantizeLinear across the shape op themselves (onnxruntime
    fails to do so for int8 zero points).
    """
    from purecomp.transforms.quantize.placement import activation_positions, source_of

    sites = []
    for site in consumers:
        if not graph.has_site(site):
            continue
        node = graph.node(site)
        for k in activation_positions(graph, node):
            ref = node.inputs[k]
            if ref.kind == "node" and ref.key != key and source_of(graph, ref).key == key:
                if graph.node(ref.name).op in SHAPE_OPS:
                    sites.append(f"{site}:in{k}")
    return sites


# ------------------------------------------------------------------ BatchNorm folding

_FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _foldable_pair(copy_model: nn.Module, graph: ModelGraph, node: Any) -> tuple[nn.Module, nn.Module, Any] | None:
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


def fold_batchnorms(copy_model: nn.Module, graph: ModelGraph, weights: Mapping[str, Any]) -> dict[str, str]:
    """Fold eval-mode BatchNorm into the conv/linear before it; returns the moved site keys."""
    remap: dict[str, str] = {}
    for node in graph:
        pair = _foldable_pair(copy_model, graph, node)
        if pair is None:
            continue
        layer, bn, bn_node = pair
        with torch.no_grad():
            a = bn.running_var.float().add(bn.eps).rsqrt()
            if bn.weight is not None:
                a = a * bn.weight.float()
            shift = -bn.running_mean.float() * a + (bn.bias.float() if bn.bias is not None else 0.0)
            if not _fold_weight(layer, a, weights.get(f"{node.scope}.weight")):
                continue
            bias = layer.bias.float() * a + shift if layer.bias is not None else shift
            layer.bias = nn.Parameter(bias, requires_grad=False)
        parent, attr = _owner(copy_model, bn_node.scope)
        setattr(parent, attr, nn.Identity())
        remap[f"{bn_node.site}:out0"] = f"{node.site}:out0"
    return remap


def _fold_weight(layer: nn.Module, a: Tensor, quantizer: Any) -> bool:
    shape = [-1] + [1] * (layer.weight.dim() - 1)
    if quantizer is None:
        layer.weight.mul_(a.reshape(shape))
        return True
    dq = layer.parametrizations.weight[0]
    ints = layer.parametrizations.weight.original
    symmetric_int8 = isinstance(quantizer, SymmetricQuantizer) and ints.dtype == torch.int8
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
