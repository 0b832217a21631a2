"""Build ``quantization(...)`` from a validated ``"algorithm": "quantization"`` config section."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from purecomp.compression import Compression
from purecomp.errors import ConfigError

from .method import quantization
from .range_init import RangeInit


def range_init_from_config(section: Mapping[str, Any], origin: str) -> RangeInit:
    rng = section.get("initializer", {}).get("range", {})
    params = rng.get("params", {})
    try:
        return RangeInit(
            type=rng.get("type", RangeInit.type),
            num_init_samples=rng.get("num_init_samples", RangeInit.num_init_samples),
            min_percentile=params.get("min_percentile", RangeInit.min_percentile),
            max_percentile=params.get("max_percentile", RangeInit.max_percentile),
        )
    except ConfigError as exc:
        raise ConfigError(f"{origin}{exc.path}", str(exc).split(": ", 1)[-1]) from None


def quantization_from_config(section: Mapping[str, Any], origin: str, context: Any = None) -> Compression:
    """``context`` (``purecomp.config.BuildContext``) carries the target device, loss and data
    that ``initializer.precision`` of ``type: hawq`` needs."""
    from purecomp.transforms.mixed_precision.from_config import precision_from_config

    spec = section.get("initializer", {}).get("precision")
    precision = precision_from_config(spec, f"{origin}initializer.precision.", context)
    return quantization(
        weights=section.get("weights"),
        activations=section.get("activations"),
        ignored_scopes=section.get("ignored_scopes", ()),
        target_scopes=section.get("target_scopes"),
        range_init=range_init_from_config(section, origin),
        quantize_inputs=section.get("quantize_inputs", True),
        quantize_outputs=section.get("quantize_outputs", False),
        precision=precision,
        origin=origin,
    )
