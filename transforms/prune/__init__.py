"""Filter pruning: structured sparsity that removes whole channels."""

from .cost import group_rows, kept_params
from .criteria import CRITERIA, class_importance, filter_importance
from .flops import LayerCost, layer_costs, removed_counts, total_flops
from .groups import ChannelClass, ChannelGroup, PruningGroups, Slot, channel_groups
from .method import (
    FilterPruningState,
    filter_pruning,
    prune_order,
    pruning_masks,
    select_pruned,
    select_pruned_for_flops,
)

__all__ = [
    "CRITERIA",
    "ChannelClass",
    "ChannelGroup",
    "FilterPruningState",
    "LayerCost",
    "PruningGroups",
    "Slot",
    "channel_groups",
    "class_importance",
    "filter_importance",
    "filter_pruning",
    "group_rows",
    "kept_params",
    "layer_costs",
    "prune_order",
    "pruning_masks",
    "removed_counts",
    "select_pruned",
    "select_pruned_for_flops",
    "total_flops",
]

from purecomp.registry import register_package  # noqa: E402

from .from_config import filter_pruning_from_config  # noqa: E402

register_package(__name__, {"filter_pruning": filter_pruning_from_config}, (FilterPruningState, PruningGroups))
