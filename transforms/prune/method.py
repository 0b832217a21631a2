"""Filter pruning: zero whole channels of least importance, level set by a schedule.

While training, the pruned channels are masks (their producer filters and biases, depthwise
rows and, with ``prune_batch_norms``, batch-norm weight and bias set to zero); at export
``purecomp.export.materialize`` removes them physically (``export.prune_channels``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from purecomp.compression import Compression, Progress
from purecomp.errors import ConfigError, StateError
from purecomp.graph import ModelGraph
from purecomp.init_context import InitContext
from purecomp.schedules import Schedule, final_level, progress_toward, scheduled_step
from purecomp.struct import static_field, struct
from purecomp.transforms.sparsity.common import masking_method

from .cost import group_rows
from .criteria import CRITERIA, class_importance
from .flops import LayerCost, layer_costs, removed_counts, total_flops
from .groups import MASKED_ROLES, PruningGroups, channel_groups


@struct
class FilterPruningState:
    """0/1 masks by parameter name, and the pruned class positions of each group (static).

    ``pruned[g]`` lists positions in ``groups.groups[g].classes``; ``level`` is the schedule's
    level the masks were computed for."""

    masks: dict[str, Tensor]
    level: float = static_field()
    pruned: tuple[tuple[int, ...], ...] = static_field()
    groups: PruningGroups = static_field()
    prune_batch_norms: bool = static_field(default=True)
    frozen: bool = static_field(default=False)
    costs: tuple[LayerCost, ...] = static_field(
        default=()
    )  # set when the level is a FLOPs fraction
    # (name, shape, dtype) of the traced model inputs: export probes the masked model with them
    inputs: tuple[tuple[str, tuple[int, ...], torch.dtype], ...] = static_field(default=())
    target: float | None = static_field(default=None)  # the schedule's final level

    def statistics(self, graph: ModelGraph | None = None) -> dict[str, list[dict[str, Any]]]:
        """The ``pruning`` table (``rows``; needs the graph for the costs)."""
        if graph is None:
            raise StateError("filter pruning statistics need the traced graph: statistics(graph, state)")
        return {"pruning": self.rows(graph)}

    def compression_progress(self) -> float:
        """``level / target`` (1 once the schedule's final level is reached)."""
        return progress_toward(self.level, self.target)

    def export_rule(self) -> Any:
        from .export_rule import FilterPruningExport

        return FilterPruningExport(self)

    def pruned_classes(self) -> list[tuple[int, int]]:
        """``(group, class)`` of every pruned channel."""
        return [(g, c) for g, cs in enumerate(self.pruned) for c in cs]

    def rows(self, graph: ModelGraph) -> list[dict[str, Any]]:
        """Per prunable group: its layers, channels, pruned channels, and parameters and FLOPs
        before / after removing them (``cost.group_rows``); then the whole-model ``(all)`` row."""
        return group_rows(graph, self.groups, self.pruned, self.costs)


def prune_order(
    groups: PruningGroups, params: Mapping[str, Tensor], criterion: str
) -> list[tuple[int, int]]:
    """``(group, class)`` pairs of the prunable groups, least important first over all groups at
    once, leaving out the most important class of every group (one channel always stays)."""
    candidates: list[tuple[float, int, int]] = []
    for g in groups.prunable:
        scores = class_importance(params, groups.groups[g].classes, criterion)
        candidates += [(float(s), g, c) for c, s in enumerate(scores)]
    candidates.sort()
    taken: dict[int, int] = {}
    order = []
    for _, g, c in candidates:
        if taken.get(g, 0) + 1 >= len(groups.groups[g].classes):
            continue
        taken[g] = taken.get(g, 0) + 1
        order.append((g, c))
    return order


def _by_group(
    groups: PruningGroups, chosen: Sequence[tuple[int, int]]
) -> tuple[tuple[int, ...], ...]:
    per: dict[int, list[int]] = {}
    for g, c in chosen:
        per.setdefault(g, []).append(c)
    return tuple(tuple(sorted(per.get(g, ()))) for g in range(len(groups.groups)))


def select_pruned(
    groups: PruningGroups, params: Mapping[str, Tensor], level: float, criterion: str
) -> tuple[tuple[int, ...], ...]:
    """Prune ``round(level * n)`` of the ``n`` classes of the prunable groups (``prune_order``);
    returns the pruned class positions of every group."""
    total = sum(len(groups.groups[g].classes) for g in groups.prunable)
    return _by_group(groups, prune_order(groups, params, criterion)[: int(round(level * total))])


def select_pruned_for_flops(
    groups: PruningGroups,
    params: Mapping[str, Tensor],
    level: float,
    criterion: str,
    costs: Sequence[LayerCost],
) -> tuple[tuple[int, ...], ...]:
    """The shortest prefix of ``prune_order`` that removes at least the fraction ``level`` of the
    conv/linear FLOPs (all of it when the target cannot be reached); bisection on the prefix
    length, FLOPs being non-increasing in it."""
    order = prune_order(groups, params, criterion)
    goal = (1.0 - level) * total_flops(costs, {})
    flops_at = lambda k: total_flops(costs, removed_counts(groups, order[:k]))  # noqa: E731
    lo, hi = 0, len(order)
    while lo < hi:
        mid = (lo + hi) // 2
        if flops_at(mid) <= goal + 1e-6:
            hi = mid
        else:
            lo = mid + 1
    return _by_group(groups, order[:lo])


def pruning_masks(
    groups: PruningGroups,
    params: Mapping[str, Tensor],
    pruned: Sequence[Sequence[int]],
    prune_batch_norms: bool,
) -> dict[str, Tensor]:
    """Masks of every maskable slot of the prunable groups, zero on the pruned classes."""
    roles = MASKED_ROLES | ({"norm"} if prune_batch_norms else set())
    masks: dict[str, Tensor] = {}
    for g in groups.prunable:
        for cls in groups.groups[g].classes:
            for slot in cls.slots:
                if slot.role in roles and slot.param not in masks:
                    masks[slot.param] = torch.ones_like(params[slot.param])
    for g, positions in enumerate(pruned):
        for c in positions:
            for slot in groups.groups[g].classes[c].slots:
                if slot.role in roles:
                    masks[slot.param].narrow(slot.axis, slot.start, slot.stop - slot.start).zero_()
    return masks


def filter_pruning(
    schedule: Schedule | float = 0.5,
    *,
    criterion: str = "L2",
    prune_first_conv: bool = False,
    prune_downsample_convs: bool = False,
    prune_batch_norms: bool = True,
    freeze_epoch: int | None = None,
    flops: bool = False,
    ignored_scopes: Sequence[str] = (),
    target_scopes: Sequence[str] | None = None,
    origin: str = "",
) -> Compression:
    """Remove the fraction ``schedule(progress)`` of prunable channels with the least importance.

    ``schedule`` is a function of ``Progress`` (``purecomp.schedules.pruning_*``) or a constant
    level in [0, 1). ``criterion``: ``L1``, ``L2`` or ``geometric_median`` filter importance
    (``criteria``). The pruned channels are recomputed from the current weights by
    ``step(state, progress, params)`` when the level changes, and kept from ``freeze_epoch`` on.
    With ``flops=True`` the level is the fraction of conv/linear FLOPs to remove instead
    (``select_pruned_for_flops``).
    """
    if criterion not in CRITERIA:
        raise ConfigError(
            f"{origin}params.weight_importance",
            f"expected one of {list(CRITERIA)}, got {criterion!r}",
        )
    if isinstance(schedule, (int, float)):
        if not 0.0 <= float(schedule) < 1.0:
            raise ConfigError(
                f"{origin}params.pruning_target", f"expected a level in [0, 1), got {schedule!r}"
            )
        value = float(schedule)
        level_of: Schedule = lambda progress: value  # noqa: E731
    else:
        level_of = schedule

    def build(
        groups: PruningGroups,
        params: Mapping[str, Tensor],
        level: float,
        costs: tuple[LayerCost, ...],
        inputs: tuple = (),
        frozen: bool = False,
    ) -> FilterPruningState:
        if flops:
            pruned = select_pruned_for_flops(groups, params, level, criterion, costs)
        else:
            pruned = select_pruned(groups, params, level, criterion)
        masks = pruning_masks(groups, params, pruned, prune_batch_norms)
        return FilterPruningState(
            masks, level, pruned, groups, prune_batch_norms, frozen, costs, inputs, final_level(level_of)
        )

    def init(context: InitContext) -> FilterPruningState:
        graph = context.graph
        groups = channel_groups(
            graph,
            prune_first_conv=prune_first_conv,
            prune_downsample_convs=prune_downsample_convs,
            ignored_scopes=ignored_scopes,
            target_scopes=target_scopes,
            origin=origin,
            scope=context.scope,
        )
        with torch.no_grad():
            inputs = tuple((name, tuple(info.shape), info.dtype) for name, info in graph.inputs)
            return build(
                groups, context.params, level_of(Progress()), layer_costs(graph) if flops else (), inputs
            )

    def step(
        state: FilterPruningState, progress: Progress, params: Mapping[str, Tensor] | None = None
    ) -> FilterPruningState:
        return scheduled_step(
            state, progress, params, level_of=level_of, freeze_epoch=freeze_epoch, what="filter pruning",
            rebuild=lambda p, level, frozen: build(state.groups, p, level, state.costs, state.inputs, frozen),
        )

    return masking_method(init, step, "filter_pruning")
