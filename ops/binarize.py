"""Public binarization functions.

Weights: ``xnor_binarize`` and ``dorefa_binarize`` (pure-torch, straight-through).
Activations: ``activation_binarize`` (scale-threshold, paper eq. 5), routed like the
fake-quantize ops (``dispatch``): the C++ op ``torch.ops.purecomp.activation_binarize`` (C++
autograd kernel) for eager, transform-free CPU calls with float32/float16/bfloat16 ``x`` and
float32 parameters, the reference everywhere else (``torch.compile``, ``torch.func`` transforms,
forward-AD tangents, other devices or dtypes, ``PURECOMP_OPS=reference``). ``record_paths``
records ``"cpp"`` or ``"reference"``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from purecomp.errors import QuantizerRangeError

from .binarize_reference import (
    activation_binarize_reference,
    dorefa_binarize_reference,
    xnor_binarize_reference,
)
from .dispatch import note_path, recording, use_cpp

xnor_binarize = xnor_binarize_reference
dorefa_binarize = dorefa_binarize_reference

_BIN_OP = None


def _binarize_op():
    global _BIN_OP
    if _BIN_OP is None:
        _BIN_OP = torch.ops.purecomp.activation_binarize.default
    return _BIN_OP


def _check_activation_params(x: Tensor, scale: Tensor, threshold: Tensor, axis: int) -> int:
    if not x.is_floating_point():
        raise QuantizerRangeError(f"activation binarization needs a floating-point input, got {x.dtype}")
    if not -x.dim() <= axis < x.dim():
        raise QuantizerRangeError(f"axis {axis} is out of range for an input of {x.dim()} dimensions")
    if scale.numel() != 1:
        raise QuantizerRangeError(f"scale must hold one value, got shape {tuple(scale.shape)}")
    channels = x.shape[axis]
    if threshold.dim() != 1 or threshold.shape[0] != channels:
        raise QuantizerRangeError(
            f"threshold must have shape ({channels},) for channels along axis {axis}, got {tuple(threshold.shape)}"
        )
    return axis % x.dim()


def activation_binarize(x: Tensor, scale: Tensor, threshold: Tensor, axis: int = 1) -> Tensor:
    """``out = s * H(x - s * t)``: ``s`` (one positive value), ``t`` per channel along ``axis``.

    See ``binarize_reference.activation_binarize_reference`` for the gradients; the C++ path
    gives the same output bit for bit and the same gradients to float rounding.
    """
    axis = _check_activation_params(x, scale, threshold, axis)
    if use_cpp(x, scale, threshold):
        if recording():
            note_path("cpp")
        return (_BIN_OP if _BIN_OP is not None else _binarize_op())(x, scale, threshold, axis)
    note_path("reference")
    return activation_binarize_reference(x, scale, threshold, axis)
