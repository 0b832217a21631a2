"""Build ``binarization(...)`` from a validated ``"algorithm": "binarization"`` config section."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from purecomp.compression import Compression
from purecomp.errors import warn_no_effect
from purecomp.scoped import section_scoped

from .method import binarization
from .staged import StagedSchedule

DEFAULT_INIT_SAMPLES = 256


def binarization_from_config(section: Mapping[str, Any], origin: str) -> Compression:
    init = section.get("initializer", {}).get("range", {})
    params = dict(section.get("params", {}))
    if "batch_multiplier" in params:
        params.pop("batch_multiplier")
        warn_no_effect(f"{origin}params.batch_multiplier", "gradient accumulation belongs to the training loop "
                       "(NNCF's sample reads it); accumulate gradients in your own loop")
    schedule = StagedSchedule.from_params(params, origin)
    return section_scoped(section, lambda ignored, target: binarization(
        section.get("mode", "xnor"),
        schedule=schedule,
        ignored_scopes=ignored,
        target_scopes=target,
        num_init_samples=init.get("num_init_samples", DEFAULT_INIT_SAMPLES),
        origin=origin,
    ))
