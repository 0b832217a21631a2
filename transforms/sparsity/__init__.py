"""Sparsity: magnitude, regularization-based (L0) and constant."""

from .common import keep_largest, sparsified_weights
from .const import ConstSparsityState, const_sparsity
from .magnitude import MagnitudeSparsityState, magnitude_masks, magnitude_sparsity
from .rb import RBSparsityState, rb_sparsity

__all__ = [
    "ConstSparsityState",
    "MagnitudeSparsityState",
    "RBSparsityState",
    "const_sparsity",
    "keep_largest",
    "magnitude_masks",
    "magnitude_sparsity",
    "rb_sparsity",
    "sparsified_weights",
]
