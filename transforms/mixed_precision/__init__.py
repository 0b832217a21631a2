"""Mixed precision: HAWQ-v2 (Hessian-trace sensitivity), AutoQ (DDPG search against a metric) and
manual per-scope bit widths."""

from .autoq import AutoQ, AutoQReport, autoq, autoq_precision
from .complexity import CostModel, op_flops
from .hardware import HardwareSetting, hardware_setting, hardware_table
from .hawq import (
    Hawq,
    HawqOptions,
    Manual,
    hawq,
    hawq_precision,
    manual,
    perturbation,
    precision_report,
)
from .report import PrecisionReport, load_plan
from .search import Candidate, monotone_assignments, search, trace_order
from .traces import TraceEstimate, autograd_traces, collect_batches, hutchinson_traces, rademacher

__all__ = [
    "AutoQ",
    "AutoQReport",
    "Candidate",
    "CostModel",
    "HardwareSetting",
    "Hawq",
    "HawqOptions",
    "Manual",
    "PrecisionReport",
    "TraceEstimate",
    "autograd_traces",
    "autoq",
    "autoq_precision",
    "collect_batches",
    "hardware_setting",
    "hardware_table",
    "hawq",
    "hawq_precision",
    "hutchinson_traces",
    "load_plan",
    "manual",
    "monotone_assignments",
    "op_flops",
    "perturbation",
    "precision_report",
    "rademacher",
    "search",
    "trace_order",
]
