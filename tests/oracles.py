"""Independent numpy implementations of MATH.md, used as test oracles."""

from __future__ import annotations

import numpy as np

F32 = np.float32
EPS = F32(1e-16)


def _bcast(p: np.ndarray, x: np.ndarray, axis: int | None) -> np.ndarray:
    p = np.asarray(p, dtype=F32)
    if axis is None:
        return p.reshape(())
    shape = [1] * x.ndim
    shape[axis] = -1
    return p.reshape(shape)


def _reduce(g: np.ndarray, x: np.ndarray, axis: int | None) -> np.ndarray:
    if axis is None:
        return np.asarray(g.sum(dtype=np.float64))
    dims = tuple(d for d in range(x.ndim) if d != axis)
    return g.sum(axis=dims, dtype=np.float64)


def symmetric(x, scale, ql, qh, axis=None, grad=None):
    """Forward, and with ``grad`` the gradients ``(dx, dscale)``."""
    x = np.asarray(x, dtype=F32)
    s = np.abs(_bcast(scale, x, axis)) + EPS
    step = s / F32(qh)
    r = np.round(x / step)
    out = (np.clip(r, ql, qh) * step).astype(F32)
    if grad is None:
        return out
    g = np.asarray(grad, dtype=np.float64)
    below, above = r < ql, r > qh
    inside = ~below & ~above
    dx = np.where(inside, g, 0.0)
    ds = np.where(inside, (out.astype(np.float64) - x) / s, np.where(above, 1.0, ql / qh)) * g
    return out, dx, _reduce(ds, x, axis)


def adjust_range(low, rng, n):
    low = np.asarray(low, dtype=F32)
    rng = np.asarray(rng, dtype=F32)
    n = F32(n)
    l1 = np.minimum(low, F32(0))
    h1 = np.maximum(low + rng, F32(0))
    z = np.round(-l1 * n / (h1 - l1))
    interior = (z > 0) & (z < n)
    safe_z = np.where(interior, z, F32(1))
    t = (safe_z - n) / safe_z
    h2 = t * l1
    l2 = h1 / np.where(interior, t, F32(-1))
    take_low_end = (h2 - l1) > (h1 - l2)
    lo = np.where(interior & ~take_low_end, l2, l1).astype(F32)
    hi = np.where(interior & take_low_end, h2, h1).astype(F32)
    return lo, (hi - lo).astype(F32)


def asymmetric(x, input_low, input_range, bits, axis=None, grad=None):
    x = np.asarray(x, dtype=F32)
    n = 2**bits - 1
    low = _bcast(input_low, x, axis)
    rng = np.abs(_bcast(input_range, x, axis)) + EPS
    low, rng = adjust_range(low, rng, n)
    step = rng / F32(n)
    r = np.round((x - low) / step)
    zp = np.round(-low / step)
    out = ((np.clip(r, 0, n) - zp) * step).astype(F32)
    if grad is None:
        return out
    g = np.asarray(grad, dtype=np.float64)
    below, above = r < 0, r > n
    inside = ~below & ~above
    dx = np.where(inside, g, 0.0)
    dlow = np.where(inside, 0.0, g)
    drange = np.where(inside, (out.astype(np.float64) - x) / rng, np.where(above, 1.0, 0.0)) * g
    return out, dx, _reduce(dlow, x, axis), _reduce(drange, x, axis)
