"""What the data-aware algorithms know about a linear layer's calibration inputs.

For a linear ``y = x W^T`` (``W [out, in]``) seen on ``n`` calibration tokens ``x_t [in]``, the
data-aware algorithms (AWQ, scale estimation, GPTQ) need only two statistics of the inputs:

- the second-moment (Gram) matrix ``G = (1/n) sum_t x_t x_t^T`` (``[in, in]``); GPTQ's Hessian
  is ``H = 2 G``;
- the mean magnitude of every input channel, ``m_j = (1/n) sum_t |x_tj|`` (``[in]``), which ranks
  the channels (AWQ's outlier channels and scale base, scale estimation's importance).

Both are sums over tokens, so they are accumulated while the data streams through the model
(``InputAccumulator``, float32 like GPTQ's own Hessian; linears reading one tensor, such as q, k
and v, share one): the memory per layer is ``in^2 + in`` numbers whatever the number of tokens,
and no activation is kept. The algorithms compute in float64 from it. With them the layer objective every algorithm minimises, the
mean squared error of the layer's outputs on the calibration tokens for a replacement ``W'``,

    E(W') = (1/n) sum_t ||(W - W') x_t||^2 = sum_i d_i G d_i^T,      d_i = row i of W - W',

is exact (``LayerInputs.row_errors``; it splits into independent rows). NNCF instead keeps, per
calibration sample, the token MEAN of the input (``WCTensorStatistic.mean_values``) and a
subsample of those vectors (``activation_stats.process_stats``), which measures the error of the
token-averaged output only; purecomp's objective is the error of every token's output.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from purecomp.errors import CalibrationError, ConfigError


@dataclasses.dataclass(frozen=True)
class LayerInputs:
    """The calibration statistics of one linear's inputs (module docstring): ``gram`` ``G [in, in]``
    and ``magnitude`` ``m [in]`` (float32 or float64), over ``tokens`` tokens."""

    gram: Tensor
    magnitude: Tensor
    tokens: int

    def __post_init__(self) -> None:
        n = self.magnitude.shape[-1] if self.magnitude.dim() == 1 else -1
        if self.gram.dim() != 2 or tuple(self.gram.shape) != (n, n):
            raise ConfigError("inputs", f"expected gram [in, in] and magnitude [in], got {tuple(self.gram.shape)} "
                              f"and {tuple(self.magnitude.shape)}")

    @property
    def in_features(self) -> int:
        return int(self.magnitude.shape[0])

    @classmethod
    def from_samples(cls, *samples: Tensor) -> LayerInputs:
        """The statistics of input tensors ``[..., in]`` (every leading index is a token)."""
        acc = InputAccumulator()
        for x in samples:
            acc.add(x)
        return acc.result()

    def scaled(self, s: Tensor) -> LayerInputs:
        """The statistics of the inputs ``x / s`` (``s [in]``, positive): ``G / (s s^T)``, ``m / s``."""
        inv = 1.0 / s.to(self.gram.dtype)
        return LayerInputs(self.gram * inv[:, None] * inv[None, :], self.magnitude * inv.to(self.magnitude.dtype),
                           self.tokens)

    def columns(self, index: Tensor | slice) -> LayerInputs:
        """The statistics of the input channels ``index`` alone (a block of ``G``)."""
        return LayerInputs(self.gram[index][:, index], self.magnitude[index], self.tokens)

    def row_errors(self, weight: Tensor, approx: Tensor) -> Tensor:
        """``[out]``: ``d_i G d_i^T`` for each row ``d_i`` of ``weight - approx``, float64."""
        d = weight.to(torch.float64) - approx.to(torch.float64)
        return ((d @ self.gram.to(torch.float64)) * d).sum(dim=-1)

    def output_error(self, weight: Tensor, approx: Tensor) -> float:
        """``E(W')``: the mean over tokens of the squared output error (module docstring)."""
        return float(self.row_errors(weight, approx).sum())


class InputAccumulator:
    """Streaming sums of ``x x^T`` (float32, one in-place matrix product per call) and ``|x|``
    (float64) over the tokens of the inputs given to ``add``."""

    def __init__(self) -> None:
        self._gram: Tensor | None = None
        self._abs: Tensor | None = None
        self.tokens = 0

    def add(self, x: Tensor, where: str = "") -> None:
        if x.dim() < 1 or not x.is_floating_point():
            raise CalibrationError(f"{where or 'a layer'}: expected floating-point inputs [..., in], "
                                   f"got {x.dtype} of shape {tuple(x.shape)}")
        rows = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
        if self._gram is None:
            self._gram = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float32, device=rows.device)
            self._abs = torch.zeros(rows.shape[1], dtype=torch.float64, device=rows.device)
        elif rows.shape[1] != self._gram.shape[0]:
            raise CalibrationError(f"{where or 'a layer'}: inputs with {rows.shape[1]} channels after "
                                   f"{self._gram.shape[0]}")
        self._gram.addmm_(rows.T, rows)
        self._abs += rows.abs().sum(dim=0).to(torch.float64)
        self.tokens += rows.shape[0]

    def result(self) -> LayerInputs:
        if self._gram is None or self.tokens == 0:
            raise CalibrationError("the layer received no calibration input")
        assert self._abs is not None
        return LayerInputs(self._gram / self.tokens, self._abs / self.tokens, self.tokens)
