"""Quantizer state structs: trainable range parameters as leaves, bits and mode as metadata."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from purecomp.errors import QuantizerRangeError
from purecomp.export.qdq_ops import container_for
from purecomp.ops import (
    adjust_asymmetric_range,
    asymmetric_levels,
    fake_quantize_asymmetric,
    fake_quantize_symmetric,
    symmetric_levels,
)
from purecomp.ops.reference import EPS
from purecomp.struct import static_field, struct

MIN_RANGE = 1e-6  # a calibrated range below this is widened to it (an all-zero tensor still gets a valid quantizer)


@struct
class SymmetricQuantizer:
    """``out = s/qh * round(clamp(x qh / s, ql, qh))`` with trainable ``scale`` (MATH.md, Symmetric)."""

    scale: Tensor
    bits: int = static_field()
    signed: bool = static_field()
    narrow_range: bool = static_field()
    axis: int | None = static_field(default=None)

    mode = "symmetric"

    def __call__(self, x: Tensor) -> Tensor:
        return fake_quantize_symmetric(
            x, self.scale, bits=self.bits, signed=self.signed, narrow_range=self.narrow_range, axis=self.axis
        )

    @property
    def levels(self) -> tuple[int, int]:
        return symmetric_levels(self.bits, self.signed, self.narrow_range)

    def float_range(self) -> tuple[Tensor, Tensor]:
        """``(low, high) = (s ql / qh, s)``."""
        ql, qh = self.levels
        s = self.scale.detach().abs() + EPS
        return s * ql / qh, s

    def integer_grid(self) -> tuple[Tensor, Tensor, int, int]:
        """``(scale, zero_point, qmin, qmax)`` in ONNX terms (MATH.md, Export):
        ``y_scale = (|s| + eps) / qh``, ``y_zero_point = 0`` in the int8/uint8 container."""
        ql, qh = self.levels
        scale = (self.scale.detach().float().abs() + EPS) / qh
        return scale, torch.zeros_like(scale).to(container_for(ql, qh)), ql, qh


@struct
class AsymmetricQuantizer:
    """Trainable ``input_low`` and ``input_range``, zero exactly representable (MATH.md, Asymmetric)."""

    input_low: Tensor
    input_range: Tensor
    bits: int = static_field()
    axis: int | None = static_field(default=None)

    mode = "asymmetric"
    signed = False
    narrow_range = False

    def __call__(self, x: Tensor) -> Tensor:
        return fake_quantize_asymmetric(x, self.input_low, self.input_range, bits=self.bits, axis=self.axis)

    @property
    def levels(self) -> tuple[int, int]:
        return asymmetric_levels(self.bits)

    def float_range(self) -> tuple[Tensor, Tensor]:
        """The adjusted ``(low, high)`` actually used."""
        _, n = self.levels
        low, rng = adjust_asymmetric_range(
            self.input_low.detach(), self.input_range.detach().abs() + EPS, n
        )
        return low, low + rng

    def integer_grid(self) -> tuple[Tensor, Tensor, int, int]:
        """``(scale, zero_point, qmin, qmax)`` in ONNX terms (MATH.md, Export): after the zero-point
        adjustment ``[lo, lo + r]``, ``y_scale = r / qh`` and ``y_zero_point = round(-lo / y_scale)``."""
        return asymmetric_grid(self.input_low, self.input_range, self.levels)


@struct
class LogScaleSymmetricQuantizer:
    """A symmetric quantizer that trains ``log_scale``, with ``scale = exp(log_scale)`` (NNCF's
    ``logarithm_scale``). The forward is ``SymmetricQuantizer``'s; by the chain rule
    ``d out / d log_scale = scale * d out / d scale``, so an SGD step multiplies the scale by
    ``exp(-lr * scale * d loss / d scale)``: it can shrink the scale but never cross zero."""

    log_scale: Tensor
    bits: int = static_field()
    signed: bool = static_field()
    narrow_range: bool = static_field()
    axis: int | None = static_field(default=None)

    mode = "symmetric"

    @property
    def scale(self) -> Tensor:
        return self.log_scale.exp()

    def linear(self) -> SymmetricQuantizer:
        """The same quantizer with ``scale`` as its leaf (differentiable through ``exp``)."""
        return SymmetricQuantizer(self.scale, self.bits, self.signed, self.narrow_range, self.axis)

    def __call__(self, x: Tensor) -> Tensor:
        return self.linear()(x)

    @property
    def levels(self) -> tuple[int, int]:
        return symmetric_levels(self.bits, self.signed, self.narrow_range)

    def float_range(self) -> tuple[Tensor, Tensor]:
        return self.linear().float_range()

    def integer_grid(self) -> tuple[Tensor, Tensor, int, int]:
        return self.linear().integer_grid()


@struct
class LogRangeAsymmetricQuantizer:
    """An asymmetric quantizer that trains ``input_low`` and ``log_input_range``, with
    ``input_range = exp(log_input_range)`` (NNCF's ``logarithm_scale`` for asymmetric quantizers).
    The forward is ``AsymmetricQuantizer``'s."""

    input_low: Tensor
    log_input_range: Tensor
    bits: int = static_field()
    axis: int | None = static_field(default=None)

    mode = "asymmetric"
    signed = False
    narrow_range = False

    @property
    def input_range(self) -> Tensor:
        return self.log_input_range.exp()

    def linear(self) -> AsymmetricQuantizer:
        """The same quantizer with ``input_range`` as its leaf (differentiable through ``exp``)."""
        return AsymmetricQuantizer(self.input_low, self.input_range, self.bits, self.axis)

    def __call__(self, x: Tensor) -> Tensor:
        return self.linear()(x)

    @property
    def levels(self) -> tuple[int, int]:
        return asymmetric_levels(self.bits)

    def float_range(self) -> tuple[Tensor, Tensor]:
        return self.linear().float_range()

    def integer_grid(self) -> tuple[Tensor, Tensor, int, int]:
        return self.linear().integer_grid()


Quantizer = SymmetricQuantizer | AsymmetricQuantizer | LogScaleSymmetricQuantizer | LogRangeAsymmetricQuantizer
LOG_FIELDS = {LogScaleSymmetricQuantizer: ("log_scale",), LogRangeAsymmetricQuantizer: ("log_input_range",)}


def range_fields(quantizer: Quantizer) -> tuple[str, ...]:
    """The names of the trainable range leaves of ``quantizer``."""
    return tuple(f.name for f in dataclasses.fields(quantizer) if isinstance(getattr(quantizer, f.name), Tensor))


def rescaled(quantizer: Quantizer, alpha: Tensor | float) -> Quantizer:
    """``quantizer`` with its float range multiplied by ``alpha > 0`` (per channel when a tensor),
    as detached leaves: ``r -> alpha r`` for a linear range leaf, ``log r -> log r + log alpha`` for a
    logarithmic one."""
    logs = LOG_FIELDS.get(type(quantizer), ())
    log_alpha = torch.log(torch.as_tensor(alpha, dtype=torch.float32))
    return dataclasses.replace(quantizer, **{
        f: getattr(quantizer, f).detach() + log_alpha if f in logs else getattr(quantizer, f).detach() * alpha
        for f in range_fields(quantizer)})


def asymmetric_grid(input_low: Tensor, input_range: Tensor, levels: tuple[int, int]) -> tuple[Tensor, Tensor, int, int]:
    """The ONNX ``(scale, zero_point, qmin, qmax)`` of MATH.md's asymmetric range (per element of
    ``input_low``): ``scale = r / qh``, ``zero_point = clamp(round(-lo / scale), ql, qh)``."""
    ql, qh = levels
    low, rng = adjust_asymmetric_range(input_low.detach().float(), input_range.detach().float().abs() + EPS, qh)
    scale = rng / qh
    zero_point = torch.clamp(torch.round(-low / scale), ql, qh)
    return scale, zero_point.to(container_for(ql, qh)), ql, qh


def _param(value: Tensor, trainable: bool) -> Tensor:
    return value.detach().clone().float().requires_grad_(trainable)


def make_quantizer(
    mode: str,
    low: Tensor,
    high: Tensor,
    *,
    bits: int,
    signed: bool | None,
    narrow_range: bool,
    axis: int | None,
    trainable: bool = True,
    log_scale: bool = False,
) -> Quantizer:
    """Build a quantizer covering ``[low, high]`` (per channel when ``axis`` is set).

    Symmetric: ``signed`` defaults to ``low < 0`` (any channel); ``scale = max(|low|, |high|)``
    when signed, ``high`` when not. Asymmetric: ``input_low = low``, ``input_range = high - low``.
    Ranges narrower than ``MIN_RANGE`` are widened to it. ``log_scale`` trains the logarithm of
    ``scale`` / ``input_range`` instead (NNCF's ``logarithm_scale``).
    """
    low = low.detach().float()
    high = high.detach().float()
    if mode == "symmetric":
        is_signed = bool((low < 0).any()) if signed is None else signed
        scale = torch.maximum(low.abs(), high.abs()) if is_signed else high.clamp(min=0)
        scale = scale.clamp(min=MIN_RANGE)
        if log_scale:
            return LogScaleSymmetricQuantizer(_param(scale.log(), trainable), bits, is_signed, narrow_range, axis)
        return SymmetricQuantizer(_param(scale, trainable), bits, is_signed, narrow_range, axis)
    if mode == "asymmetric":
        rng = (high - low).clamp(min=MIN_RANGE)
        if log_scale:
            return LogRangeAsymmetricQuantizer(_param(low, trainable), _param(rng.log(), trainable), bits, axis)
        return AsymmetricQuantizer(_param(low, trainable), _param(rng, trainable), bits, axis)
    raise QuantizerRangeError(f"quantizer mode must be 'symmetric' or 'asymmetric', got {mode!r}")
