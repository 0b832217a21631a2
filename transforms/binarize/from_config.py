"""Build ``binarization(...)`` from a validated ``"algorithm": "binarization"`` config section."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from purecomp.compression import Compression

from .method import binarization
from .staged import StagedSchedule

DEFAULT_INIT_SAMPLES = 256


def binarization_from_config(section: Mapping[str, Any], origin: str) -> Compression:
    init = section.get("initializer", {}).get("range", {})
    return binarization(
        section.get("mode", "xnor"),
        schedule=StagedSchedule.from_params(section.get("params", {}), origin),
        ignored_scopes=section.get("ignored_scopes", ()),
        target_scopes=section.get("target_scopes"),
        num_init_samples=init.get("num_init_samples", DEFAULT_INIT_SAMPLES),
        origin=origin,
    )
