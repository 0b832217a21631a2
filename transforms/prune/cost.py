"""Parameters and FLOPs per channel group: what each group's pruned channels remove.

A parameter of shape ``s`` that loses ``r_a`` slices along each axis ``a`` keeps
``prod_a (s_a - r_a)`` elements. A group's cost counts the parameters its channels touch
(producer filters and biases, batch-norm affine rows, depthwise rows, consumer input channels
or column blocks; running statistics are buffers, not parameters) and the FLOPs per sample of
the conv / linear layers among them (``flops.total_flops``, 2 per multiply-add, which is what
``torch.utils.flop_counter.FlopCounterMode`` counts on a batch of one), before and after
removing ONLY that group's pruned channels. The ``(all)`` row is the whole model before and after removing every
pruned channel at once. Per-group reductions add up to the total unless one weight loses
input channels to one group and output channels to another (a conv between two pruned
groups): then the ``r_in * r_out`` slices they share are counted in both groups.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from purecomp.graph import ModelGraph

from .flops import LayerCost, layer_costs, removed_counts, total_flops
from .groups import PruningGroups


def kept_params(
    shapes: Mapping[str, tuple[int, ...]],
    removed: Mapping[tuple[str, int], int],
    names: Iterable[str] | None = None,
) -> int:
    """``sum prod_a (s_a - r_a)`` over the parameters ``names`` (all of ``shapes`` by default)."""
    total = 0
    for name in shapes if names is None else names:
        shape = shapes[name]
        total += math.prod(size - removed.get((name, axis), 0) for axis, size in enumerate(shape))
    return total


def group_rows(
    graph: ModelGraph,
    groups: PruningGroups,
    pruned: tuple[tuple[int, ...], ...],
    costs: tuple[LayerCost, ...] = (),
) -> list[dict[str, Any]]:
    """One row per prunable group: layers, channels, pruned channels, level, and the parameters
    and FLOPs of the layers it touches before / after removing its pruned channels; then the
    ``(all)`` row for the whole model with every pruned channel removed."""
    shapes = {name: tuple(p.shape) for name, p in graph.model.named_parameters()}
    costs = costs or layer_costs(graph)
    rows = []
    for g in groups.prunable:
        group = groups.groups[g]
        removed = removed_counts(groups, [(g, c) for c in pruned[g]])
        touched = sorted({s.param for cls in group.classes for s in cls.slots if s.param in shapes})
        layer_costs_g = [cost for cost in costs if cost.param in touched]
        rows.append(
            {
                "group": g,
                "layers": ", ".join(group.layers),
                "channels": len(group.classes),
                "pruned": len(pruned[g]),
                "level": len(pruned[g]) / len(group.classes),
                "params before": kept_params(shapes, {}, touched),
                "params after": kept_params(shapes, removed, touched),
                "FLOPs before": int(total_flops(layer_costs_g, {})),
                "FLOPs after": int(total_flops(layer_costs_g, removed)),
            }
        )
    everything = removed_counts(groups, [(g, c) for g, cs in enumerate(pruned) for c in cs])
    total = sum(len(groups.groups[g].classes) for g in groups.prunable)
    count = sum(len(p) for p in pruned)
    rows.append(
        {
            "group": "(all)",
            "layers": "",
            "channels": total,
            "pruned": count,
            "level": count / max(1, total),
            "params before": kept_params(shapes, {}),
            "params after": kept_params(shapes, everything),
            "FLOPs before": int(total_flops(costs, {})),
            "FLOPs after": int(total_flops(costs, everything)),
        }
    )
    return rows
