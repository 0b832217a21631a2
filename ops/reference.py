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


def _regions(r: Tensor, ql: int, qh: int) -> tuple[Tensor, Tensor]:
    """``(inside, above)`` masks from the detached rounded levels ``r``."""
    return (r >= ql) & (r <= qh), r > qh


def _with_gradient(value: Tensor, surrogate: Tensor) -> Tensor:
    """``value`` exactly (``surrogate - surrogate.detach()`` is an exact zero), gradients of ``surrogate``."""
    return value + (surrogate - surrogate.detach())


def fake_quantize_symmetric_reference(
    x: Tensor, scale: Tensor, *, bits: int, signed: bool, narrow_range: bool, axis: int | None = None
) -> Tensor:
    """Symmetric fake quantization.

    ``step = s / qh`` with ``s = |scale| + eps``; ``out = step * round(clamp(x / step, ql, qh))``.
    Gradients (``d round / du := 1``): d/dx = g inside, 0 outside; d/dscale = ``(out - x) / s``
    inside, ``1`` above, ``ql / qh`` below.
    """
    ql, qh = symmetric_levels(bits, signed, narrow_range)
    xf = x.float()
    s = broadcast_param(scale.float(), xf, axis).abs() + EPS
    with torch.no_grad():
        step = s / qh
        r = torch.round(xf / step)
        out = torch.clamp(r, ql, qh) * step
        inside, above = _regions(r, ql, qh)
        slope = (out - xf) / s
    surrogate = torch.where(inside, xf + slope * s, torch.where(above, s, s * (ql / qh)))
    return _with_gradient(out, surrogate).to(x.dtype)


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

    The range ``[low, low + |range| + eps]`` is first adjusted so that zero is a level
    (``adjust_asymmetric_range``, straight-through). With ``n = 2^b - 1``,
    ``step = range / n`` and the zero point ``zp = round(-low / step)``:
    ``out = step * (clamp(round((x - low) / step), 0, n) - zp)``. This equals
    ``low + step * round((clamp(x, low, high) - low) / step)`` whenever ``-low / step`` is the
    integer ``zp`` (the adjustment's purpose), maps 0 to exactly 0, and is what ONNX's
    QuantizeLinear/DequantizeLinear compute with that integer zero point.
    Gradients: d/dx = g inside; d/dlow = 0 inside, 1 outside; d/drange = ``(out - x) / range``
    inside, 1 above, 0 below.
    """
    _, n = asymmetric_levels(bits)
    xf = x.float()
    low = broadcast_param(input_low.float(), xf, axis)
    rng = broadcast_param(input_range.float(), xf, axis).abs() + EPS
    adj_low, adj_range = adjust_asymmetric_range(low, rng, n)
    with torch.no_grad():
        step = adj_range / n
        r = torch.round((xf - adj_low) / step)
        zero_point = torch.round(-adj_low / step)
        out = (torch.clamp(r, 0, n) - zero_point) * step
        inside, above = _regions(r, 0, n)
        slope = (out - xf) / adj_range
    surrogate = torch.where(inside, xf + slope * rng, torch.where(above, low + rng, low))
    return _with_gradient(out, surrogate).to(x.dtype)
