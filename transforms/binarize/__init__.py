"""Binarization: XNOR / DoReFa weights, scale-threshold activations, the staged recipe."""

from .binarizer import WEIGHT_MODES, ActivationBinarizer, binarize_weight
from .method import BinarizationState, binarization, binarized_convs
from .staged import Stage, StagedSchedule, apply_to_optimizer

__all__ = [
    "WEIGHT_MODES",
    "ActivationBinarizer",
    "BinarizationState",
    "Stage",
    "StagedSchedule",
    "apply_to_optimizer",
    "binarization",
    "binarize_weight",
    "binarized_convs",
]

from purecomp.registry import register_package  # noqa: E402

from .from_config import binarization_from_config  # noqa: E402

register_package(__name__, {"binarization": binarization_from_config}, (BinarizationState, ActivationBinarizer))
