"""Quantization-aware training: quantizers, placement, range initialization."""

from .grouped import GroupedQuantizer, channel_groups, make_grouped_quantizer
from .grouped_method import grouped_activations
from .method import QuantizationState, QuantizerSettings, quantization
from .placement import (
    ActivationTarget,
    WeightTarget,
    activation_targets,
    weight_targets,
)
from .quantizer import (
    AsymmetricQuantizer,
    LogRangeAsymmetricQuantizer,
    LogScaleSymmetricQuantizer,
    Quantizer,
    SymmetricQuantizer,
    make_quantizer,
)
from .range_init import RANGE_TYPES, RangeInit

__all__ = [
    "RANGE_TYPES",
    "ActivationTarget",
    "AsymmetricQuantizer",
    "GroupedQuantizer",
    "LogRangeAsymmetricQuantizer",
    "LogScaleSymmetricQuantizer",
    "QuantizationState",
    "Quantizer",
    "QuantizerSettings",
    "RangeInit",
    "SymmetricQuantizer",
    "WeightTarget",
    "activation_targets",
    "channel_groups",
    "grouped_activations",
    "make_grouped_quantizer",
    "make_quantizer",
    "quantization",
    "weight_targets",
]

from purecomp.registry import register_package  # noqa: E402

from .from_config import quantization_from_config  # noqa: E402

register_package(__name__, {"quantization": quantization_from_config},
                 (QuantizationState, SymmetricQuantizer, AsymmetricQuantizer, LogScaleSymmetricQuantizer,
                  LogRangeAsymmetricQuantizer, GroupedQuantizer))
