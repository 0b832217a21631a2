"""AWQ: activation-aware per-input-channel scales (NNCF 3.x's modified AWQ), a pure function.

A linear ``y = x W^T`` computes the same with ``x' = x / s`` and ``W_s = W diag(s)`` for any positive
``s [in]``. Quantizing ``W_s`` instead of ``W`` stores ``W' = Q(W diag(s)) diag(1/s)``: an input
channel with a large ``s`` gets its weights quantized on a finer relative grid (its column is
larger before rounding, and its rounding error is divided by ``s`` afterwards), at the cost of the
other columns of its group, whose grid step grows with the group's range. Scaling the channels
that see the largest activations up protects the weights that matter most to the output.

**Search** (``awq_scale``; NNCF: ``awq.py``, ``AWQ._data_aware_step``, defaults of
``AdvancedAWQParameters``). With ``m_j`` the mean magnitude of input channel ``j`` on the
calibration tokens (``LayerInputs.magnitude``) and ``g`` the group size:

1. the ``k = max(floor(in * percent_to_apply), 1)`` channels of largest ``m`` are the outliers;
   only the groups holding one are searched (``percent_to_apply = 0.002``: one or two groups
   of a 576- to 1536-channel layer; 1.0 searches every group);
2. in a searched group ``K``, the base is ``b_j = clip(m_j, quantile_0.1(m_K), 100)`` (NNCF's
   clip; a lower bound of 0 is replaced by float32's epsilon times ``max m_K``), and the
   candidates are ``s_K = b_K ** alpha`` for ``alpha = alpha_min + i (alpha_max - alpha_min) /
   steps``, ``i = 0 .. steps - 1`` (0, 0.01, ..., 0.99 by default), plus ``s_K = 1`` (no scaling)
   whatever the grid;
3. each candidate is scored by the LAYER's objective, the mean squared output error on the
   calibration tokens ``E(W') = sum_i d_i G d_i^T`` (``layer_inputs``) with ``d = W - W'``, the
   other groups held at their current choice: for a group the change of ``E`` is
   ``d_K G_KK d_K^T + 2 d_K G_{K,rest} d_rest^T``, exact and cheap; the best candidate is kept.

A uniform factor on ``s_K`` changes nothing (every grid here is scale-equivariant within a
group), so the original AWQ's normalisation of ``s`` by ``sqrt(max s min s)`` is not needed.
Starting from ``s = 1`` (round-to-nearest) and keeping the current scale among each group's
candidates, no step can raise ``E``: ``awq_scale`` never loses to round-to-nearest on ``E``
(the change of ``E`` is recomputed at the end, against float rounding: were it positive, ``s = 1``
is returned).

Where purecomp departs from NNCF: NNCF scores a group by the mean ABSOLUTE error of that group's
partial output on per-sample token MEANS of the input (cross terms with other groups ignored),
and uses ``max_sample |mean_t x|`` as the magnitude. purecomp scores the whole layer's squared
error on every calibration token (``G`` summarizes them) and uses ``mean_t |x|``, as the original
AWQ does.

**Where ``1 / s`` goes.** NNCF folds ``1 / s`` into the producer of ``x`` when it holds a weight
(``MatMul -> Multiply -> MatMul``) and otherwise inserts a multiplication by ``1 / s`` after it.
purecomp keeps it with the layer: a ``CompressedLinear`` holding an ``input_scale`` buffer
(``1 / s``, float32) dequantizes ``W' = Q(W diag(s)) diag(1 / s)``, so its output equals that of
the scaled input. The runtime cost is one multiplication of the dequantized ``[out, in]`` weight by
an ``[in]`` vector per call (the dequantization itself already touches every weight) and ``4 in``
bytes; layers whose search keeps ``s = 1`` get no buffer. This works whatever produces ``x``
(norms shared by several linears, attention outputs, activations), where folding would need one
``s`` shared by every consumer of the producer.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from purecomp.errors import ConfigError

from .grid import EPS, fake_quantize, resolve_group_size
from .layer_inputs import LayerInputs

if TYPE_CHECKING:
    from .precision import LayerConfig


@dataclasses.dataclass(frozen=True)
class AWQParameters:
    """NNCF's ``AdvancedAWQParameters`` (same names and defaults) without ``subset_size`` (purecomp's
    statistics cover every calibration sample) and ``prefer_data_aware_scaling`` (no data-free AWQ)."""

    percent_to_apply: float = 0.002
    alpha_min: float = 0.0
    alpha_max: float = 1.0
    steps: int = 100

    def __post_init__(self) -> None:
        if not 0 < self.percent_to_apply <= 1:
            raise ConfigError("awq_params.percent_to_apply", f"expected a share in (0, 1], got {self.percent_to_apply!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError("awq_params.steps", f"expected a positive number of steps, got {self.steps!r}")
        if not 0 <= self.alpha_min <= self.alpha_max:
            raise ConfigError("awq_params.alpha_min", f"expected 0 <= alpha_min <= alpha_max, got "
                              f"{self.alpha_min!r} and {self.alpha_max!r}")


def outlier_groups(magnitude: Tensor, group_size: int, percent_to_apply: float) -> list[int]:
    """The groups (of ``group_size`` consecutive input channels) holding one of the
    ``max(floor(in * percent_to_apply), 1)`` channels of largest ``magnitude``, ascending."""
    in_features = magnitude.shape[0]
    top_k = max(int(in_features * percent_to_apply), 1)
    top = torch.argsort(-magnitude, stable=True)[:top_k]
    return sorted({int(j) // group_size for j in top})


def _base(magnitude: Tensor) -> Tensor:
    """NNCF's ``clip(m, quantile_0.1(m), 100)`` of one group, with a positive lower bound."""
    m = magnitude.to(torch.float32)
    low = torch.quantile(m, 0.1)
    low = torch.clamp(low, min=EPS * float(m.max()) if float(m.max()) > 0 else 1.0)
    return m.clamp(min=float(low), max=max(100.0, float(low)))


def awq_scale(weight: Tensor, config: LayerConfig, inputs: LayerInputs,
              params: AWQParameters = AWQParameters()) -> Tensor:
    """The per-input-channel scale ``s [in]`` (float32, positive; 1 outside the searched groups) of
    ``weight [out, in]`` quantized in ``config`` on calibration ``inputs`` (module docstring). The
    layer is then stored as ``Q(weight * s)`` with inputs divided by ``s``."""
    if weight.dim() != 2 or weight.shape[1] != inputs.in_features:
        raise ConfigError("weight", f"expected a 2-D weight with {inputs.in_features} input channels, "
                          f"got shape {tuple(weight.shape)}")
    w = weight.detach().to(torch.float32)
    in_features = w.shape[1]
    g = resolve_group_size(in_features, config.group_size)
    gram = inputs.gram.to(torch.float64)
    w64 = w.to(torch.float64)
    rtn = fake_quantize(w, config.mode, g)
    d = w64 - rtn.to(torch.float64)  # current W - W' with the scales chosen so far
    s = torch.ones(in_features, dtype=torch.float32)
    changed = False
    for k in outlier_groups(inputs.magnitude, g, params.percent_to_apply):
        cols = slice(k * g, (k + 1) * g)
        g_kk = gram[cols, cols]
        # cross terms with the other groups: (d without group k) G[:, K]
        cross = d @ gram[:, cols] - d[:, cols] @ g_kk
        wk = w[:, cols]

        def delta_error(dk: Tensor, g_kk: Tensor = g_kk, cross: Tensor = cross) -> float:
            return float(((dk @ g_kk) * dk).sum() + 2 * (dk * cross).sum())

        best_err, best_s, best_d = delta_error(d[:, cols]), None, None  # s_K = 1: no scaling
        base = _base(inputs.magnitude[cols])
        step = (params.alpha_max - params.alpha_min) / params.steps
        for i in range(params.steps):
            alpha = params.alpha_min + i * step
            sk = base ** alpha
            dk = w64[:, cols] - (fake_quantize(wk * sk, config.mode, None) / sk).to(torch.float64)
            err = delta_error(dk)
            if err < best_err:
                best_err, best_s, best_d = err, sk, dk
        if best_s is not None:
            s[cols] = best_s
            d[:, cols] = best_d
            changed = True
    if not changed:
        return s
    # E(AWQ) - E(RTN), recomputed from scratch on the changed columns C only (a = the change of
    # W - W'): sum_i a_iC G_CC a_iC^T + 2 a_iC G_C: (W - W_rtn)_i^T. Never positive but for rounding.
    changed_cols = s != 1
    a = (w64 - (fake_quantize(w * s, config.mode, g) / s).to(torch.float64)) - (w64 - rtn.to(torch.float64))
    a = a[:, changed_cols]
    g_c = gram[changed_cols]
    change = ((a @ g_c[:, changed_cols]) * a).sum() + 2 * (a * ((w64 - rtn.to(torch.float64)) @ g_c.T)).sum()
    return s if float(change) <= 0 else torch.ones_like(s)
