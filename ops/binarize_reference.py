"""Pure-torch composite binarizers: the canonical definitions (MATH.md, Binarization).

Like ``reference.py``, built from differentiable torch ops plus ``detach``, so they compose
with autograd, ``torch.func`` and ``torch.compile``; the C++ activation kernels must equal
``activation_binarize_reference``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .reference import broadcast_param


def _sign_pm1(w: Tensor) -> Tensor:
    """``+1`` where ``w > 0``, ``-1`` elsewhere (zero included): exactly two values."""
    return torch.where(w > 0, 1.0, -1.0).to(w.dtype)


def xnor_binarize_reference(w: Tensor) -> Tensor:
    """XNOR weights: ``sign(W) * mean(|W|)`` per output filter (axis 0), straight-through.

    ``alpha_o = mean_{i,k}(|W_{o,i,k}|)``; ``out = alpha_o * sign(W)``; ``d out / d W := 1``.
    """
    dims = tuple(range(1, w.dim()))
    with torch.no_grad():
        alpha = w.abs().mean(dim=dims, keepdim=True) if dims else w.abs()
        out = _sign_pm1(w) * alpha
    return out + (w - w.detach())  # exactly out; gradient of w (straight-through)


def dorefa_binarize_reference(w: Tensor) -> Tensor:
    """DoReFa weights: ``sign(W) * mean(|W|)`` over the whole tensor, straight-through."""
    with torch.no_grad():
        out = _sign_pm1(w) * w.abs().mean()
    return out + (w - w.detach())  # exactly out; gradient of w (straight-through)


def activation_binarize_reference(x: Tensor, scale: Tensor, threshold: Tensor, axis: int = 1) -> Tensor:
    """Scale-threshold activation binarization (paper eq. 5): ``out = s * H(x - s * t)``.

    ``s = scale`` (one positive value), ``t = threshold`` (one value per channel along
    ``axis``), ``H(u) = 1`` for ``u > 0`` else ``0``, so ``out`` is exactly ``s`` or ``0``.
    Gradients (PACT-like, clipping plus binarization error):

    - ``d/dx = g`` for ``0 <= x <= s``, else ``0``;
    - ``d/ds = sum(g * (out - x) / s)`` over ``x <= s`` plus ``sum(g)`` over ``x > s``;
    - ``d/dt_c = -sum(g)`` over the elements of channel ``c`` with ``0 < x < s``.
    """
    xf = x.float()
    s = scale.float().reshape(())
    t = broadcast_param(threshold.float(), xf, axis)
    with torch.no_grad():
        out = torch.where(xf > s * t, s, torch.zeros_like(s))
        pass_x = (xf >= 0) & (xf <= s)
        slope_s = torch.where(xf > s, torch.ones_like(xf), (out - xf) / s)
        slope_t = -((xf > 0) & (xf < s)).float()
    surrogate = torch.where(pass_x, xf, torch.zeros_like(xf)) + s * slope_s + t * slope_t
    return (out + (surrogate - surrogate.detach())).to(x.dtype)
