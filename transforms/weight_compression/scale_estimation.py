"""Scale estimation: per-group scales refined on calibration statistics (NNCF 3.x), a pure function.

Round-to-nearest takes each group's scale from its extremes. Scale estimation keeps the integers'
zero points and searches, per output row ``i`` and group ``K``, the scale ``s_iK`` that minimises
the error of that group's contribution to the layer output on the calibration tokens,

    e_iK(s) = d G_KK d^T,    d = w_iK - Q_s(w_iK),

``G_KK`` the block of the inputs' second-moment matrix for the group's channels
(``layer_inputs``), ``Q_s`` quantization on the grid of scale ``s`` (zero point fixed). Following
NNCF's ``ScaleEstimation.calculate_quantization_params`` (``scale_estimation.py``; defaults of
``AdvancedScaleEstimationParameters``):

1. ``s0`` and the zero points ``z`` come from round-to-nearest; ``e0 = e(s0)`` is the best so far.
2. The "near-to-ideal" scale of a group, given integer targets ``t_j`` (``q_j - z``, or the NF4
   level): every weight would be exact with ``|w_j| / |t_j|``; average those with the importance
   ``a_j = m_j / sum_K m`` (``m_j`` the mean input magnitude of channel ``j``; ``a_j = 0`` where the
   initial target is 0, and ``|t_j| + 0.001`` in the denominator there), with the sign of ``s0``:
   ``s* = sign(s0) sum_j a_j |w_j| / (|t_j| + 0.001 [t_j = 0])``.
3. ``initial_steps`` times: ``s*`` from the targets of the current best scale; where
   ``e(s*) <= best``, it becomes the best.
4. ``scale_steps`` times, ``f = 1, 0.95, 0.90, ...`` (``1 - 0.05 step``): ``s*`` from the targets
   of ``f s0``; where ``e(s*) <= best``, it becomes the best.
5. ``weight_penalty > 0`` adds ``weight_penalty * mean_j d_j^2`` to ``e`` (NNCF's option; off by
   default).

Every (row, group) keeps the best of its candidates, the initial ``s0`` included, so ``e_iK``
never exceeds round-to-nearest's. The layer's output error ``E = sum_i d_i G d_i^T`` (``d_i`` the
whole row) also holds the cross terms between groups, which the per-group search ignores; with
``never_worse=True`` (default) a row whose ``E`` term ends above round-to-nearest's takes
round-to-nearest's scales back, so the layer objective never exceeds round-to-nearest's either.

Where purecomp departs from NNCF: NNCF measures ``e`` on per-sample token MEANS of the input (a
subsample of 32 to 64 samples) and takes ``m_j = max_sample |mean_t x_j|``; purecomp measures ``e``
on every calibration token through ``G`` and takes ``m_j = mean_t |x_j|``. A scale ``|s*| <
eps`` (possible only when a group's targets are all 0) is not a candidate.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from purecomp.errors import ConfigError

from .grid import EPS, Quantized, compute_scale, dequantize, quantize_with, resolve_group_size
from .layer_inputs import LayerInputs

if TYPE_CHECKING:
    from .precision import LayerConfig

ZERO_TARGET = 0.001  # NNCF's zero_scale: added to |t| where the target is 0


@dataclasses.dataclass(frozen=True)
class ScaleEstimationParameters:
    """NNCF's ``AdvancedScaleEstimationParameters`` (same names and defaults) without
    ``subset_size`` (purecomp's statistics cover every calibration sample)."""

    initial_steps: int = 5
    scale_steps: int = 5
    weight_penalty: float = -1.0

    def __post_init__(self) -> None:
        for key in ("initial_steps", "scale_steps"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"scale_estimation_params.{key}", f"expected a non-negative integer, got {value!r}")


def _blocks(gram: Tensor, n_groups: int, g: int) -> Tensor:
    """The diagonal blocks ``G_KK`` of ``gram``: ``[n_groups, g, g]``."""
    idx = torch.arange(n_groups)
    return gram.reshape(n_groups, g, n_groups, g)[idx, :, idx, :]


def group_errors(weight: Tensor, approx: Tensor, inputs: LayerInputs | None, group_size: int,
                 weight_penalty: float = -1.0, blocks: Tensor | None = None) -> Tensor:
    """``[out, n_groups]``: ``e_iK = d G_KK d^T`` (+ ``weight_penalty * mean d^2`` when positive)
    for ``d = weight - approx`` restricted to row ``i`` and group ``K`` (float64). ``blocks``: the
    float64 ``G_KK`` when already extracted (else taken from ``inputs``)."""
    out, in_features = weight.shape
    n_groups = in_features // group_size
    d = (weight.to(torch.float64) - approx.to(torch.float64)).reshape(out, n_groups, group_size).transpose(0, 1)
    if blocks is None:
        assert inputs is not None
        blocks = _blocks(inputs.gram.to(torch.float64), n_groups, group_size)
    err = (torch.bmm(d, blocks) * d).sum(dim=-1).T  # [n_groups, out, g] @ [n_groups, g, g]
    if weight_penalty > 0:
        err = err + weight_penalty * (d * d).mean(dim=-1).T
    return err


def keep_better_rows(weight: Tensor, candidate: Quantized, baseline: Quantized, inputs: LayerInputs,
                     mode: str) -> Quantized:
    """``candidate`` with every output row whose layer-objective term ``d_i G d_i^T`` exceeds
    ``baseline``'s replaced by ``baseline``'s row (integers, scales and zero points)."""
    w = weight.detach().to(torch.float32)
    worse = inputs.row_errors(w, dequantize(*candidate, mode)) > inputs.row_errors(w, dequantize(*baseline, mode))
    if not bool(worse.any()):
        return candidate
    rows = worse[:, None]
    zp = None
    if candidate.zero_point is not None and baseline.zero_point is not None:
        zp = torch.where(rows, baseline.zero_point, candidate.zero_point)
    return Quantized(torch.where(rows, baseline.values, candidate.values),
                     torch.where(rows, baseline.scale, candidate.scale), zp)


def estimate_scales(weight: Tensor, config: LayerConfig, inputs: LayerInputs,
                    params: ScaleEstimationParameters = ScaleEstimationParameters(), *,
                    never_worse: bool = True) -> Quantized:
    """The integers, refined scales and round-to-nearest's zero points of ``weight [out, in]`` in
    ``config`` on calibration ``inputs`` (module docstring)."""
    if weight.dim() != 2 or weight.shape[1] != inputs.in_features:
        raise ConfigError("weight", f"expected a 2-D weight with {inputs.in_features} input channels, "
                          f"got shape {tuple(weight.shape)}")
    mode = config.mode
    w = weight.detach().to(torch.float32)
    out, in_features = w.shape
    g = resolve_group_size(in_features, config.group_size)
    n_groups = in_features // g
    wg = w.reshape(out, n_groups, g)

    def targets(scale: Tensor) -> Tensor:  # the unscaled integers (q - z, or NF4 levels)
        q = quantize_with(w, mode, g, scale, zp)
        return dequantize(q.values, torch.ones_like(scale), q.zero_point, mode).reshape(out, n_groups, g)

    blocks = _blocks(inputs.gram.to(torch.float64), n_groups, g)

    def error(scale: Tensor) -> Tensor:
        approx = dequantize(*quantize_with(w, mode, g, scale, zp), mode)
        return group_errors(w, approx, None, g, params.weight_penalty, blocks)

    s0, zp = compute_scale(w, mode, g)
    sign = torch.sign(s0)
    t0 = targets(s0)
    importance = inputs.magnitude.to(torch.float32).reshape(1, n_groups, g).expand(out, n_groups, g)
    importance = torch.where(t0 == 0, 0.0, importance)
    importance = importance / (importance.sum(dim=-1, keepdim=True) + EPS)

    def near_to_ideal(t: Tensor) -> Tensor:
        ideal = wg.abs() / (t.abs() + ZERO_TARGET * (t == 0).to(torch.float32))
        near = (ideal * importance).sum(dim=-1) * sign
        return torch.where(near.abs() < EPS, torch.nan, near)  # not a candidate

    best_scale, best_err = s0, error(s0)

    def consider(candidate: Tensor) -> None:
        nonlocal best_scale, best_err
        valid = ~torch.isnan(candidate)
        safe = torch.where(valid, candidate, best_scale)
        err = error(safe)
        take = valid & (err <= best_err)
        best_scale = torch.where(take, safe, best_scale)
        best_err = torch.where(take, err, best_err)

    for _ in range(params.initial_steps):
        consider(near_to_ideal(targets(best_scale)))
    for step in range(params.scale_steps):
        consider(near_to_ideal(targets((1.0 - 0.05 * step) * s0)))
    result = quantize_with(w, mode, g, best_scale, zp)
    if never_worse:
        result = keep_better_rows(w, result, quantize_with(w, mode, g, s0, zp), inputs, mode)
    return result
