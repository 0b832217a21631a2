"""Compression-level schedules: pure functions of training progress (in the spirit of optax).

A schedule maps a ``Progress`` to a level in [0, 1) (the fraction of weights removed). The
adaptive schedule also reads the measured compression loss, so it is a small state machine:
``AdaptiveLevel`` is its immutable state and ``adaptive_step`` its transition.

Progress is counted in epochs: the integer epoch, or with ``update_per_optimizer_step`` the
fractional epoch ``epoch + step_in_epoch / steps_per_epoch``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from .compression import Progress
from .errors import ConfigError, StateError

Schedule = Callable[[Progress], float]

FAR_FUTURE = Progress(step=10**12, epoch=10**9)


def final_level(schedule: Schedule) -> float:
    """The level a schedule settles at: its value far past any target epoch."""
    return float(schedule(FAR_FUTURE))


def scheduled_step(
    state: Any, progress: Progress, params: Mapping[str, Any] | None, *, level_of: Schedule,
    freeze_epoch: int | None, what: str, rebuild: Callable[[Mapping[str, Any], float, bool], Any],
) -> Any:
    """The step of a method whose masks follow ``level_of`` (its state has ``level`` and
    ``frozen``): kept once frozen; frozen from ``freeze_epoch`` on; rebuilt from the current
    weights, ``rebuild(params, level, frozen)`` without gradients, when the level changes
    (``StateError`` naming ``what`` if ``params`` is missing then)."""
    if state.frozen:
        return state
    frozen = freeze_epoch is not None and progress.epoch >= freeze_epoch
    level = level_of(progress)
    if level == state.level:
        return dataclasses.replace(state, frozen=frozen) if frozen else state
    if params is None:
        raise StateError(f"{what} moves to level {level:.4f}: pass the current weights, "
                         "method.step(state, progress, params)")
    with torch.no_grad():
        return rebuild(params, level, frozen)


def progress_toward(level: float, target: float | None) -> float:
    """``min(1, level / target)``; 1 when there is no (or a zero) target."""
    return min(1.0, level / target) if target else 1.0


def _check_level(name: str, value: float, path: str) -> None:
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"{path}{name}", f"expected a level in [0, 1), got {value!r}")


def _epochs(progress: Progress, per_step: bool, steps_per_epoch: int | None = None) -> float:
    """Epochs done: the integer epoch, or with ``per_step`` the fractional one (optimizer steps
    over ``steps_per_epoch``, taken from the config when given, else from ``progress``)."""
    if not per_step:
        return float(progress.epoch)
    if steps_per_epoch:
        return progress.step / steps_per_epoch
    return progress.fractional_epoch


def polynomial(
    init: float, target: float, target_epoch: int, power: float = 3.0, concave: bool = True,
    update_per_optimizer_step: bool = False, steps_per_epoch: int | None = None, path: str = "",
) -> Schedule:
    """``t = min(1, e / target_epoch)``; concave: ``init + (target - init) (1 - (1 - t)^p)``,
    convex: ``init + (target - init) t^p``. Reaches ``target`` at ``target_epoch``."""
    _check_level("sparsity_init", init, path)
    _check_level("sparsity_target", target, path)
    if target_epoch < 1:
        raise ConfigError(f"{path}sparsity_target_epoch", f"expected an epoch >= 1, got {target_epoch}")
    if power <= 0:
        raise ConfigError(f"{path}power", f"expected a positive power, got {power}")

    def level(progress: Progress) -> float:
        t = min(1.0, max(0.0, _epochs(progress, update_per_optimizer_step, steps_per_epoch) / target_epoch))
        shape = 1.0 - (1.0 - t) ** power if concave else t**power
        return init + (target - init) * shape

    return level


def exponential(
    init: float, target: float, target_epoch: int, update_per_optimizer_step: bool = False,
    steps_per_epoch: int | None = None, path: str = "",
) -> Schedule:
    """Density decays exponentially: ``1 - level = (1 - init) exp(-k e)`` with ``k`` such that the
    level is ``target`` at ``target_epoch``; constant afterwards."""
    _check_level("sparsity_init", init, path)
    _check_level("sparsity_target", target, path)
    if target_epoch < 1:
        raise ConfigError(f"{path}sparsity_target_epoch", f"expected an epoch >= 1, got {target_epoch}")
    k = math.log((1.0 - init) / (1.0 - target)) / target_epoch

    def level(progress: Progress) -> float:
        e = min(float(target_epoch), _epochs(progress, update_per_optimizer_step, steps_per_epoch))
        value = 1.0 - (1.0 - init) * math.exp(-k * e)
        return target if e >= target_epoch else value

    return level


def multistep(steps: Sequence[int], levels: Sequence[float], path: str = "") -> Schedule:
    """``levels[i]`` from epoch ``steps[i-1]`` on (``levels[0]`` before the first step)."""
    if len(levels) != len(steps) + 1:
        raise ConfigError(
            f"{path}multistep_sparsity_levels",
            f"expected {len(steps) + 1} levels for {len(steps)} multistep_steps, got {len(levels)}",
        )
    if list(steps) != sorted(steps) or len(set(steps)) != len(steps):
        raise ConfigError(f"{path}multistep_steps", f"expected strictly increasing epochs, got {list(steps)}")
    for i, value in enumerate(levels):
        _check_level(f"multistep_sparsity_levels[{i}]", value, path)

    def level(progress: Progress) -> float:
        return levels[sum(1 for s in steps if progress.epoch >= s)]

    return level


def constant(value: float, path: str = "") -> Schedule:
    _check_level("sparsity_target", value, path)
    return lambda progress: value


@dataclasses.dataclass(frozen=True)
class AdaptiveLevel:
    """State of the adaptive schedule: the current level and epochs spent close to it."""

    level: float
    patience_left: int


def adaptive_step(
    state: AdaptiveLevel, measured_loss: float, *, target: float, patience: int, step: float = 0.05, eps: float = 1e-2
) -> AdaptiveLevel:
    """One epoch of the adaptive schedule: when the compression loss stayed below ``eps`` for
    ``patience`` epochs (the model reached the current level), raise the level by ``step``
    up to ``target``."""
    if measured_loss >= eps:
        return AdaptiveLevel(state.level, patience)
    left = state.patience_left - 1
    if left > 0:
        return AdaptiveLevel(state.level, left)
    return AdaptiveLevel(min(target, state.level + step), patience)


SCHEDULES = ("polynomial", "exponential", "multistep", "adaptive")


# ------------------------------------------------------------------ filter pruning (NNCF semantics)
#
# Level 0 during the ``num_init_steps`` warm-up epochs; then, counting ``t = epoch - num_init_steps``,
# the schedule moves from ``init`` to ``target`` over ``pruning_steps`` epochs and stays there.

PRUNING_SCHEDULES = ("baseline", "exponential", "exponential_with_bias")


def check_pruning_levels(init: float, target: float, num_init_steps: int, pruning_steps: int, path: str) -> None:
    """Raise ``ConfigError`` (naming the key under ``path``) for levels outside [0, 1), ``init > target``
    or negative epoch counts."""
    if not 0.0 <= init < 1.0:
        raise ConfigError(f"{path}pruning_init", f"expected a level in [0, 1), got {init!r}")
    if not 0.0 <= target < 1.0:
        raise ConfigError(f"{path}params.pruning_target", f"expected a level in [0, 1), got {target!r}")
    if init > target:
        raise ConfigError(f"{path}pruning_init", f"expected pruning_init <= pruning_target ({target}), got {init}")
    if num_init_steps < 0:
        raise ConfigError(f"{path}params.num_init_steps", f"expected an epoch count >= 0, got {num_init_steps}")
    if pruning_steps < 1:
        raise ConfigError(f"{path}params.pruning_steps", f"expected an epoch count >= 1, got {pruning_steps}")


def _warmed(level: Callable[[int], float], num_init_steps: int) -> Schedule:
    return lambda progress: 0.0 if progress.epoch < num_init_steps else level(progress.epoch - num_init_steps)


def pruning_baseline(target: float, num_init_steps: int = 0, path: str = "") -> Schedule:
    """0 for ``num_init_steps`` epochs, then ``target``."""
    check_pruning_levels(0.0, target, num_init_steps, 1, path)
    return _warmed(lambda t: target, num_init_steps)


def pruning_exponential(init: float, target: float, num_init_steps: int = 0, pruning_steps: int = 100, path: str = "") -> Schedule:
    """Density ``1 - level`` decays exponentially from ``1 - init`` (t = 0) to ``1 - target``
    (t = pruning_steps - 1): ``exponential`` shifted by the warm-up."""
    check_pruning_levels(init, target, num_init_steps, pruning_steps, path)
    if pruning_steps < 2 or init == target:
        return _warmed(lambda t: target, num_init_steps)
    inner = exponential(init, target, pruning_steps - 1, path=path)
    return _warmed(lambda t: min(target, inner(Progress(epoch=t))), num_init_steps)


def _bisect_increasing(h: Callable[[float], float], value: float, lo: float = 1.0 + 1e-12) -> float:
    """The ``y > lo`` with ``h(y) = value`` for ``h`` increasing on ``y > lo`` (bracket doubled, then bisected)."""
    hi = 2 * lo
    while h(hi) < value:
        hi *= 2
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if h(mid) < value else (lo, mid)
    return 0.5 * (lo + hi)


def exponential_with_bias_coefficients(init: float, target: float, pruning_steps: int, d: float = 0.125, path: str = "") -> tuple[float, float, float]:
    """``(a, b, k)`` of ``level(t) = a exp(-k t) + b`` with ``level(0) = init``,
    ``level(T) = target`` and ``level(d T) = 3/4 target`` (T = ``pruning_steps``; SFP paper).

    With ``y = exp(d k T)`` (``d = 1/8``) the system gives
    ``(1 - 1/y) / (1 - y^-8) = (3/4 target - init) / (target - init)``; the left side rises from
    1/8 to 1 on ``y > 1``, so a root exists when ``init < 5/7 target``; bisection finds it. (For
    ``init = 0`` this is NNCF's ``y/3 + y^-7 = 4/3``; NNCF keeps that equation for any ``init``,
    which stops short of ``target``; the general system reaches it.)

    For ``5/7 target <= init < target`` the waypoint ``3/4 target`` lies below ``init`` and no rising
    curve passes through it; the curvature ``k`` then comes from NNCF's equation and ``a``, ``b``
    from the two end points, so the level still rises from ``init`` to ``target``."""
    if target == init:
        return 0.0, target, 0.0
    if init < 5 / 7 * target:
        ratio = (0.75 * target - init) / (target - init)
        y = _bisect_increasing(lambda y: (1 - 1 / y) / (1 - y**-8), ratio)
        k = math.log(y) / (d * pruning_steps)
        a = (target - init) / (y**-8 - 1)
        return a, init - a, k
    # y/3 + y^-7 falls to its minimum at y = 21^(1/8), then rises through 4/3 once.
    y = _bisect_increasing(lambda y: y / 3 + y**-7, 4 / 3, lo=21 ** (1 / 8))
    k = math.log(y) / (d * pruning_steps)
    a = (target - init) / (math.exp(-k * pruning_steps) - 1)
    return a, init - a, k


def pruning_exponential_with_bias(init: float, target: float, num_init_steps: int = 0, pruning_steps: int = 100, path: str = "") -> Schedule:
    """``min(target, a exp(-k t) + b)``; see ``exponential_with_bias_coefficients``."""
    check_pruning_levels(init, target, num_init_steps, pruning_steps, path)
    a, b, k = exponential_with_bias_coefficients(init, target, pruning_steps, path=path)
    return _warmed(lambda t: min(target, a * math.exp(-k * t) + b), num_init_steps)
