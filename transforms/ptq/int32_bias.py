"""Biases on the int32 grid of their layer's accumulator.

An integer runtime computes a quantized conv / linear as an int32 accumulator
``acc = sum (x_q - z_x) w_q`` whose value is ``y / (s_x s_w)``, so it adds the bias in the same
units, rounded: ``b_q = round(b / (s_x s_w))`` per output channel, with ``s_x`` the (per-tensor)
input quantizer's scale and ``s_w`` the weight quantizer's (QLinearConv's int32 bias; ONNX
Runtime's ``WeightBiasQuantization`` rewrite of a float-bias QDQ Conv / Gemm). A linear on inputs
of more rank is exported as MatMul + Add, whose float bias runtimes add after the integer
matmul, so its bias is left as it is. Replacing each such
bias by ``s_x s_w round(b / (s_x s_w))`` (float32, round half to even) makes the quantized
forward compute what the integer kernels compute; a bias already on its grid is left as it is
by that rounding, so the exported graph means the same in every runtime.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from purecomp.graph import ModelGraph

from .bias_correction import correctable_layers
from .chain_state import quantization_state


def int32_bias_steps(graph: ModelGraph, params: Mapping[str, Tensor], state: Any) -> dict[str, Tensor]:
    """``{bias name: s_x s_w}`` (float32, one step per output channel) for each conv, and each
    linear on 2-D inputs (ONNX ``Gemm``), with a quantized weight and a bias whose data input goes
    through exactly one per-tensor activation quantizer (at ``<site>:in0`` or at its producer)."""
    q_state = quantization_state(state)
    weights = getattr(q_state, "weights", {})
    activations = getattr(q_state, "activations", {})
    consumers_of = getattr(q_state, "consumers_of", lambda key: ())
    steps: dict[str, Tensor] = {}
    for site in correctable_layers(graph, params, weights):
        node = graph.node(site)
        if node.op == "linear" and len(node.input_info[0].shape) != 2:
            continue  # exported as MatMul + Add: runtimes add its float bias after the integer matmul
        inputs = [q for key, q in activations.items() if key == f"{site}:in0" or site in consumers_of(key)]
        if len(inputs) != 1:
            continue
        s_x = inputs[0].integer_grid()[0].float()
        if s_x.numel() != 1:  # a per-group input quantizer has no single accumulator grid
            continue
        scope = site.rpartition("/")[0]
        s_w = weights[f"{scope}.weight"].integer_grid()[0].float().reshape(-1)
        steps[f"{scope}.bias"] = (s_x.reshape(()) * s_w).detach()
    return steps


def biases_on_int32_grid(params: Mapping[str, Tensor], steps: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``params`` with each bias named in ``steps`` replaced by ``step * round(b / step)``
    (float32, round half to even); the other entries are the same tensors."""
    out = dict(params)
    for name, step in steps.items():
        bias = params[name]
        on_grid = torch.round(bias.detach().float() / step) * step
        out[name] = on_grid.to(bias.dtype)
    return out
