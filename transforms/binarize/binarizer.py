"""Binarizer state structs: the activation binarizer's hidden parameters, the weight modes."""

from __future__ import annotations

import torch
from torch import Tensor

from purecomp.errors import ConfigError
from purecomp.ops.binarize import activation_binarize, dorefa_binarize, xnor_binarize
from purecomp.struct import static_field, struct

WEIGHT_MODES = ("xnor", "dorefa")


def binarize_weight(weight: Tensor, mode: str) -> Tensor:
    """``sign(W) * mean(|W|)`` per output filter (xnor) or over the tensor (dorefa), straight-through."""
    if mode == "xnor":
        return xnor_binarize(weight)
    if mode == "dorefa":
        return dorefa_binarize(weight)
    raise ConfigError("mode", f"expected one of {list(WEIGHT_MODES)}, got {mode!r}")


@struct
class ActivationBinarizer:
    """``out = s * H(x - s * t)`` with ``s = exp(log_scale)`` and ``t = sigmoid(hidden_threshold)``.

    The optimizer sees the hidden parameters (blog: "Sln" and "Ts"): the log keeps ``s``
    positive and makes its steps relative (``ds = s * d log_scale``); the sigmoid keeps ``t`` in
    ``(0, 1)``, so the threshold ``s * t`` stays inside the binarization range ``(0, s)``.
    """

    log_scale: Tensor  # shape (1,)
    hidden_threshold: Tensor  # shape (C,)
    axis: int = static_field(default=1)

    def __call__(self, x: Tensor) -> Tensor:
        return activation_binarize(x, self.scale, self.threshold, self.axis)

    @property
    def scale(self) -> Tensor:
        return self.log_scale.exp()

    @property
    def threshold(self) -> Tensor:
        return torch.sigmoid(self.hidden_threshold)
