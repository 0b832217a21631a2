"""Pure-torch composite fake quantizers: the canonical definitions (MATH.md).

Built only from differentiable torch ops plus ``detach`` for the straight-through
estimator, so they work under autograd, ``torch.func`` (grad, vmap, jvp, jvp(grad),
grad(grad)) and ``torch.compile``. The C++ kernels must equal these.

Regions are decided on the integer grid from a detached ``r = round(x / step)``:
below when ``r < ql``, above when ``r > qh``, inside otherwise. Computing them from the
rounded value keeps values that sit exactly on a range end inside, whatever float
rounding does to ``x / step``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .levels import asymmetric_levels, symmetric_levels

EPS = 1e-16  # keeps scale / input_range strictly positive: |s| + EPS


def broadcast_param(param: Tensor, x: Tensor, axis: int | None) -> Tensor:
    """View a per-tensor (numel 1) or per-channel (shape ``(C,)``) parameter so it broadcasts over ``x``."""
    if axis is None:
        return param.reshape(())
    axis = axis % x.dim()
    shape = [1] * x.dim()
    shape[axis] = -1
    return param.reshape(shape)


def _straight_through_levels(u: Tensor, ql: int, qh: int) -> Tensor:
    """``clamp(round(u), ql, qh)`` with d/du = 1 inside, 0 outside (regions from detached round)."""
    r = torch.round(u.detach())
    inside = (r >= ql) & (r <= qh)
    rounded = u + (r - u).detach()  # value r exactly; derivative 1
    clamped = torch.where(r < ql, torch.full_like(u, ql), torch.full_like(u, qh))
    return torch.where(inside, rounded, clamped)


def fake_quantize_symmetric_reference(
    x: Tensor, scale: Tensor, *, bits: int, signed: bool, narrow_range: bool, axis: int | None = None
) -> Tensor:
    """Symmetric fake quantization.

    ``step = s / qh`` with ``s = |scale| + eps``; ``out = step * round(clamp(x / step, ql, qh))``.
    Gradients (``d round / du := 1``): d/dx = g inside, 0 outside; d/dscale = ``(out - x) / s``
    inside, ``1`` above, ``ql / qh`` below.
    """
    ql, qh = symmetric_levels(bits, signed, narrow_range)
    compute = x.float()
    s = broadcast_param(scale.float(), compute, axis).abs() + EPS
    step = s / qh
    q = _straight_through_levels(compute / step, ql, qh)
    return (q * step).to(x.dtype)


def adjust_asymmetric_range(input_low: Tensor, input_range: Tensor, levels: int) -> tuple[Tensor, Tensor]:
    """Move ``[low, low + range]`` so float zero lands exactly on an integer level (paper eq. after (3)).

    ``l1 = min(low, 0)``, ``h1 = max(low + range, 0)``, ``z = round(-l1 n / (h1 - l1))``,
    ``t = (z - n) / z``, ``h2 = t l1``, ``l2 = h1 / t``. The range is ``[l1, h1]`` when z is 0 or n,
    else ``[l1, h2]`` when ``h2 - l1 > h1 - l2``, else ``[l2, h1]``. Returns ``(low, range)``
    computed without gradient; callers make it straight-through.
    """
    with torch.no_grad():
        n = float(levels)
        l1 = torch.clamp(input_low, max=0.0)
        h1 = torch.clamp(input_low + input_range, min=0.0)
        z = torch.round(-l1 * n / (h1 - l1))
        interior = (z > 0) & (z < n)
        safe_z = torch.where(interior, z, torch.ones_like(z))
        t = (safe_z - n) / safe_z
        h2 = t * l1
        l2 = h1 / torch.where(interior, t, -torch.ones_like(t))
        take_low_end = (h2 - l1) > (h1 - l2)
        low = torch.where(interior & ~take_low_end, l2, l1)
        high = torch.where(interior & take_low_end, h2, h1)
        return low, high - low


def fake_quantize_asymmetric_reference(
    x: Tensor, input_low: Tensor, input_range: Tensor, *, bits: int, axis: int | None = None
) -> Tensor:
    """Asymmetric fake quantization with learned ``input_low`` and ``input_range``.

    The range ``[lo, lo + |range| + eps]`` is first adjusted so that zero is a level
    (straight-through), then with ``n = 2^b - 1``, ``step = range / n`` and the zero point
    ``zp = round(-lo / step)``: ``out = step * (round(clamp(x, lo, hi) - lo) / step) - zp)``,
    which equals ``lo + step * round((clamp(x, lo, hi) - lo) / step)`` and maps 0 to exactly 0.
    Gradients: d/dx = g inside; d/dlow = 0 inside, 1 outside; d/drange = ``(out - x) / range``
    inside, 1 above, 0 below.
    """
    _, n = asymmetric_levels(bits)
    compute = x.float()
    raw_low = broadcast_param(input_low.float(), compute, axis)
    raw_range = broadcast_param(input_range.float(), compute, axis).abs() + EPS
    adj_low, adj_range = adjust_asymmetric_range(raw_low, raw_range, n)
    low = raw_low + (adj_low - raw_low).detach()
    rng = raw_range + (adj_range - raw_range).detach()
    step = rng / n
    q = _straight_through_levels((compute - low) / step, 0, n)
    neg_low_steps = -low / step
    zero_point = neg_low_steps + (torch.round(neg_low_steps) - neg_low_steps).detach()
    return ((q - zero_point) * step).to(x.dtype)
