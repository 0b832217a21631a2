"""Build sparsity methods from NNCF-style config sections (``magnitude_sparsity``, ``rb_sparsity``,
``const_sparsity``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from purecomp import schedules
from purecomp.compression import Compression
from purecomp.errors import ConfigError
from purecomp.scoped import section_scoped

from .const import const_sparsity
from .magnitude import magnitude_sparsity
from .rb import rb_sparsity

# NNCF's defaults
DEFAULT_SCHEDULE = {"magnitude_sparsity": "polynomial", "rb_sparsity": "exponential"}
DEFAULT_TARGET, DEFAULT_TARGET_EPOCH, DEFAULT_FREEZE_EPOCH = 0.5, 90, 100
DEFAULT_POWER = 0.9  # NNCF's polynomial power (purecomp's schedules.polynomial keeps its own default)


def _param(section: Mapping[str, Any], key: str, default: Any, origin: str) -> Any:
    """``params.<key>`` (NNCF's place) or ``<key>`` at the section level (purecomp's older alias)."""
    params = section.get("params", {})
    if key in params and key in section and params[key] != section[key]:
        raise ConfigError(f"{origin}params.{key}", f"given twice with different values ({params[key]!r} here, "
                          f"{section[key]!r} at {origin}{key}); keep params.{key}")
    return params.get(key, section.get(key, default))


def schedule_from_config(section: Mapping[str, Any], origin: str) -> tuple[Any, dict | None, int]:
    """``(schedule, adaptive settings or None, freeze_epoch)`` of a sparsity section."""
    params = section.get("params", {})
    path = f"{origin}params."
    kind = params.get("schedule", DEFAULT_SCHEDULE[section["algorithm"]])
    init = section.get("sparsity_init", 0.0)
    target = params.get("sparsity_target", DEFAULT_TARGET)
    target_epoch = params.get("sparsity_target_epoch", DEFAULT_TARGET_EPOCH)
    freeze_epoch = params.get("sparsity_freeze_epoch", DEFAULT_FREEZE_EPOCH)
    if not 0 <= init < 1:
        raise ConfigError(f"{origin}sparsity_init", f"expected a level in [0, 1), got {init!r}")
    if not 0 <= target < 1:
        raise ConfigError(f"{path}sparsity_target", f"expected a level in [0, 1), got {target!r}")
    if kind != "multistep" and freeze_epoch < target_epoch:
        raise ConfigError(
            f"{path}sparsity_freeze_epoch",
            f"the masks would freeze (epoch {freeze_epoch}) before the target is reached (sparsity_target_epoch "
            f"{target_epoch}); expected sparsity_freeze_epoch >= sparsity_target_epoch",
        )
    per_step = params.get("update_per_optimizer_step", False)
    steps_per_epoch = params.get("steps_per_epoch")
    if kind == "polynomial":
        schedule = schedules.polynomial(init, target, target_epoch, params.get("power", DEFAULT_POWER),
                                        params.get("concave", True), per_step, steps_per_epoch, path)
    elif kind == "exponential":
        schedule = schedules.exponential(init, target, target_epoch, per_step, steps_per_epoch, path)
    elif kind == "multistep":
        steps = params.get("multistep_steps", [])
        levels = params.get("multistep_sparsity_levels", [init] + [target] * len(steps))
        schedule = schedules.multistep(steps, levels, path)
    elif kind == "adaptive":
        if section["algorithm"] != "rb_sparsity":
            raise ConfigError(f"{path}schedule", "the adaptive schedule reads the RB sparsity loss; expected rb_sparsity")
        adaptive = {"init": init, "target": target, "patience": params.get("patience", 1), "step": params.get("sparsity_step", 0.05)}
        return None, adaptive, freeze_epoch
    else:
        raise ConfigError(f"{path}schedule", f"unknown schedule {kind!r}; expected one of {list(schedules.SCHEDULES)}")
    return schedule, None, freeze_epoch


def magnitude_from_config(section: Mapping[str, Any], origin: str) -> Compression:
    schedule, _, freeze_epoch = schedule_from_config(section, origin)
    importance = _param(section, "weight_importance", "normed_abs", origin)
    level_mode = _param(section, "sparsity_level_setting_mode", "global", origin)
    return section_scoped(section, lambda ignored, target: magnitude_sparsity(
        schedule,
        weight_importance=importance,
        level_mode=level_mode,
        freeze_epoch=freeze_epoch,
        ignored_scopes=ignored,
        target_scopes=target,
        origin=origin,
    ))


def rb_from_config(section: Mapping[str, Any], origin: str) -> Compression:
    schedule, adaptive, freeze_epoch = schedule_from_config(section, origin)
    if section.get("params", {}).get("sparsity_level_setting_mode", "global") != "global":
        raise ConfigError(f"{origin}params.sparsity_level_setting_mode", "RB sparsity with a per-layer (local) "
                          "target is not implemented (it changes the loss); expected 'global'")
    return section_scoped(section, lambda ignored, target: rb_sparsity(
        schedule if schedule is not None else 0.0,
        seed=section.get("seed", 0),
        freeze_epoch=freeze_epoch,
        adaptive=adaptive,
        ignored_scopes=ignored,
        target_scopes=target,
        origin=origin,
    ))


def const_from_config(section: Mapping[str, Any], origin: str) -> Compression:
    return section_scoped(section, lambda ignored, target: const_sparsity(
        ignored_scopes=ignored, target_scopes=target, origin=origin))
