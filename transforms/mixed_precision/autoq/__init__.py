"""AutoQ: a DDPG agent searches per-layer bit widths against the user's metric (HAQ-style)."""

from .ddpg import DDPG, DDPGConfig, ReplayBuffer, soft_update
from .env import ModelEnvironment, eval_subset
from .exploration import explore, noise_scale, truncated_normal
from .features import FEATURES, normalize, raw_features, unit_features
from .method import AutoQ, autoq, autoq_precision, precision_report
from .options import AutoQOptions, autoq_options
from .policy import action_to_bits, bits_to_action, meet_ratio, reachable, size_ratio
from .report import AutoQReport, Episode
from .search import Environment, run_search

__all__ = [
    "DDPG",
    "FEATURES",
    "AutoQ",
    "AutoQOptions",
    "AutoQReport",
    "DDPGConfig",
    "Environment",
    "Episode",
    "ModelEnvironment",
    "ReplayBuffer",
    "action_to_bits",
    "autoq",
    "autoq_options",
    "autoq_precision",
    "bits_to_action",
    "eval_subset",
    "explore",
    "meet_ratio",
    "noise_scale",
    "precision_report",
    "normalize",
    "raw_features",
    "reachable",
    "run_search",
    "size_ratio",
    "soft_update",
    "truncated_normal",
    "unit_features",
]
