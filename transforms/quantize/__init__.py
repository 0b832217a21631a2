"""Quantization-aware training: quantizers, placement, range initialization."""

from .method import QuantizationState, QuantizerSettings, quantization
from .placement import (
    ActivationTarget,
    WeightTarget,
    activation_targets,
    select_sites,
    weight_targets,
)
from .quantizer import AsymmetricQuantizer, Quantizer, SymmetricQuantizer, make_quantizer
from .range_init import RANGE_TYPES, RangeInit

__all__ = [
    "RANGE_TYPES",
    "ActivationTarget",
    "AsymmetricQuantizer",
    "QuantizationState",
    "Quantizer",
    "QuantizerSettings",
    "RangeInit",
    "SymmetricQuantizer",
    "WeightTarget",
    "activation_targets",
    "make_quantizer",
    "quantization",
    "select_sites",
    "weight_targets",
]
