"""Public fake-quantize functions and the router that picks the kernel path.

Paths: ``"reference"`` (the pure-torch composite of ``reference.py``) and, once built,
``"cpp"`` (the C++ kernels). ``record_paths()`` lets tests assert which one ran.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import Tensor

from purecomp.errors import QuantizerRangeError

from .levels import check_bits
from .reference import fake_quantize_asymmetric_reference, fake_quantize_symmetric_reference

_recorders: list[list[str]] = []


def _note_path(path: str) -> None:
    for recorder in _recorders:
        recorder.append(path)


@contextlib.contextmanager
def record_paths() -> Iterator[list[str]]:
    """Collect the name of the path (``"reference"`` or ``"cpp"``) of every op call in the block."""
    recorder: list[str] = []
    _recorders.append(recorder)
    try:
        yield recorder
    finally:
        _recorders.remove(recorder)


def _check_param(name: str, param: Tensor, x: Tensor, axis: int | None) -> None:
    if axis is None:
        if param.numel() != 1:
            raise QuantizerRangeError(
                f"{name} must hold one value for a per-tensor quantizer (axis=None), got shape {tuple(param.shape)}"
            )
        return
    if not -x.dim() <= axis < x.dim():
        raise QuantizerRangeError(f"axis {axis} is out of range for an input of {x.dim()} dimensions")
    channels = x.shape[axis]
    if param.dim() != 1 or param.shape[0] != channels:
        raise QuantizerRangeError(
            f"{name} must have shape ({channels},) for per-channel quantization along axis {axis}, "
            f"got {tuple(param.shape)}"
        )


def fake_quantize_symmetric(
    x: Tensor, scale: Tensor, *, bits: int, signed: bool, narrow_range: bool, axis: int | None = None
) -> Tensor:
    """Symmetric fake quantization (see ``reference.fake_quantize_symmetric_reference``)."""
    check_bits(bits)
    _check_param("scale", scale, x, axis)
    _note_path("reference")
    return fake_quantize_symmetric_reference(
        x, scale, bits=bits, signed=signed, narrow_range=narrow_range, axis=axis
    )


def fake_quantize_asymmetric(
    x: Tensor, input_low: Tensor, input_range: Tensor, *, bits: int, axis: int | None = None
) -> Tensor:
    """Asymmetric fake quantization (see ``reference.fake_quantize_asymmetric_reference``)."""
    check_bits(bits)
    _check_param("input_low", input_low, x, axis)
    _check_param("input_range", input_range, x, axis)
    _note_path("reference")
    return fake_quantize_asymmetric_reference(x, input_low, input_range, bits=bits, axis=axis)
