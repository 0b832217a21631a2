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

from purecomp.registry import register_package  # noqa: E402

from .from_config import const_from_config, magnitude_from_config, rb_from_config  # noqa: E402

register_package(
    __name__,
    {"magnitude_sparsity": magnitude_from_config, "rb_sparsity": rb_from_config, "const_sparsity": const_from_config},
    (MagnitudeSparsityState, RBSparsityState, ConstSparsityState),
)
