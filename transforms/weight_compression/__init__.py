"""Weight-only compression of linears and embeddings (NNCF 3.x's ``compress_weights``): INT8 /
INT4 / NF4 grids with groups along the input dimension, mixed precision by layer sensitivity,
the data-aware algorithms (AWQ, scale estimation, GPTQ), packed storage that dequantizes in
``forward``, and the ``weight_compression`` method."""

from purecomp.distillation import kl_distillation_loss

from .api import (
    compress_weights,
    dequantized_weights,
    install,
    load_compressed_state_dict,
    state_from_model,
)
from .awq import AWQParameters, awq_scale
from .compressor import LayerAlgorithm, LayerInputs, LayerResult, data_aware, round_to_nearest
from .export_onnx import export_compressed, generate_greedy
from .fq_lora import LoRAQuantizedLinear, add_lora_adapters, lora_parameters, strip_lora
from .gptq import GPTQParameters
from .grid import (
    MODES,
    NF4_LEVELS,
    ModeSpec,
    Quantized,
    dequantize,
    fake_quantize,
    quantization_error,
    quantize,
)
from .method import weight_compression
from .modules import CompressedEmbedding, CompressedLinear
from .packing import pack_int4, unpack_int4
from .parameters import (
    AdvancedCompressionParameters,
    BackupMode,
    CompressWeightsMode,
    SensitivityMetric,
)
from .precision import Layer, LayerConfig, Plan
from .scale_estimation import ScaleEstimationParameters, estimate_scales
from .state import PackedWeight, WeightCompressionState

__all__ = [
    "AWQParameters",
    "AdvancedCompressionParameters",
    "BackupMode",
    "CompressWeightsMode",
    "CompressedEmbedding",
    "CompressedLinear",
    "GPTQParameters",
    "LoRAQuantizedLinear",
    "add_lora_adapters",
    "kl_distillation_loss",
    "lora_parameters",
    "strip_lora",
    "Layer",
    "LayerAlgorithm",
    "LayerConfig",
    "LayerInputs",
    "LayerResult",
    "MODES",
    "ModeSpec",
    "NF4_LEVELS",
    "PackedWeight",
    "Plan",
    "Quantized",
    "ScaleEstimationParameters",
    "SensitivityMetric",
    "WeightCompressionState",
    "awq_scale",
    "compress_weights",
    "data_aware",
    "dequantize",
    "export_compressed",
    "dequantized_weights",
    "estimate_scales",
    "fake_quantize",
    "generate_greedy",
    "install",
    "load_compressed_state_dict",
    "pack_int4",
    "quantization_error",
    "quantize",
    "round_to_nearest",
    "state_from_model",
    "unpack_int4",
    "weight_compression",
]

from purecomp.commands import register_command  # noqa: E402

from . import cli  # noqa: E402
from .saving import load_compressed, save_compressed  # noqa: E402, F401

register_command("compress-weights", "weight-only compression of a HuggingFace causal LM (INT8 / INT4 / NF4)",
                 cli.add_arguments, cli.run)
