"""One layer's AdaRound: learn ``V`` so that the layer with ``w~(V)`` reproduces its float output.

    min_V  E_x || f(x_q; w~(V)) - f(x; w) ||^2  +  lambda f_reg(V; beta)

summed over output channels, averaged over samples and positions (AIMET's reconstruction loss),
with ``x_q`` the layer's input in the quantized model and ``f(x; w)`` its float output.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor

from .parameters import AdaRoundParameters
from .rounding import (
    beta_at,
    hard_weight,
    initial_variables,
    integer_units,
    nearest_weight,
    rectified_sigmoid,
    rounding_regularizer,
    soft_weight,
)

LayerFn = Callable[[Tensor, Tensor], Tensor]  # (input rows, weight) -> output rows


@dataclasses.dataclass(frozen=True)
class LayerResult:
    """The rounded weight and what the optimization did: reconstruction errors (the loss's first
    term on every sample) of round-to-nearest and of the result, the share of ``h`` at exactly 0
    or 1 at the end, the share of weights rounded the other way from nearest, and whether the
    learned rounding lost to nearest on the calibration samples (then nearest is the result)."""

    weight: Tensor
    error_nearest: float
    error_adaround: float
    settled: float
    flipped: float
    kept_nearest: bool = False


def reconstruction_error(out: Tensor, target: Tensor, channel_dim: int) -> Tensor:
    """``mean over samples and positions of sum over channels (out - target)^2``."""
    return (out - target).pow(2).sum(channel_dim).mean()


def _full_error(layer: LayerFn, inputs: Tensor, target: Tensor, weight: Tensor, channel_dim: int,
                chunk: int = 256) -> float:
    with torch.no_grad():
        total = sum(float(reconstruction_error(layer(inputs[i:i + chunk], weight), target[i:i + chunk], channel_dim))
                    * len(inputs[i:i + chunk]) for i in range(0, len(inputs), chunk))
    return total / len(inputs)


def adaround_layer(
    layer: LayerFn,
    inputs: Tensor,
    target: Tensor,
    weight: Tensor,
    grid: tuple[Tensor, Tensor, int, int],
    parameters: AdaRoundParameters | None = None,
    *,
    channel_dim: int = 1,
    on_step: Callable[[int, float], None] | None = None,
) -> LayerResult:
    """AdaRound ``weight`` on ``grid`` = ``(delta, zero_point, qmin, qmax)`` (broadcast to the
    weight): Adam on ``V`` from ``h(V) = frac(u)`` for ``parameters.num_iterations`` steps on random
    batches of (``inputs``, ``target``) rows; returns ``hard_weight``, on the grid, or nearest
    rounding when that reconstructs the calibration samples better (the relaxation can lose to
    it on a layer whose errors are tiny)."""
    parameters = parameters or AdaRoundParameters()
    delta, zero_point, qmin, qmax = grid
    weight = weight.detach()
    u = integer_units(weight, delta, zero_point)
    floor_u = torch.floor(u)
    v = initial_variables(u - floor_u).requires_grad_(True)
    optimizer = torch.optim.Adam([v], lr=parameters.learning_rate)
    generator = torch.Generator().manual_seed(parameters.seed)
    rows = len(inputs)
    steps = parameters.num_iterations
    for step in range(steps):
        index = torch.randint(rows, (min(parameters.batch_size, rows),), generator=generator)
        out = layer(inputs[index], soft_weight(floor_u, v, delta, zero_point, qmin, qmax))
        loss = reconstruction_error(out, target[index], channel_dim)
        progress = step / steps
        if progress >= parameters.warm_start and parameters.reg_param > 0:
            loss = loss + parameters.reg_param * rounding_regularizer(v, beta_at(progress, parameters.beta_range,
                                                                                parameters.warm_start))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if on_step is not None:
            on_step(step, float(loss))
    v = v.detach()
    rounded = hard_weight(floor_u, v, delta, zero_point, qmin, qmax)
    nearest = nearest_weight(weight, delta, zero_point, qmin, qmax)
    h = rectified_sigmoid(v)
    error_nearest = _full_error(layer, inputs, target, nearest, channel_dim)
    error_adaround = _full_error(layer, inputs, target, rounded, channel_dim)
    kept_nearest = error_adaround > error_nearest  # never worse than nearest on the layer's objective
    chosen = nearest if kept_nearest else rounded
    return LayerResult(
        weight=chosen,
        error_nearest=error_nearest,
        error_adaround=min(error_adaround, error_nearest),
        settled=float(((h == 0) | (h == 1)).float().mean()),
        flipped=float((chosen != nearest).float().mean()),
        kept_nearest=kept_nearest,
    )
