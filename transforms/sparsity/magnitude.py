"""Magnitude sparsity: zero the weights of least importance, level set by a schedule."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from purecomp.compression import Compression, Progress
from purecomp.errors import ConfigError
from purecomp.init_context import InitContext
from purecomp.schedules import Schedule, constant, final_level, progress_toward, scheduled_step
from purecomp.struct import static_field, struct

from .common import keep_largest, level_rows, masking_method, sparsified_weights, sparsity_table

IMPORTANCES = ("abs", "normed_abs")
LEVEL_MODES = ("global", "local")


@struct
class MagnitudeSparsityState:
    """0/1 masks by weight name; ``level`` is the schedule's level they were computed for."""

    masks: dict[str, Tensor]
    level: float = static_field()
    frozen: bool = static_field(default=False)
    target: float | None = static_field(default=None)  # the schedule's final level

    def rows(self) -> list[dict]:
        return level_rows(self.masks, self.level)

    def statistics(self, graph: Any = None) -> dict[str, list[dict]]:
        return sparsity_table("MagnitudeSparsity", self.rows())

    def compression_progress(self) -> float:
        return progress_toward(self.level, self.target)


def importance(weight: Tensor, kind: str) -> Tensor:
    """``|w|`` (abs) or ``|w| / ||w||_2`` (normed_abs: comparable across layers)."""
    magnitude = weight.detach().abs().float()
    if kind == "normed_abs":
        return magnitude / weight.detach().float().norm().clamp(min=1e-12)
    return magnitude


def magnitude_masks(params: Mapping[str, Tensor], names: Sequence[str], level: float, kind: str, mode: str) -> dict[str, Tensor]:
    """Masks meeting ``level`` exactly: over all weights at once (global) or in each weight (local)."""
    scores = {n: importance(params[n], kind) for n in names}
    if mode == "local" or not scores:  # no weight selected: no mask
        return {n: keep_largest(s, level).to(params[n].dtype) for n, s in scores.items()}
    flat = keep_largest(torch.cat([s.reshape(-1) for s in scores.values()]), level)
    masks, offset = {}, 0
    for n, s in scores.items():
        masks[n] = flat[offset: offset + s.numel()].reshape(s.shape).to(params[n].dtype)
        offset += s.numel()
    return masks


def magnitude_sparsity(
    schedule: Schedule | float = 0.5,
    *,
    weight_importance: str = "normed_abs",
    level_mode: str = "global",
    freeze_epoch: int | None = None,
    ignored_scopes: Sequence[str] = (),
    target_scopes: Sequence[str] | None = None,
    origin: str = "",
) -> Compression:
    """Zero the fraction ``schedule(progress)`` of weights with the smallest importance.

    ``schedule`` is a function of ``Progress`` (``purecomp.schedules``) or a constant level.
    Masks are recomputed from the current weights by ``step(state, progress, params)`` when
    the level changes, and kept fixed from ``freeze_epoch`` on.
    """
    if weight_importance not in IMPORTANCES:
        raise ConfigError(f"{origin}weight_importance", f"expected one of {list(IMPORTANCES)}, got {weight_importance!r}")
    if level_mode not in LEVEL_MODES:
        raise ConfigError(f"{origin}sparsity_level_setting_mode", f"expected one of {list(LEVEL_MODES)}, got {level_mode!r}")
    level_of = constant(schedule, origin) if isinstance(schedule, (int, float)) else schedule

    def init(context: InitContext) -> MagnitudeSparsityState:
        names = sparsified_weights(context.graph, ignored_scopes, target_scopes, origin, context.scope)
        level = level_of(Progress())
        masks = magnitude_masks(context.params, names, level, weight_importance, level_mode)
        return MagnitudeSparsityState(masks, level, target=final_level(level_of))

    def step(state: MagnitudeSparsityState, progress: Progress, params: Mapping[str, Tensor] | None = None) -> MagnitudeSparsityState:
        def rebuild(current: Mapping[str, Tensor], level: float, frozen: bool) -> MagnitudeSparsityState:
            masks = magnitude_masks(current, list(state.masks), level, weight_importance, level_mode)
            return MagnitudeSparsityState(masks, level, frozen, state.target)

        return scheduled_step(state, progress, params, level_of=level_of, freeze_epoch=freeze_epoch,
                              what="magnitude sparsity", rebuild=rebuild)

    return masking_method(init, step, "magnitude_sparsity")
