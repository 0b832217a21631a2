"""Export-only ops ``purecomp::qdq`` (quantize-dequantize an activation) and ``purecomp::dq``
(dequantize integer weights), with ONNX QuantizeLinear/DequantizeLinear semantics.

``qdq(x, scale, zero_point, qmin, qmax, axis) = (clamp(round(x / scale) + zp, qmin, qmax) - zp) * scale``
``dq(q, scale, zero_point, axis) = (q - zp) * scale``

``scale`` and ``zero_point`` hold one value (per tensor) or one per channel along ``axis``;
``zero_point`` is int8 or uint8: its dtype is the ONNX container.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _per_channel(value: Tensor, ndim: int, axis: int) -> Tensor:
    if value.dim() == 0:
        return value
    shape = [1] * ndim
    shape[axis] = -1
    return value.reshape(shape)


@torch.library.custom_op("purecomp::qdq", mutates_args=())
def qdq(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, axis: int) -> Tensor:
    s = _per_channel(scale, x.dim(), axis)
    z = _per_channel(zero_point.to(torch.float32), x.dim(), axis)
    return ((torch.clamp(torch.round(x.float() / s) + z, qmin, qmax) - z) * s).to(x.dtype)


@qdq.register_fake
def _qdq_fake(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, axis: int) -> Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("purecomp::dq", mutates_args=())
def dq(q: Tensor, scale: Tensor, zero_point: Tensor, axis: int) -> Tensor:
    s = _per_channel(scale, q.dim(), axis)
    z = _per_channel(zero_point.to(torch.float32), q.dim(), axis)
    return (q.to(torch.float32) - z) * s


@dq.register_fake
def _dq_fake(q: Tensor, scale: Tensor, zero_point: Tensor, axis: int) -> Tensor:
    return torch.empty(q.shape, dtype=torch.float32, device=q.device)


CONTAINER_RANGE = {torch.int8: (-128, 127), torch.uint8: (0, 255)}


def container_for(qmin: int, qmax: int) -> torch.dtype:
    """int8 when the levels go below zero, else uint8."""
    return torch.int8 if qmin < 0 else torch.uint8
