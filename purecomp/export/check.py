"""``check``: run an exported file in onnxruntime and compare with PyTorch."""

from __future__ import annotations

import dataclasses
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import Tensor, nn

from purecomp.apply import apply
from purecomp.protocol import method_states


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """How an ONNX file agrees with ``purecomp.apply``.

    ``max_abs_diff`` / ``max_steps``: onnxruntime with graph optimizations off (the QDQ graph
    evaluated as written) against PyTorch; ``fused_max_steps``: with all optimizations, where
    onnxruntime runs fused integer kernels (QLinearConv...) that round intermediate results
    themselves. Steps are in units of ``output_step``: the output quantizer's step when the
    output is quantized, else the 8-bit step of the reference output's range ((max - min) / 255).
    """

    max_abs_diff: float
    max_steps: float
    fused_max_abs_diff: float
    fused_max_steps: float
    output_step: float
    output_quantized: bool


def ort_session(path: Path, optimized: bool, optimized_path: Path | None = None):
    """An onnxruntime CPU session over ``path``: every graph optimization or none; with
    ``optimized_path`` onnxruntime also writes the graph it runs there."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(path: str | Path, inputs: Sequence[Tensor], optimized: bool = True) -> list[np.ndarray]:
    session = ort_session(Path(path), optimized)
    feeds = {i.name: t.detach().numpy() for i, t in zip(session.get_inputs(), inputs)}
    return session.run(None, feeds)


def fused_op_counts(path: str | Path) -> Counter:
    """Op types of the graph onnxruntime actually runs (all optimizations on), counted."""
    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        ort_session(Path(path), True, optimized)
        return Counter(node.op_type for node in onnx.load(str(optimized)).graph.node)


def _output_step(state: Any, reference: np.ndarray) -> tuple[float, bool]:
    for member in method_states(state):
        grid = member.output_grid() if callable(getattr(member, "output_grid", None)) else None
        if grid is not None:
            return float(grid[0]), True
    span = float(reference.max() - reference.min())
    return (span / 255 if span > 0 else 1.0), False


def check(
    path: str | Path,
    model: nn.Module,
    method: Any,
    params: Mapping[str, Tensor],
    state: Any,
    inputs: Sequence[Tensor] | Tensor,
) -> CheckResult:
    """Run ``path`` in onnxruntime on ``inputs`` and compare with ``apply`` in eval mode."""
    args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            expected = apply(model, method, params, state, *args)
    finally:
        model.train(was_training)
    reference = expected.detach().numpy() if isinstance(expected, Tensor) else expected[0].detach().numpy()
    plain = run_onnx(path, args, optimized=False)[0]
    fused = run_onnx(path, args, optimized=True)[0]
    step, quantized = _output_step(state, reference)
    diff = float(np.abs(plain - reference).max())
    fused_diff = float(np.abs(fused - reference).max())
    return CheckResult(diff, diff / step, fused_diff, fused_diff / step, step, quantized)
