"""purecomp.export: materialize a compressed model and write ONNX that runs as real INT8."""

from . import qdq_ops  # registers purecomp::qdq and purecomp::dq
from .check import CheckResult, check, fused_op_counts
from .materialize import MaterializedModel, fold_batchnorms, integer_grid, materialize
from .onnx_export import ExportError, to_onnx
from .pruning import prune_channels

__all__ = [
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
