"""Build filter pruning from an NNCF-style ``filter_pruning`` config section."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from purecomp import schedules
from purecomp.compression import Compression
from purecomp.errors import ConfigError, warn_no_effect
from purecomp.scoped import section_scoped

from .method import filter_pruning

# NNCF's defaults
DEFAULT_SCHEDULE, DEFAULT_TARGET, DEFAULT_PRUNING_STEPS = "exponential", 0.5, 100


def pruning_schedule_from_config(
    section: Mapping[str, Any], origin: str
) -> tuple[schedules.Schedule, int]:
    """``(schedule, freeze_epoch)`` of a ``filter_pruning`` section."""
    params = section.get("params", {})
    if "pruning_flops_target" in params and "pruning_target" in params:
        raise ConfigError(
            f"{origin}params.pruning_flops_target",
            "give either pruning_target (fraction of channels) or pruning_flops_target, not both",
        )
    kind = params.get("schedule", DEFAULT_SCHEDULE)
    init = section.get("pruning_init", 0.0)
    target = params.get("pruning_flops_target", params.get("pruning_target", DEFAULT_TARGET))
    warmup = params.get("num_init_steps", 0)
    steps = params.get("pruning_steps", DEFAULT_PRUNING_STEPS)
    if kind == "baseline":
        schedules.check_pruning_levels(init, target, warmup, steps, origin)
        return schedules.pruning_baseline(target, warmup, origin), warmup
    if kind == "exponential":
        return schedules.pruning_exponential(init, target, warmup, steps, origin), warmup + steps
    if kind == "exponential_with_bias":
        return schedules.pruning_exponential_with_bias(
            init, target, warmup, steps, origin
        ), warmup + steps
    raise ConfigError(
        f"{origin}params.schedule",
        f"unknown schedule {kind!r}; expected one of {list(schedules.PRUNING_SCHEDULES)}",
    )


def filter_pruning_from_config(section: Mapping[str, Any], origin: str) -> Compression:
    params = section.get("params", {})
    ranking = params.get("interlayer_ranking_type", "unweighted_ranking")
    if ranking != "unweighted_ranking":
        raise ConfigError(
            f"{origin}params.interlayer_ranking_type",
            f"{ranking!r} (LeGR's learned ranking) is not implemented; expected 'unweighted_ranking'",
        )
    for key in ("legr_params", "save_ranking_coeffs_path", "load_ranking_coeffs_path"):
        if key in params:
            warn_no_effect(f"{origin}params.{key}", "it configures learned_ranking, which purecomp does not implement")
    if params.get("all_weights", False):
        raise ConfigError(f"{origin}params.all_weights", "ranking filters across all layers together is not "
                          "implemented; expected false (filters ranked layer by layer, NNCF's default)")
    if "filter_importance" in params and "weight_importance" in params \
            and params["filter_importance"] != params["weight_importance"]:
        raise ConfigError(f"{origin}params.filter_importance", "given twice with different values (also as "
                          "weight_importance, purecomp's older name); keep filter_importance")
    criterion = params.get("filter_importance", params.get("weight_importance", "L2"))
    schedule, freeze_epoch = pruning_schedule_from_config(section, origin)
    return section_scoped(section, lambda ignored, target: filter_pruning(
        schedule,
        criterion=criterion,
        prune_first_conv=params.get("prune_first_conv", False),
        prune_downsample_convs=params.get("prune_downsample_convs", False),
        prune_batch_norms=params.get("prune_batch_norms", True),
        freeze_epoch=freeze_epoch,
        flops="pruning_flops_target" in params,
        ignored_scopes=ignored,
        target_scopes=target,
        origin=origin,
    ))
