"""FLOPs of the conv / linear layers of a graph as a function of the pruned channels.

A conv costs ``2 * prod(out spatial) * C_out * (C_in / groups) * prod(kernel)`` per sample, a
linear ``2 * prod(out leading dims) * F_out * F_in``; pruning shrinks ``C_out`` by the filters
removed from its weight and ``C_in`` by the input channels (or linear column blocks) removed;
a depthwise conv loses input, output and groups together (its cost scales with its channels).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping

from purecomp.graph import ModelGraph
from purecomp.op_kinds import CONV_OPS, CONV_TRANSPOSE_OPS, LINEAR_OPS

from .groups import PruningGroups


@dataclasses.dataclass(frozen=True)
class LayerCost:
    """``unit * out_channels * in_channels_per_group`` FLOPs for the weight ``param``."""

    param: str
    unit: float
    out_axis: int
    in_axis: int
    out_channels: int
    in_channels: int  # per group
    depthwise: bool


def layer_costs(graph: ModelGraph) -> tuple[LayerCost, ...]:
    """One ``LayerCost`` per conv / conv-transpose / linear call reading a weight parameter."""
    costs = []
    for node in graph:
        if (
            node.op not in CONV_OPS | CONV_TRANSPOSE_OPS | LINEAR_OPS
            or len(node.inputs) < 2
            or node.inputs[1].kind != "param"
        ):
            continue
        weight, out = node.input_info[1].shape, node.outputs[0].shape
        if node.op == "linear":
            costs.append(
                LayerCost(
                    node.inputs[1].name,
                    2.0 * math.prod(out[1:-1]),
                    0,
                    1,
                    weight[0],
                    weight[1],
                    False,
                )
            )
            continue
        transposed = node.op in CONV_TRANSPOSE_OPS
        groups = int(node.option("groups", 1) or 1)
        kernel = math.prod(weight[2:])
        out_c = weight[1] * groups if transposed else weight[0]
        in_c = weight[0] // groups if transposed else weight[1]
        out_axis, in_axis = (1, 0) if transposed else (0, 1)
        costs.append(
            LayerCost(
                node.inputs[1].name,
                2.0 * math.prod(out[2:]) * kernel,
                out_axis,
                in_axis,
                out_c,
                in_c,
                groups > 1 and groups == out_c,
            )
        )
    return tuple(costs)


def removed_counts(
    groups: PruningGroups, pruned: Iterable[tuple[int, int]]
) -> dict[tuple[str, int], int]:
    """``{(param, axis): slices removed}`` for the pruned ``(group, class)`` pairs."""
    counts: dict[tuple[str, int], int] = {}
    for g, c in pruned:
        for slot in groups.groups[g].classes[c].slots:
            key = (slot.param, slot.axis)
            counts[key] = counts.get(key, 0) + (slot.stop - slot.start)
    return counts


def total_flops(costs: Iterable[LayerCost], removed: Mapping[tuple[str, int], int]) -> float:
    """FLOPs of the layers once ``removed`` slices are gone (``removed_counts``)."""
    total = 0.0
    for cost in costs:
        out_c = cost.out_channels - removed.get((cost.param, cost.out_axis), 0)
        in_c = (
            cost.in_channels
            if cost.depthwise
            else cost.in_channels - removed.get((cost.param, cost.in_axis), 0)
        )
        total += cost.unit * out_c * in_c
    return total
