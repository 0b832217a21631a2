"""purecomp.ops: fake-quantize ops (C++ kernels with a pure-torch reference twin)."""

from .dispatch import fake_quantize_asymmetric, fake_quantize_symmetric, record_paths
from .levels import asymmetric_levels, symmetric_levels
from .reference import (
    adjust_asymmetric_range,
    fake_quantize_asymmetric_reference,
    fake_quantize_symmetric_reference,
)

__all__ = [
    "adjust_asymmetric_range",
    "asymmetric_levels",
    "fake_quantize_asymmetric",
    "fake_quantize_asymmetric_reference",
    "fake_quantize_symmetric",
    "fake_quantize_symmetric_reference",
    "record_paths",
    "symmetric_levels",
]
