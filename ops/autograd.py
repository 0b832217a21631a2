"""``torch.autograd.Function`` wrappers of the C++ fake-quantize ops.

Forward and first-order backward run the C++ kernels (``purecomp::fake_quantize_*`` and
their ``_backward``). Everything a single C++ backward cannot express is delegated to the
pure-torch reference, so the Functions stay correct under every transform:

- forward-mode AD (``jvp``): the reference's jvp (straight-through formulas);
- a backward that must itself be differentiable (``create_graph=True``, or the backward
  inside ``torch.func.grad``/``vjp``, which always runs with grad mode on): the
  reference's vjp, so double backward and ``jvp(grad)`` are those of the reference;
- ``vmap``: ``generate_vmap_rule``, the raw ops carrying their own vmap rules.

The router in ``dispatch`` sends only eager, transform-free calls here; these fallbacks keep
direct users of the Functions safe.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .levels import asymmetric_levels, symmetric_levels
from .reference import fake_quantize_asymmetric_reference, fake_quantize_symmetric_reference


def _zeros_if_none(tangent: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if tangent is None else tangent


class FakeQuantizeSymmetric(torch.autograd.Function):
    """``out = step * clamp(round(x / step), ql, qh)``, ``step = (|scale| + eps) / qh``.

    ``apply(x, scale, bits, signed, narrow_range, axis)``; gradients: d/dx = g inside,
    d/dscale = sgn(scale) * sum(g (out - x) / s inside, g above, g ql / qh below).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        x: Tensor, scale: Tensor, bits: int, signed: bool, narrow_range: bool, axis: int | None
    ) -> Tensor:
        ql, qh = symmetric_levels(bits, signed, narrow_range)
        return torch.ops.purecomp.fake_quantize_symmetric(x, scale, ql, qh, axis)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        x, scale, bits, signed, narrow_range, axis = inputs
        ctx.save_for_backward(x, scale)
        ctx.save_for_forward(x, scale)
        ctx.spec = {"bits": bits, "signed": signed, "narrow_range": narrow_range, "axis": axis}

    @staticmethod
    def _reference(ctx: Any) -> Callable[..., Tensor]:
        return lambda x, scale: fake_quantize_symmetric_reference(x, scale, **ctx.spec)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, scale = ctx.saved_tensors
        if torch.is_grad_enabled():  # the backward itself is differentiated: reference vjp
            _, vjp = torch.func.vjp(FakeQuantizeSymmetric._reference(ctx), x, scale)
            grad_x, grad_scale = vjp(grad)
        else:
            spec = ctx.spec
            ql, qh = symmetric_levels(spec["bits"], spec["signed"], spec["narrow_range"])
            grad_x, grad_scale = torch.ops.purecomp.fake_quantize_symmetric_backward(
                grad, x, scale, ql, qh, spec["axis"]
            )
        return grad_x, grad_scale, None, None, None, None

    @staticmethod
    def jvp(ctx: Any, x_t: Tensor | None, scale_t: Tensor | None, *_: Any) -> Tensor:
        x, scale = ctx.saved_tensors
        tangents = (_zeros_if_none(x_t, x), _zeros_if_none(scale_t, scale))
        return torch.func.jvp(FakeQuantizeSymmetric._reference(ctx), (x, scale), tangents)[1]


class FakeQuantizeAsymmetric(torch.autograd.Function):
    """``out = (clamp(round((x - lo) / step), 0, n) - zp) * step`` on the zero-adjusted range.

    ``apply(x, input_low, input_range, bits, axis)``; gradients: d/dx = g inside,
    d/dinput_low = sum(g outside), d/dinput_range = sgn(range) * sum(g (out - x) / range inside, g above).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        x: Tensor, input_low: Tensor, input_range: Tensor, bits: int, axis: int | None
    ) -> Tensor:
        _, n = asymmetric_levels(bits)
        return torch.ops.purecomp.fake_quantize_asymmetric(x, input_low, input_range, n, axis)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        x, input_low, input_range, bits, axis = inputs
        ctx.save_for_backward(x, input_low, input_range)
        ctx.save_for_forward(x, input_low, input_range)
        ctx.spec = {"bits": bits, "axis": axis}

    @staticmethod
    def _reference(ctx: Any) -> Callable[..., Tensor]:
        return lambda x, low, rng: fake_quantize_asymmetric_reference(x, low, rng, **ctx.spec)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, input_low, input_range = ctx.saved_tensors
        if torch.is_grad_enabled():  # the backward itself is differentiated: reference vjp
            _, vjp = torch.func.vjp(
                FakeQuantizeAsymmetric._reference(ctx), x, input_low, input_range
            )
            grads = vjp(grad)
        else:
            _, n = asymmetric_levels(ctx.spec["bits"])
            grads = torch.ops.purecomp.fake_quantize_asymmetric_backward(
                grad, x, input_low, input_range, n, ctx.spec["axis"]
            )
        return (*grads, None, None)

    @staticmethod
    def jvp(
        ctx: Any, x_t: Tensor | None, low_t: Tensor | None, range_t: Tensor | None, *_: Any
    ) -> Tensor:
        x, input_low, input_range = ctx.saved_tensors
        primals = (x, input_low, input_range)
        tangents = tuple(_zeros_if_none(t, p) for t, p in zip((x_t, low_t, range_t), primals))
        return torch.func.jvp(FakeQuantizeAsymmetric._reference(ctx), primals, tangents)[1]
