"""purecomp: neural-network compression for PyTorch as pure transforms."""

from . import errors
from .apply import apply, compile_apply
from .batchnorm import adapt_batchnorm
from .compression import Compression, Progress, chain, identity
from .config import CompressionConfig, from_config, load_config
from .graph import ModelGraph, OpNode, TensorRef, trace
from .stats import statistics, trainable
from .transforms.quantize import QuantizationState, QuantizerSettings, RangeInit, quantization

__all__ = [
    "Compression",
    "CompressionConfig",
    "ModelGraph",
    "OpNode",
    "Progress",
    "QuantizationState",
    "QuantizerSettings",
    "RangeInit",
    "TensorRef",
    "adapt_batchnorm",
    "apply",
    "compile_apply",
    "chain",
    "errors",
    "from_config",
    "identity",
    "load_config",
    "quantization",
    "statistics",
    "trace",
    "trainable",
]
