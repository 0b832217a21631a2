"""AutoQ: a DDPG agent searches per-layer bit widths against the user's metric (HAQ-style)."""

from .ddpg import DDPG, DDPGConfig, ReplayBuffer, soft_update
from .exploration import explore, noise_scale, truncated_normal
from .features import FEATURES, normalize, raw_features, unit_features
from .options import AutoQOptions, autoq_options
from .policy import action_to_bits, bits_to_action, meet_ratio, reachable, size_ratio
from .report import AutoQReport, Episode
from .search import Environment, run_search

__all__ = [
    "DDPG",
    "FEATURES",
    "AutoQOptions",
    "AutoQReport",
    "DDPGConfig",
    "Environment",
    "Episode",
    "ReplayBuffer",
    "action_to_bits",
    "autoq_options",
    "bits_to_action",
    "explore",
    "meet_ratio",
    "noise_scale",
    "normalize",
    "raw_features",
    "reachable",
    "run_search",
    "size_ratio",
    "soft_update",
    "truncated_normal",
    "unit_features",
]
