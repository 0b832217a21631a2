"""AdaRound's rounding variables (Nagel et al., 2020, "Up or Down? Adaptive Rounding for
Post-Training Quantization"): the soft rounding ``h(V)``, its regularizer, the annealed ``beta``,
and the weight they give on a quantizer's integer grid.

A weight ``w`` with grid step ``delta`` and zero point ``z`` sits at ``u = w / delta + z`` in integer
units. Round-to-nearest takes ``round(u)``; AdaRound takes ``floor(u) + h`` with a learned
``h`` in [0, 1]:

    h(V)   = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1),   zeta = 1.1, gamma = -0.1
    w~(V)  = delta (clip(floor(u) + h(V), qmin, qmax) - z)
    f_reg  = sum_i 1 - |2 h(V_i) - 1|^beta

The rectified sigmoid reaches 0 and 1 exactly (its stretch beyond [0, 1] is clipped), so a
variable pushed there by ``f_reg`` stops moving; the final rounding is ``h >= 0.5``, i.e. ``V >= 0``.
"""

from __future__ import annotations

import torch
from torch import Tensor

ZETA = 1.1
GAMMA = -0.1


def rectified_sigmoid(v: Tensor) -> Tensor:
    """``h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)``."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def initial_variables(fraction: Tensor) -> Tensor:
    """``V`` with ``h(V) = fraction`` (the fractional part ``u - floor(u)``), so training starts
    from the float weight: ``V = logit((fraction - gamma) / (zeta - gamma))``."""
    p = ((fraction - GAMMA) / (ZETA - GAMMA)).clamp(1e-6, 1 - 1e-6)
    return torch.log(p) - torch.log1p(-p)


def rounding_regularizer(v: Tensor, beta: float) -> Tensor:
    """``f_reg = sum 1 - |2 h(V) - 1|^beta``: zero exactly when every ``h`` is 0 or 1; a large
    ``beta`` only pushes values near 0.5, a small one pushes all of them."""
    return (1 - (2 * rectified_sigmoid(v) - 1).abs().pow(beta)).sum()


def beta_at(progress: float, beta_range: tuple[float, float] = (20.0, 2.0), warm_start: float = 0.2) -> float:
    """``beta`` at ``progress`` in [0, 1] of the iterations: ``beta_start`` until ``warm_start``,
    then linear to ``beta_end``: ``beta = end + (start - end) (1 - (t - warm) / (1 - warm))``
    (AIMET's and BRECQ's linear decay)."""
    start, end = beta_range
    if progress <= warm_start:
        return float(start)
    relative = (progress - warm_start) / max(1.0 - warm_start, 1e-12)
    return float(end + (start - end) * max(0.0, 1.0 - relative))


def integer_units(weight: Tensor, delta: Tensor, zero_point: Tensor) -> Tensor:
    """``u = w / delta + z`` (``delta`` and ``z`` already broadcast to ``weight``)."""
    return weight / delta + zero_point


def soft_weight(floor_u: Tensor, v: Tensor, delta: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    """``w~(V) = delta (clip(floor(u) + h(V), qmin, qmax) - z)``: differentiable in ``V``."""
    return delta * (torch.clamp(floor_u + rectified_sigmoid(v), qmin, qmax) - zero_point)


def hard_weight(floor_u: Tensor, v: Tensor, delta: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    """``delta (clip(floor(u) + [V >= 0], qmin, qmax) - z)``: a value of the integer grid."""
    return delta * (torch.clamp(floor_u + (v >= 0).to(floor_u.dtype), qmin, qmax) - zero_point)


def nearest_weight(weight: Tensor, delta: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    """Round-to-nearest on the same grid: ``delta (clip(round(u), qmin, qmax) - z)``."""
    return delta * (torch.clamp(torch.round(integer_units(weight, delta, zero_point)), qmin, qmax) - zero_point)


def broadcast_grid(delta: Tensor, zero_point: Tensor, weight: Tensor, axis: int | None) -> tuple[Tensor, Tensor]:
    """``delta`` and ``zero_point`` (per tensor, or per channel along ``axis``) shaped to broadcast
    against ``weight``, in its dtype."""
    if axis is None or delta.numel() == 1:
        return delta.reshape(()).to(weight.dtype), zero_point.reshape(()).to(weight.dtype)
    shape = [1] * weight.dim()
    shape[axis % weight.dim()] = -1
    return delta.reshape(shape).to(weight.dtype), zero_point.reshape(shape).to(weight.dtype)


def is_on_grid(weight: Tensor, delta: Tensor, zero_point: Tensor, qmin: int, qmax: int, tol: float = 1e-4) -> bool:
    """Every ``w / delta + z`` is an integer in ``[qmin, qmax]`` (within ``tol`` of float rounding)."""
    u = integer_units(weight, delta, zero_point)
    k = torch.round(u)
    return bool(((u - k).abs() <= tol).all() and (k >= qmin).all() and (k <= qmax).all())


__all__ = [
    "GAMMA",
    "ZETA",
    "beta_at",
    "broadcast_grid",
    "hard_weight",
    "initial_variables",
    "integer_units",
    "is_on_grid",
    "nearest_weight",
    "rectified_sigmoid",
    "rounding_regularizer",
    "soft_weight",
]
