"""Biases on the int32 grid of their layer's accumulator.

An integer runtime computes a quantized conv / linear as an int32 accumulator
``acc = sum (x_q - z_x) w_q`` whose value is ``y / (s_x s_w)``, so it adds the bias in the same
units, rounded: ``b_q = round(b / (s_x s_w))`` per output channel, with ``s_x`` the (per-tensor)
input quantizer's scale and ``s_w`` the weight quantizer's (QLinearConv's int32 bias; ONNX
Runtime's ``WeightBiasQuantization`` rewrite of a float-bias QDQ Conv / Gemm). A linear on inputs
of more rank is exported as MatMul + Add, whose float bias runtimes add after the integer
matmul, so its bias is left as it is.

Replacing each such bias by ``s_x s_w round(b / (s_x s_w))`` (float32, round half to even)
makes the quantized forward compute what the integer kernels compute; a bias already on its
grid is left as it is by that rounding, so the exported graph means the same in every runtime.
A BatchNorm after the layer that the pipeline left unfolded is folded by the exporter (weight
step ``s_w |a|``, bias ``a b + beta - a mu`` with ``a = gamma / sqrt(var + eps)``); its ``beta``
then takes the rounding, so that the exported bias lands on ``s_x s_w |a|`` (a BatchNorm without
``beta``, or with ``a = 0`` somewhere, is left as it is).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from purecomp.export.materialize import foldable_pair
from purecomp.graph import ModelGraph

from .bias_correction import CORRECTED_OPS
from .chain_state import quantization_state


class BiasGrid(NamedTuple):
    """The exported bias of conv / linear ``layer`` is ``param + offset`` and runs on the grid
    ``step`` (per output channel)."""

    step: Tensor
    offset: Tensor
    layer: str


def _input_step(graph: ModelGraph, node: Any, q_state: Any) -> Tensor | None:
    """``s_x`` of the one per-tensor activation quantizer on ``node``'s data input: at
    ``<site>:in0`` or at a tensor whose consumers include ``node`` (placement lists a classifier
    behind a flatten there, and the exporter repeats the quantizer at its input)."""
    activations = getattr(q_state, "activations", {})
    consumers_of = getattr(q_state, "consumers_of", lambda key: ())
    inputs = [q for key, q in activations.items() if key == f"{node.site}:in0" or node.site in consumers_of(key)]
    if len(inputs) != 1:
        return None
    s_x = inputs[0].integer_grid()[0].float()
    return s_x.reshape(()) if s_x.numel() == 1 else None  # a per-group quantizer has no single grid


def _exporter_folds(quantizer: Any, weight: Tensor) -> bool:
    """Whether the exporter folds a BatchNorm into a layer with this weight quantizer
    (``fold_batchnorms``: symmetric integers, none of them -128)."""
    if getattr(quantizer, "mode", None) != "symmetric":
        return False
    scale, _, ql, qh = quantizer.integer_grid()
    if ql > -128:
        return True
    shape = [-1] + [1] * (weight.dim() - 1)
    ints = torch.clamp(torch.round(weight.detach().float() / scale.reshape(shape)), ql, qh)
    return not bool((ints == -128).any())


def int32_bias_steps(graph: ModelGraph, params: Mapping[str, Tensor], state: Any) -> dict[str, BiasGrid]:
    """``{bias parameter: BiasGrid}`` for each conv, and each linear on 2-D inputs (ONNX
    ``Gemm``), called once, with a quantized weight and one per-tensor input quantizer
    (``_input_step``): its own bias with step ``s_x s_w``, or the ``beta`` of the BatchNorm the
    exporter folds into it, with step ``s_x (s_w |a|)`` (module docstring). A layer called more
    than once is skipped: its calls may have different ``s_x``."""
    q_state = quantization_state(state)
    weights = getattr(q_state, "weights", {})
    called_again = {node.scope for node in graph if node.index > 0}
    grids: dict[str, BiasGrid] = {}
    for node in graph:
        weight = f"{node.scope}.weight"
        if (node.op not in CORRECTED_OPS or node.index != 0 or not node.scope or weight not in weights
                or node.scope in called_again):
            continue
        if node.op == "linear" and len(node.input_info[0].shape) != 2:
            continue
        s_x = _input_step(graph, node, q_state)
        if s_x is None:
            continue
        s_w = weights[weight].integer_grid()[0].float().reshape(-1).detach()
        own = params.get(f"{node.scope}.bias")
        pair = foldable_pair(graph.model, graph, node)
        if pair is not None and _exporter_folds(weights[weight], params[weight]):
            _, bn, bn_node = pair
            with torch.no_grad():
                a = bn.running_var.float().add(bn.eps).rsqrt()
                a = a * bn.weight.float() if bn.weight is not None else a
                offset = -bn.running_mean.float() * a + (own.float() * a if own is not None else 0.0)
            if f"{bn_node.scope}.bias" in params and bool((a != 0).all()):
                grids[f"{bn_node.scope}.bias"] = BiasGrid(s_x * (s_w * a.abs()), offset.detach(), node.scope)
        elif own is not None:
            grids[f"{node.scope}.bias"] = BiasGrid(s_x * s_w, torch.zeros_like(s_w), node.scope)
    return grids


def biases_on_int32_grid(params: Mapping[str, Tensor], grids: Mapping[str, BiasGrid]) -> dict[str, Tensor]:
    """``params`` with each parameter ``p`` named in ``grids`` replaced by
    ``step round((p + offset) / step) - offset`` (float32, round half to even); the other entries
    are the same tensors."""
    out = dict(params)
    for name, (step, offset, _) in grids.items():
        p = params[name].detach().float()
        out[name] = (torch.round((p + offset) / step) * step - offset).to(params[name].dtype)
    return out
