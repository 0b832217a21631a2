"""AdaRound (adaptive rounding) for post-training quantization: each conv / linear weight is
rounded up or down, as learned from calibration data, to reconstruct the layer's output
(``rounding`` has the formulas). ``adaround_weights`` is the weight transform; ``purecomp.quantize``
runs it with ``advanced_parameters={"adaround": True}``."""

from .layer import LayerResult, adaround_layer, reconstruction_error
from .parameters import AdaRoundParameters
from .rounding import (
    beta_at,
    hard_weight,
    initial_variables,
    rectified_sigmoid,
    rounding_regularizer,
    soft_weight,
)
from .sequential import AdaRoundLayerReport, AdaRoundReport, adaround_weights, rounding_layers

__all__ = [
    "AdaRoundLayerReport",
    "AdaRoundParameters",
    "AdaRoundReport",
    "LayerResult",
    "adaround_layer",
    "adaround_weights",
    "beta_at",
    "hard_weight",
    "initial_variables",
    "reconstruction_error",
    "rectified_sigmoid",
    "rounding_layers",
    "rounding_regularizer",
    "soft_weight",
]
