"""onnxscript translations of the export-only ops (opset 21).

qdq -> QuantizeLinear -> [Clip to (qmin, qmax) when narrower than the int8/uint8 container]
-> DequantizeLinear; dq -> DequantizeLinear of the integer initializer.
"""

from __future__ import annotations

from typing import Any

import onnx
import torch

from .qdq_ops import CONTAINER_RANGE


def _constant(op: Any, value: int, signed: bool) -> Any:
    dtype = onnx.TensorProto.INT8 if signed else onnx.TensorProto.UINT8
    return op.Constant(value=onnx.helper.make_tensor("c", dtype, [], [value]))


def translation_table() -> dict[Any, Any]:
    from onnxscript import opset21 as op

    def qdq_onnx(x, scale, zero_point, qmin: int, qmax: int, axis: int):
        q = op.QuantizeLinear(x, scale, zero_point, axis=axis)
        signed = qmin < 0
        container = CONTAINER_RANGE[torch.int8 if signed else torch.uint8]
        if (qmin, qmax) != container:
            q = op.Clip(q, _constant(op, qmin, signed), _constant(op, qmax, signed))
        return op.DequantizeLinear(q, scale, zero_point, axis=axis)

    def dq_onnx(q, scale, zero_point, axis: int):
        return op.DequantizeLinear(q, scale, zero_point, axis=axis)

    return {torch.ops.purecomp.qdq.default: qdq_onnx, torch.ops.purecomp.dq.default: dq_onnx}
