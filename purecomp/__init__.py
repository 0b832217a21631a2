"""purecomp: neural-network compression for PyTorch as pure transforms."""

from . import errors
from .apply import apply
from .compression import Compression, Progress, chain, identity
from .graph import ModelGraph, OpNode, TensorRef, trace
from .stats import statistics, trainable
from .transforms.quantize import RangeInit, quantization

__all__ = [
    "Compression",
    "ModelGraph",
    "OpNode",
    "Progress",
    "RangeInit",
    "TensorRef",
    "apply",
    "chain",
    "errors",
    "identity",
    "quantization",
    "statistics",
    "trace",
    "trainable",
]
