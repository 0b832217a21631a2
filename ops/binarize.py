"""Public binarization functions.

Weights: ``xnor_binarize`` and ``dorefa_binarize`` (pure-torch, straight-through).
Activations: ``activation_binarize`` (scale-threshold, paper eq. 5); the router of
``dispatch`` records which path ran.
"""

from __future__ import annotations

from torch import Tensor

from purecomp.errors import QuantizerRangeError

from .binarize_reference import (
    activation_binarize_reference,
    dorefa_binarize_reference,
    xnor_binarize_reference,
)
from .dispatch import _note_path

xnor_binarize = xnor_binarize_reference
dorefa_binarize = dorefa_binarize_reference


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

    See ``binarize_reference.activation_binarize_reference`` for the gradients.
    """
    axis = _check_activation_params(x, scale, threshold, axis)
    _note_path("reference")
    return activation_binarize_reference(x, scale, threshold, axis)
