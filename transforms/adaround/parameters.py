"""AdaRound's options (AIMET's ``AdaroundParameters`` names, without their ``default_`` prefix)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from purecomp.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class AdaRoundParameters:
    """``num_iterations`` Adam steps per layer (``learning_rate``) on random batches of
    ``batch_size`` calibration samples; loss = reconstruction + ``reg_param`` x ``f_reg`` with
    ``beta`` annealed over ``beta_range`` after the first ``warm_start`` share of the steps (no
    regularizer before it). ``sequential``: each layer's input is the quantized model's, its
    earlier layers already rounded (otherwise the float model's input through the layer's own
    input quantizers). ``num_samples``: calibration samples (``None``: all that the caller has).
    ``seed`` fixes the batch order."""

    num_iterations: int = 1000
    reg_param: float = 0.01
    beta_range: tuple[float, float] = (20.0, 2.0)
    warm_start: float = 0.2
    learning_rate: float = 1e-2
    batch_size: int = 32
    sequential: bool = True
    num_samples: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        def positive_int(name: str, value: Any) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"adaround.{name}", f"expected a positive integer, got {value!r}")

        positive_int("num_iterations", self.num_iterations)
        positive_int("batch_size", self.batch_size)
        if self.num_samples is not None:
            positive_int("num_samples", self.num_samples)
        if not (isinstance(self.reg_param, (int, float)) and not isinstance(self.reg_param, bool)
                and self.reg_param >= 0):
            raise ConfigError("adaround.reg_param", f"expected a number >= 0, got {self.reg_param!r}")
        if not (isinstance(self.learning_rate, (int, float)) and self.learning_rate > 0):
            raise ConfigError("adaround.learning_rate", f"expected a number > 0, got {self.learning_rate!r}")
        if not 0 <= self.warm_start < 1:
            raise ConfigError("adaround.warm_start", f"expected a share in [0, 1), got {self.warm_start!r}")
        beta = tuple(self.beta_range)
        if len(beta) != 2 or not all(isinstance(b, (int, float)) and b > 0 for b in beta) or beta[0] < beta[1]:
            raise ConfigError("adaround.beta_range", f"expected (start, end) with start >= end > 0, got {self.beta_range!r}")
        object.__setattr__(self, "beta_range", (float(beta[0]), float(beta[1])))

    @classmethod
    def of(cls, value: Any) -> AdaRoundParameters:
        """``None`` or ``True``: the defaults; an instance passes; a dict is checked key by key."""
        if value is None or value is True:
            return cls()
        if isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError("adaround", f"expected True, AdaRoundParameters or a dict, got {value!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        for key in value:
            if key not in known:
                raise ConfigError(f"adaround.{key}", f"unknown key; expected one of {sorted(known)}")
        return cls(**dict(value))
