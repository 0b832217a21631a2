"""Post-training quantization: ``quantize`` in one call, its dataset and options, and the
algorithms it runs (BatchNorm folding, cross-layer equalization, bias correction, MSE ranges,
one step around residual adds, short activation steps, int32 biases), each usable on its own."""

from .accuracy_control import (
    AccuracyControlReport,
    AdvancedAccuracyRestorerParameters,
    quantize_with_accuracy_control,
    rank_layers,
)
from .activation_steps import short_steps, with_short_activation_steps
from .bias_correction import bias_correction, correctable_layers
from .dataset import Dataset
from .equalization import (
    ChannelClip,
    EqualizationPair,
    absorb_high_biases,
    cross_layer_equalization,
    equalization_pairs,
)
from .int32_bias import biases_on_int32_grid, int32_bias_steps
from .parameters import AdvancedQuantizationParameters, IgnoredScope
from .pipeline import calibration_batches, export_quantized, quantize, strip
from .ranges import mse_activation_quantizers, mse_quantizer, mse_weight_quantizers
from .residual_scales import residual_groups, unify_residual_scales
from .sensitivity import SensitivityReport, sensitivity, sqnr

__all__ = [
    "AccuracyControlReport",
    "AdvancedAccuracyRestorerParameters",
    "quantize_with_accuracy_control",
    "rank_layers",
    "AdvancedQuantizationParameters",
    "ChannelClip",
    "Dataset",
    "EqualizationPair",
    "IgnoredScope",
    "absorb_high_biases",
    "bias_correction",
    "biases_on_int32_grid",
    "calibration_batches",
    "correctable_layers",
    "cross_layer_equalization",
    "equalization_pairs",
    "export_quantized",
    "int32_bias_steps",
    "mse_activation_quantizers",
    "mse_quantizer",
    "mse_weight_quantizers",
    "quantize",
    "residual_groups",
    "SensitivityReport",
    "sensitivity",
    "short_steps",
    "sqnr",
    "strip",
    "unify_residual_scales",
    "with_short_activation_steps",
]
