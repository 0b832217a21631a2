"""The states of the AutoQ environment: one normalized feature row per unit, in graph order.

A unit is what one action sets: a weight quantizer, or (strict mode) a group of weights whose
ops read the same quantized activation. Its row describes the first op reading its first weight:

    index, op kind, in channels, out channels, feature-map size, kernel size, stride,
    depthwise flag, parameter count, previous action

Counts (channels, feature-map size, kernel size, stride, parameters) go through ``log1p``; every
static column is then min-max scaled over the units to ``[0, 1]`` (a constant column is 0). The
index is ``i / (L - 1)``; the previous action (0 for the first unit) is set while walking.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from purecomp.graph import ModelGraph, OpNode
from purecomp.op_kinds import CONV_OPS, CONV_TRANSPOSE_OPS, EMBEDDING_OPS, LINEAR_OPS

FEATURES = ("index", "op_kind", "in_channels", "out_channels", "feature_map", "kernel", "stride",
            "depthwise", "params", "prev_action")
OP_KINDS = ("conv", "conv_transpose", "linear", "matmul", "embedding")
_LOG_COLUMNS = ("in_channels", "out_channels", "feature_map", "kernel", "stride", "params")


def op_kind(op: str) -> str:
    if op in CONV_OPS:
        return "conv"
    if op in CONV_TRANSPOSE_OPS:
        return "conv_transpose"
    if op in LINEAR_OPS:
        return "linear"
    if op in EMBEDDING_OPS:
        return "embedding"
    return "matmul"


def _first(value: object) -> int:
    if isinstance(value, (tuple, list)):
        return int(value[0]) if value else 1
    return int(value) if value is not None else 1


def raw_features(node: OpNode, weight_shape: Sequence[int], params: int) -> dict[str, float]:
    """Unnormalized features of the op ``node`` reading a weight of ``weight_shape``."""
    kind = op_kind(node.op)
    x = node.input_info[0].shape if node.input_info else ()
    if kind in ("conv", "conv_transpose"):
        groups = int(node.option("groups", 1) or 1)
        cin = int(x[1]) if len(x) > 1 else int(weight_shape[1]) * groups
        cout = int(weight_shape[0]) if kind == "conv" else int(weight_shape[1]) * groups
        fmap = math.prod(int(d) for d in x[2:]) if len(x) > 2 else 1
        kernel = math.prod(int(d) for d in weight_shape[2:])
        stride = _first(node.option("stride", 1))
        depthwise = float(groups > 1 and groups == cin)
    else:
        cin, cout = (int(weight_shape[-1]), int(weight_shape[0])) if kind == "linear" else (
            int(weight_shape[-2]) if len(weight_shape) > 1 else 1, int(weight_shape[-1]))
        fmap = math.prod(int(d) for d in x[1:-1]) if len(x) > 2 else 1
        kernel, stride, depthwise = 1, 1, 0.0
    return {
        "op_kind": float(OP_KINDS.index(kind)), "in_channels": cin, "out_channels": cout, "feature_map": fmap,
        "kernel": kernel, "stride": stride, "depthwise": depthwise, "params": params,
    }


def normalize(rows: Sequence[Mapping[str, float]]) -> Tensor:
    """``[L, len(FEATURES)]`` float tensor: log1p of counts, min-max per column, index ``i/(L-1)``,
    previous action 0 (filled in while walking)."""
    n = len(rows)
    out = torch.zeros(n, len(FEATURES))
    for j, name in enumerate(FEATURES):
        if name == "index":
            out[:, j] = torch.arange(n, dtype=torch.float32) / max(n - 1, 1)
            continue
        if name == "prev_action":
            continue
        col = torch.tensor([float(r[name]) for r in rows])
        if name in _LOG_COLUMNS:
            col = torch.log1p(col)
        span = col.max() - col.min()
        out[:, j] = (col - col.min()) / span if span > 0 else torch.zeros(n)
    return out


def unit_features(graph: ModelGraph, units: Sequence[Sequence[str]], readers: Mapping[str, Sequence[str]],
                  shapes: Mapping[str, Sequence[int]]) -> Tensor:
    """Normalized rows for ``units`` (weight names) given each weight's reader sites and shape."""
    rows = []
    for unit in units:
        first = unit[0]
        node = graph.node(readers[first][0])
        rows.append(raw_features(node, shapes[first], sum(math.prod(shapes[w]) for w in unit)))
    return normalize(rows)


def graph_order(graph: ModelGraph, units: Sequence[Sequence[str]], readers: Mapping[str, Sequence[str]]) -> list[int]:
    """Indices of ``units`` sorted by the position of the first op reading any of their weights."""
    position = {node.site: i for i, node in enumerate(graph)}
    first = [min(position[s] for w in unit for s in readers[w]) for unit in units]
    return sorted(range(len(units)), key=lambda i: first[i])
