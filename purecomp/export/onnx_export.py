"""``to_onnx``: materialize and export with the dynamo exporter (opset >= 21)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import Tensor, nn

from purecomp.errors import PurecompError
from purecomp.graph import trace

from .materialize import materialize
from .onnx_translation import translation_table

log = logging.getLogger(__name__)


class ExportError(PurecompError, RuntimeError):
    """The ONNX exporter could not export the materialized model."""


def strip_metadata(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Drop the exporter's per-node metadata (Python stack traces, FX names): it can outweigh a small model."""
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    for info in list(proto.graph.value_info) + list(proto.graph.input) + list(proto.graph.output):
        del info.metadata_props[:]
    for init in proto.graph.initializer:
        del init.metadata_props[:]
    return proto


def to_onnx(
    model: nn.Module,
    method: Any,
    params: Mapping[str, Tensor],
    state: Any,
    example_inputs: Sequence[Any] | Tensor,
    path: str | Path,
    opset: int = 21,
    dynamic_batch: bool = True,
    fold_batchnorm: bool = True,
) -> Path:
    """Write the compressed model to ``path`` as ONNX and check it (``onnx.checker``, full check).

    Quantizers become QuantizeLinear -> [Clip] -> DequantizeLinear, quantized weights int8/uint8
    initializers behind DequantizeLinear. ``dynamic_batch`` makes dimension 0 of every input
    dynamic. Returns the path.
    """
    if opset < 21:
        raise ExportError(f"opset must be >= 21 (int4 types, per-axis QuantizeLinear), got {opset}")
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    was_training = model.training
    model.eval()
    try:
        graph = trace(model, args) if fold_batchnorm else None
        module = materialize(model, method, params, state, graph=graph)
    finally:
        model.train(was_training)
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch")
        dynamic_shapes = {"args": tuple({0: batch} if isinstance(a, Tensor) else None for a in args)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        program = torch.onnx.export(
            module, args, dynamo=True, opset_version=opset, custom_translation_table=translation_table(),
            dynamic_shapes=dynamic_shapes, verbose=False,
        )
    except Exception as exc:
        raise ExportError(f"torch.onnx.export failed for the materialized model: {type(exc).__name__}: {exc}") from exc
    program.save(str(path))
    proto = strip_metadata(onnx.load(str(path)))
    onnx.save(proto, str(path))
    onnx.checker.check_model(proto, full_check=True)
    log.info("exported %s (%.1f KiB)", path, path.stat().st_size / 1024)
    return path
