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

    path: str = dataclasses.field(default="adaround", repr=False, compare=False)

    def __post_init__(self) -> None:
        path = self.path

        def number(value: Any) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool)

        def positive_int(name: str, value: Any) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{path}.{name}", f"expected a positive integer, got {value!r}")

        positive_int("num_iterations", self.num_iterations)
        positive_int("batch_size", self.batch_size)
        if self.num_samples is not None:
            positive_int("num_samples", self.num_samples)
        if not (number(self.reg_param) and self.reg_param >= 0):
            raise ConfigError(f"{path}.reg_param", f"expected a number >= 0, got {self.reg_param!r}")
        if not (number(self.learning_rate) and self.learning_rate > 0):
            raise ConfigError(f"{path}.learning_rate", f"expected a number > 0, got {self.learning_rate!r}")
        if not (number(self.warm_start) and 0 <= self.warm_start < 1):
            raise ConfigError(f"{path}.warm_start", f"expected a share in [0, 1), got {self.warm_start!r}")
        if not isinstance(self.sequential, bool):
            raise ConfigError(f"{path}.sequential", f"expected True or False, got {self.sequential!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"{path}.seed", f"expected an integer, got {self.seed!r}")
        beta = tuple(self.beta_range)
        if len(beta) != 2 or not all(number(b) and b > 0 for b in beta) or beta[0] < beta[1]:
            raise ConfigError(f"{path}.beta_range", f"expected (start, end) with start >= end > 0, got {self.beta_range!r}")
        object.__setattr__(self, "beta_range", (float(beta[0]), float(beta[1])))

    @classmethod
    def of(cls, value: Any, path: str = "adaround") -> AdaRoundParameters:
        """``None`` or ``True``: the defaults; an instance passes; a dict is checked key by key
        (errors named ``<path>.<key>``)."""
        if value is None or value is True:
            return cls(path=path)
        if isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(path, f"expected True, AdaRoundParameters or a dict, got {value!r}")
        known = {f.name for f in dataclasses.fields(cls)} - {"path"}
        for key in value:
            if key not in known:
                raise ConfigError(f"{path}.{key}", f"unknown key; expected one of {sorted(known)}")
        return cls(**dict(value), path=path)
