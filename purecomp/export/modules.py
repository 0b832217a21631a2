"""Export-form modules and weight encodings: the leaf every other export module builds on.

``QuantizeDequantize`` (an activation quantizer: ``purecomp::qdq``), ``Dequantize`` (a
parametrization over integer weights: ``purecomp::dq``) and ``BinarizeActivation``, plus the
helpers that store a weight as integers behind ``Dequantize``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize


def integer_grid(quantizer: Any) -> tuple[Tensor, Tensor, int, int]:
    """``(scale, zero_point, qmin, qmax)`` of a quantizer in ONNX terms (MATH.md, Export): each
    quantizer states its own grid (``quantizer.integer_grid()``)."""
    return quantizer.integer_grid()


class QuantizeDequantize(nn.Module):
    """An activation quantizer in export form: ``purecomp::qdq`` with constant scale and zero point."""

    def __init__(self, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> None:
        super().__init__()
        self.register_buffer("scale", scale.reshape(()))
        self.register_buffer("zero_point", zero_point.reshape(()))
        self.qmin, self.qmax = qmin, qmax

    @classmethod
    def of(cls, quantizer: Any) -> QuantizeDequantize:
        """The export form of a per-tensor quantizer (``integer_grid``)."""
        return cls(*integer_grid(quantizer))

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.purecomp.qdq(x, self.scale, self.zero_point, self.qmin, self.qmax, 1)

    def extra_repr(self) -> str:
        return f"levels=[{self.qmin}, {self.qmax}], scale={float(self.scale):.4g}, zero_point={int(self.zero_point)}"


class Dequantize(nn.Module):
    """Parametrization ``weight = (q - zero_point) * scale`` over an integer ``original``."""

    def __init__(self, scale: Tensor, zero_point: Tensor, axis: int) -> None:
        super().__init__()
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero_point)
        self.axis = axis

    def forward(self, q: Tensor) -> Tensor:
        return torch.ops.purecomp.dq(q, self.scale, self.zero_point, self.axis)


class BinarizeActivation(nn.Module):
    """An activation binarizer in export form: ``where(x > s t, s, 0)`` with constant ``s`` and
    per-channel ``s t`` (ONNX: Greater, Where)."""

    def __init__(self, scale: Tensor, threshold: Tensor, axis: int, rank: int) -> None:
        super().__init__()
        shape = [1] * rank
        shape[axis] = -1
        self.register_buffer("scale", scale.reshape(()))
        self.register_buffer("threshold", threshold.reshape(shape))
        self.register_buffer("zero", torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        return torch.where(x.float() > self.threshold, self.scale, self.zero).to(x.dtype)

    def extra_repr(self) -> str:
        return f"scale={float(self.scale):.4g}, channels={self.threshold.numel()}"


def owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """``(module, attribute)`` holding the parameter or submodule ``name`` of ``model``."""
    path, _, attr = name.rpartition(".")
    return (model.get_submodule(path) if path else model), attr


def store_integers(module: nn.Module, attr: str, ints: Tensor, scale: Tensor, zero_point: Tensor, axis: int) -> None:
    """Store ``module.<attr>`` as the integers ``ints`` behind ``Dequantize(scale, zero_point, axis)``."""
    parametrize.register_parametrization(module, attr, Dequantize(scale, zero_point, axis), unsafe=True)
    getattr(module.parametrizations, attr).original = nn.Parameter(ints, requires_grad=False)


def quantize_weight(module: nn.Module, attr: str, weight: Tensor, quantizer: Any) -> None:
    """Store ``weight`` on ``quantizer``'s integer grid: ``q = round(w / scale) + zero_point``
    (per channel along ``quantizer.axis``, per tensor when it is ``None``)."""
    scale, zero_point, _, _ = integer_grid(quantizer)
    axis = quantizer.axis if quantizer.axis is not None else 0
    shape = [1] * weight.dim()
    if quantizer.axis is not None:
        shape[axis] = -1
    zp_shape = shape if quantizer.axis is not None else []
    ints = torch.round(weight.detach() / scale.reshape(shape)) + zero_point.float().reshape(zp_shape)
    store_integers(module, attr, ints.to(zero_point.dtype), scale, zero_point, axis)
