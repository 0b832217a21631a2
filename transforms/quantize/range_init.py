"""Activation range statistics from calibration data, and the initializer types.

Types (NNCF's names): ``min_max`` (global min / max), ``mean_min_max`` (mean over batches
of each batch's min / max), ``mixed_min_max`` (NNCF's default for configs: per-sample minima and
maxima; the range's top is the mean of the per-sample maxima, its bottom the mean of the
per-sample minima for an asymmetric quantizer and their minimum for a symmetric one), ``threesigma`` (``mean -/+ 3 std`` over all values),
``percentile`` (``min_percentile`` / ``max_percentile`` of all values, in percent) and
``mean_percentile`` (mean over batches of each batch's percentiles).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor

from purecomp.errors import ConfigError

RANGE_TYPES = ("mixed_min_max", "min_max", "mean_min_max", "threesigma", "percentile", "mean_percentile")
SAMPLE_CAP = 1 << 18  # values kept per batch for percentiles (evenly strided subsample)


@dataclasses.dataclass(frozen=True)
class RangeInit:
    """How activation ranges are initialized."""

    type: str = "mean_min_max"
    num_init_samples: int = 256
    min_percentile: float = 0.1
    max_percentile: float = 99.9

    def __post_init__(self) -> None:
        if self.type not in RANGE_TYPES:
            raise ConfigError("initializer.range.type", f"expected one of {list(RANGE_TYPES)}, got {self.type!r}")
        if not 0 <= self.min_percentile < self.max_percentile <= 100:
            raise ConfigError(
                "initializer.range.params",
                f"expected 0 <= min_percentile < max_percentile <= 100, got {self.min_percentile}, {self.max_percentile}",
            )


class TensorStatistics:
    """Accumulates what the initializer types need, one batch at a time: all of them, or only
    ``init.type``'s (the first and second moments for ``threesigma``, a strided sample of the
    values for the percentile types; minima and maxima always)."""

    def __init__(self, init: RangeInit | None = None) -> None:
        self.mins: list[Tensor] = []
        self.maxs: list[Tensor] = []
        self.total: Tensor | float = 0.0  # becomes a float64 tensor on the data's device
        self.total_sq: Tensor | float = 0.0
        self.count = 0
        self.samples: list[Tensor] = []
        self.sample_mins: list[Tensor] = []  # per sample (dim 0 of each batch), for mixed_min_max
        self.sample_maxs: list[Tensor] = []
        kind = None if init is None else init.type
        self._moments = kind in (None, "threesigma")
        self._samples = kind in (None, "percentile", "mean_percentile")

    def observe(self, x: Tensor) -> None:
        x = x.detach()
        if x.numel() == 0:
            return
        x = x if x.dtype == torch.float32 else x.float()
        per_sample = x.reshape(x.shape[0], -1) if x.dim() >= 2 and x[0].numel() else x.reshape(1, -1)
        sample_mins, sample_maxs = per_sample.amin(dim=1), per_sample.amax(dim=1)
        self.sample_mins.append(sample_mins)
        self.sample_maxs.append(sample_maxs)
        self.mins.append(sample_mins.min())
        self.maxs.append(sample_maxs.max())
        self.count += x.numel()
        if self._moments:
            self.total += per_sample.sum(dim=1).double().sum()  # per-row float32 sums, added in float64
            self.total_sq += per_sample.square().sum(dim=1).double().sum()
        if self._samples:
            flat = x.reshape(-1)
            self.samples.append(flat[:: max(1, flat.numel() // SAMPLE_CAP)].clone())

    @property
    def saw_negative(self) -> bool:
        """Signedness rule: an activation quantizer is signed iff calibration saw a negative value."""
        return bool(torch.stack(self.mins).min() < 0) if self.mins else False

    def range(self, init: RangeInit, asymmetric: bool = False) -> tuple[Tensor, Tensor]:
        """``(low, high)``; ``asymmetric`` (the quantizer's mode) matters to ``mixed_min_max`` only."""
        if not self.mins:
            raise ConfigError("initializer.range", "a quantizer saw no values during range initialization")
        if init.type == "mixed_min_max":
            return _mixed_min_max(self, asymmetric)
        return _RANGE_FNS[init.type](self, init)


def _min_max(s: TensorStatistics, init: RangeInit) -> tuple[Tensor, Tensor]:
    return torch.stack(s.mins).min(), torch.stack(s.maxs).max()


def _mean_min_max(s: TensorStatistics, init: RangeInit) -> tuple[Tensor, Tensor]:
    return torch.stack(s.mins).mean(), torch.stack(s.maxs).mean()


def _mixed_min_max(s: TensorStatistics, asymmetric: bool) -> tuple[Tensor, Tensor]:
    mins, maxs = torch.cat(s.sample_mins), torch.cat(s.sample_maxs)
    return (mins.mean() if asymmetric else mins.min()), maxs.mean()


def _three_sigma(s: TensorStatistics, init: RangeInit) -> tuple[Tensor, Tensor]:
    mean = s.total / s.count
    std = (s.total_sq / s.count - mean * mean).clamp(min=0).sqrt()
    return (mean - 3 * std).float(), (mean + 3 * std).float()


def _quantiles(values: Tensor, init: RangeInit) -> tuple[Tensor, Tensor]:
    q = torch.tensor([init.min_percentile / 100, init.max_percentile / 100], dtype=torch.float64,
                     device=values.device)
    lo, hi = torch.quantile(values.double(), q)
    return lo.float(), hi.float()


def _percentile(s: TensorStatistics, init: RangeInit) -> tuple[Tensor, Tensor]:
    values = torch.cat(s.samples)
    limit = 1 << 24  # torch.quantile's input limit
    if values.numel() > limit:
        values = values[:: -(-values.numel() // limit)]
    return _quantiles(values, init)


def _mean_percentile(s: TensorStatistics, init: RangeInit) -> tuple[Tensor, Tensor]:
    pairs = [_quantiles(v, init) for v in s.samples]
    return torch.stack([p[0] for p in pairs]).mean(), torch.stack([p[1] for p in pairs]).mean()


_RANGE_FNS: dict[str, Callable[[TensorStatistics, RangeInit], tuple[Tensor, Tensor]]] = {
    "min_max": _min_max,
    "mean_min_max": _mean_min_max,
    "threesigma": _three_sigma,
    "percentile": _percentile,
    "mean_percentile": _mean_percentile,
}
