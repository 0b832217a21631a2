"""AutoQ settings: the config keys of ``initializer.precision`` with ``type: autoq`` and the agent's."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from purecomp.errors import ConfigError

from .ddpg import DDPGConfig

CONFIG_KEYS = ("bits", "iter_number", "compression_ratio", "eval_subset_ratio", "warmup_iter_number",
               "bitwidth_assignment_mode", "seed")


@dataclasses.dataclass(frozen=True)
class AutoQOptions:
    """``iter_number`` episodes, the first ``warmup_iter_number`` with random actions; the policy is
    brought to ``compression_ratio`` (weight size relative to FP32, uniform INT8 = 0.25);
    ``eval_subset_ratio`` of the evaluation data feeds ``eval_fn``. ``sigma0``: initial exploration
    noise; ``updates_per_episode`` (``None``: one per unit) DDPG updates follow each episode."""

    bits: Sequence[int] | None = None
    target_device: str = "ANY"
    bitwidth_assignment_mode: str = "strict"
    compression_ratio: float = 0.15
    iter_number: int = 300
    warmup_iter_number: int = 20
    eval_subset_ratio: float = 1.0
    seed: int = 0
    sigma0: float = 0.5
    updates_per_episode: int | None = None
    ddpg: DDPGConfig = DDPGConfig()

    def check(self, path: str = "") -> None:
        """``ConfigError`` naming ``{path}<key>`` for a value out of range."""
        if self.iter_number < 1:
            raise ConfigError(f"{path}iter_number", f"expected at least 1 episode, got {self.iter_number}")
        if not 0 <= self.warmup_iter_number < self.iter_number:
            raise ConfigError(f"{path}warmup_iter_number",
                              f"expected 0 <= warmup_iter_number < iter_number ({self.iter_number}), "
                              f"got {self.warmup_iter_number}")
        if not 0 < self.eval_subset_ratio <= 1:
            raise ConfigError(f"{path}eval_subset_ratio", f"expected a number in (0, 1], got {self.eval_subset_ratio}")
        if not 0 < self.compression_ratio:
            raise ConfigError(f"{path}compression_ratio", f"expected a positive number, got {self.compression_ratio}")
        if self.sigma0 < 0:
            raise ConfigError(f"{path}sigma0", f"expected a non-negative noise scale, got {self.sigma0}")


def autoq_options(options: Mapping[str, Any], path: str = "") -> AutoQOptions:
    """``AutoQOptions`` from keyword options; an unknown key is a ``ConfigError`` naming it."""
    known = {f.name for f in dataclasses.fields(AutoQOptions)}
    for key in options:
        if key not in known:
            raise ConfigError(f"{path}{key}", f"unknown AutoQ option; expected one of {sorted(known)}")
    out = AutoQOptions(**options)
    out.check(path)
    return out
