"""purecomp: neural-network compression for PyTorch as pure transforms."""

from . import errors, export, protocol, schedules
from .api import (
    CompressionController,
    CompressionStage,
    Config,
    create_compressed_model,
    register_default_init_args,
)
from .apply import apply, compile_apply
from .batchnorm import adapt_batchnorm
from .checkpoint import load_state, save_state
from .compression import Compression, Progress, chain, identity, with_training
from .config import CompressionConfig, from_config, load_config
from .graph import ModelGraph, OpNode, TensorRef, trace
from .init_context import InitContext
from .registry import register_algorithm
from .scoped import scoped
from .stats import model_cost, pruning_cost, statistics, trainable

# the built-in methods: each package registers its config section and state classes on import
from .transforms.binarize import StagedSchedule, apply_to_optimizer, binarization  # noqa: I001
from .transforms.prune import filter_pruning
from .transforms.ptq import (
    AdvancedQuantizationParameters,
    Dataset,
    IgnoredScope,
    export_quantized,
    quantize,
    quantize_with_accuracy_control,
    sensitivity,
    strip,
)
from .transforms.quantize import QuantizationState, QuantizerSettings, RangeInit, quantization
from .transforms.smooth_quant import smooth_quant
from .transforms.sparsity import const_sparsity, magnitude_sparsity, rb_sparsity
from .transforms.weight_compression import (
    AdvancedCompressionParameters,
    BackupMode,
    CompressedEmbedding,
    CompressedLinear,
    CompressWeightsMode,
    SensitivityMetric,
    compress_weights,
    export_compressed,
    weight_compression,
)

__all__ = [
    "AdvancedCompressionParameters",
    "BackupMode",
    "CompressedEmbedding",
    "CompressedLinear",
    "CompressWeightsMode",
    "SensitivityMetric",
    "compress_weights",
    "export_compressed",
    "weight_compression",
    "AdvancedQuantizationParameters",
    "Dataset",
    "IgnoredScope",
    "export_quantized",
    "quantize",
    "quantize_with_accuracy_control",
    "sensitivity",
    "strip",
    "CompressionController",
    "CompressionStage",
    "Config",
    "create_compressed_model",
    "load_state",
    "register_default_init_args",
    "save_state",
    "Compression",
    "InitContext",
    "register_algorithm",
    "CompressionConfig",
    "ModelGraph",
    "OpNode",
    "Progress",
    "QuantizationState",
    "QuantizerSettings",
    "RangeInit",
    "TensorRef",
    "StagedSchedule",
    "adapt_batchnorm",
    "apply",
    "apply_to_optimizer",
    "binarization",
    "compile_apply",
    "chain",
    "const_sparsity",
    "errors",
    "protocol",
    "filter_pruning",
    "export",
    "from_config",
    "identity",
    "load_config",
    "magnitude_sparsity",
    "smooth_quant",
    "model_cost",
    "pruning_cost",
    "quantization",
    "rb_sparsity",
    "schedules",
    "scoped",
    "statistics",
    "trace",
    "trainable",
    "with_training",
]
