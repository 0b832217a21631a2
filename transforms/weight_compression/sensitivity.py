"""Layer sensitivity for mixed precision: which layers may go to 4 bits (NNCF 3.x's criteria).

Layers are ranked by a score; the LEAST sensitive (lowest score) go to the primary (4-bit)
precision first (``precision.select_primary``). With ``e8`` the error of the 8-bit backup
(``int8_asym`` per output channel, ``grid.quantization_error``) and ``eps`` float32's machine
epsilon (``mixed_precision.py`` of NNCF v3.1.0):

- ``weight_quantization_error`` (data-free): ``1 / (max_mean(e8) + eps)``: weights that 8 bits
  represent well stay in 8 bits, the others are the ones for which 4-bit GROUPS help most.
- ``max_activation_variance`` (NNCF's default with a dataset): ``1 / (max_mean(e8) + eps)``
  times the mean over calibration inputs ``x`` of ``max_c var_t(x)`` (the variance over the
  token axis ``-2``, population variance, then the largest over channels and batch);
- ``mean_activation_variance``: the same with the mean over channels instead of the max;
- ``mean_activation_magnitude``: ``1 / (max_mean(e8) + eps)`` times the mean over inputs of
  ``mean_c max_t |x|``;
- ``hessian_input_activation`` (HAWQ-style): ``||W'_8 - W||_F`` times ``h``, where NNCF's
  ``HAWQAggregator`` folds the inputs as ``h_k = (h_{k-1} + sum(x_k^2)) / numel(x_k)`` (``h_0 =
  0``) and reports ``h = 2 h_K / K``. That recursion divides the running value at every step
  (NNCF's own comment doubts it); it is reproduced as written, since it defines the ranking.

Data-aware scores of embeddings are 0 (NNCF: no activation statistic; they go to 4 bits first
when ``all_layers`` makes them ratio-defining). At most ``num_samples`` inputs are folded per layer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from purecomp.errors import CalibrationError

from .grid import EPS, quantization_error

WEIGHT_QUANTIZATION_ERROR = "weight_quantization_error"
HESSIAN_INPUT_ACTIVATION = "hessian_input_activation"
MEAN_ACTIVATION_VARIANCE = "mean_activation_variance"
MAX_ACTIVATION_VARIANCE = "max_activation_variance"
MEAN_ACTIVATION_MAGNITUDE = "mean_activation_magnitude"
METRICS = (WEIGHT_QUANTIZATION_ERROR, HESSIAN_INPUT_ACTIVATION, MEAN_ACTIVATION_VARIANCE,
           MAX_ACTIVATION_VARIANCE, MEAN_ACTIVATION_MAGNITUDE)
DATA_AWARE = METRICS[1:]
BACKUP_FOR_SCORES = "int8_asym"  # NNCF scores every layer with WeightCompressionConfig() (int8_asym, per channel)


class ActivationStatistic:
    """The folded input statistic of one layer for a data-aware ``metric`` (module docstring)."""

    def __init__(self, metric: str, num_samples: int | None = None) -> None:
        if metric not in DATA_AWARE:
            raise ValueError(f"{metric!r} needs no activation statistic")
        self.metric = metric
        self.num_samples = num_samples
        self.count = 0
        self.value = 0.0

    def add(self, x: Tensor, where: str = "") -> None:
        """Fold one input tensor of the layer (any shape with at least 2 dimensions)."""
        if self.num_samples is not None and self.count >= self.num_samples:
            return
        if x.dim() < 2:
            raise CalibrationError(f"data-aware sensitivity ({self.metric}) needs layer inputs with a token axis "
                                   f"(at least 2 dimensions); {where or 'a layer'} got shape {tuple(x.shape)}")
        x = x.detach().to(torch.float64)
        if self.metric == HESSIAN_INPUT_ACTIVATION:
            self.value = (self.value + float((x * x).sum())) / x.numel()
        elif self.metric == MEAN_ACTIVATION_MAGNITUDE:
            self.value += float(x.abs().amax(dim=-2).mean())
        else:
            var = x.var(dim=-2, correction=0)
            self.value += float(var.max() if self.metric == MAX_ACTIVATION_VARIANCE else var.mean())
        self.count += 1

    def result(self) -> float:
        if self.count == 0:
            raise CalibrationError(f"{self.metric}: the layer received no calibration input")
        if self.metric == HESSIAN_INPUT_ACTIVATION:
            return self.value * 2 / self.count
        return self.value / self.count


def weight_score(metric: str, weight: Tensor) -> float:
    """The weight part of a score: ``||W'_8 - W||_F`` for ``hessian_input_activation``, else
    ``1 / (max_mean(W'_8 - W)^2 + eps)`` (module docstring)."""
    if metric == HESSIAN_INPUT_ACTIVATION:
        return quantization_error(weight, BACKUP_FOR_SCORES, None, reduction="frobenius")
    return 1.0 / (quantization_error(weight, BACKUP_FOR_SCORES, None, reduction="max_mean") + EPS)


def layer_score(metric: str, weight: Tensor, kind: str, activation: float | None = None) -> float:
    """The score of one layer: data-free ``weight_score``; data-aware ``weight_score *
    activation`` for linears and 0 for embeddings."""
    if metric == WEIGHT_QUANTIZATION_ERROR:
        return weight_score(metric, weight)
    if kind == "embedding":
        return 0.0
    if activation is None:
        raise CalibrationError(f"{metric} needs the layer's activation statistic")
    return weight_score(metric, weight) * activation
