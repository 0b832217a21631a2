"""purecomp.export: materialize a compressed model and write ONNX that runs as real INT8."""

from . import qdq_ops  # registers purecomp::qdq and purecomp::dq
from .check import CheckResult, check, fused_op_counts
from .materialize import MaterializedModel, fold_batchnorms, materialize
from .modules import BinarizeActivation, Dequantize, QuantizeDequantize, integer_grid
from .onnx_export import ExportError, to_onnx
from .pruning import prune_channels
from .rules import ExportContext, ExportRule

__all__ = [
    "BinarizeActivation",
    "Dequantize",
    "ExportContext",
    "ExportRule",
    "QuantizeDequantize",
    "CheckResult",
    "ExportError",
    "MaterializedModel",
    "check",
    "fold_batchnorms",
    "fused_op_counts",
    "integer_grid",
    "materialize",
    "prune_channels",
    "qdq_ops",
    "to_onnx",
]
