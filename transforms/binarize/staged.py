"""The staged binarization recipe (paper 4.2) as a pure function of the epoch.

Stage 1 trains in float; from ``activations_quant_start_epoch`` activations are binarized;
from ``weights_quant_start_epoch`` weights too; from ``lr_poly_drop_start_epoch`` the
learning rate falls polynomially to zero over ``lr_poly_drop_duration_epochs``; from
``disable_wd_start_epoch`` weight decay is zero. Keys and defaults are NNCF's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from torch.optim import Optimizer

from purecomp.errors import ConfigError

POLY_POWER = 2.1  # exponent of the learning-rate drop


@dataclasses.dataclass(frozen=True)
class Stage:
    """What the schedule asks for at one point of training."""

    activations: bool
    weights: bool
    lr: float
    weight_decay: float


@dataclasses.dataclass(frozen=True)
class StagedSchedule:
    """NNCF's ``params`` of ``"algorithm": "binarization"`` (defaults as NNCF's)."""

    activations_quant_start_epoch: int = 1
    weights_quant_start_epoch: int = 1
    lr_poly_drop_start_epoch: float | None = None
    lr_poly_drop_duration_epochs: float = 30
    disable_wd_start_epoch: float | None = None
    base_lr: float = 1e-3
    base_wd: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("activations_quant_start_epoch", "weights_quant_start_epoch", "base_lr", "base_wd"):
            if getattr(self, name) < 0:
                raise ConfigError(f"params.{name}", f"expected a value >= 0, got {getattr(self, name)!r}")
        if self.lr_poly_drop_duration_epochs <= 0:
            raise ConfigError(
                "params.lr_poly_drop_duration_epochs",
                f"expected a value > 0, got {self.lr_poly_drop_duration_epochs!r}",
            )

    @classmethod
    def from_params(cls, params: Mapping[str, Any], origin: str = "") -> StagedSchedule:
        known = {f.name for f in dataclasses.fields(cls)}
        for key in params:
            if key not in known:
                raise ConfigError(f"{origin}params.{key}", f"unknown key; expected one of {sorted(known)}")
        try:
            return cls(**dict(params))
        except ConfigError as exc:
            raise ConfigError(f"{origin}{exc.path}", str(exc).split(": ", 1)[-1]) from None

    def lr(self, epoch: float) -> float:
        """``base_lr`` before the drop; ``base_lr * ((end - e) / duration) ** 2.1`` during it
        (``end = start + duration``); ``0`` after it."""
        start = self.lr_poly_drop_start_epoch
        if start is None or epoch < start:
            return self.base_lr
        end = start + self.lr_poly_drop_duration_epochs
        if epoch >= end:
            return 0.0
        return self.base_lr * ((end - epoch) / self.lr_poly_drop_duration_epochs) ** POLY_POWER

    def weight_decay(self, epoch: float) -> float:
        """``base_wd``, or ``0`` from ``disable_wd_start_epoch`` on."""
        off = self.disable_wd_start_epoch is not None and epoch >= self.disable_wd_start_epoch
        return 0.0 if off else self.base_wd

    def stage(self, epoch: float) -> Stage:
        """The stage at (fractional) ``epoch``; binarization switches on at whole epochs."""
        return Stage(
            activations=epoch >= self.activations_quant_start_epoch,
            weights=epoch >= self.weights_quant_start_epoch,
            lr=self.lr(epoch),
            weight_decay=self.weight_decay(epoch),
        )


def apply_to_optimizer(optimizer: Optimizer, stage: Stage) -> None:
    """Set ``lr`` and ``weight_decay`` of every param group of ``optimizer`` to the stage's."""
    for group in optimizer.param_groups:
        group["lr"] = stage.lr
        group["weight_decay"] = stage.weight_decay
