"""Public fake-quantize functions and the router that picks the kernel path.

Paths: ``"reference"`` (the pure-torch composite of ``reference.py``) and, once built,
``"cpp"`` (the C++ ops ``torch.ops.purecomp.fake_quantize_*`` on CPU tensors, whose autograd
kernels are C++ too) and ``"cuda"`` (the same ops' CUDA kernels, ``build_cuda``, on CUDA
tensors). ``record_paths()`` lets tests assert which one ran.

The kernel paths are taken only for eager, transform-free calls: not while
``torch.compile`` traces, not under an active ``torch.func`` transform (grad, vjp, jvp,
vmap, ...), not when an input carries a forward-AD tangent, and only for float32/float16/
bfloat16 ``x`` with float32 parameters. ``PURECOMP_OPS=reference`` disables it (see
``build``). Everything else runs the reference, which composes with every transform.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor
from torch.autograd import forward_ad

from purecomp.errors import QuantizerRangeError

from . import build, build_cuda
from .levels import MAX_BITS, MIN_BITS, asymmetric_levels, check_bits, symmetric_levels
from .reference import fake_quantize_asymmetric_reference, fake_quantize_symmetric_reference

_CPP_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_recorders: list[list[str]] = []

# Per-call costs are kept to a few hundred nanoseconds: the levels of every valid configuration
# are looked up (anything else goes through check_bits, which raises), and the op handles are
# resolved once.
_SYM_LEVELS = {
    (bits, signed, narrow): symmetric_levels(bits, signed, narrow)
    for bits in range(MIN_BITS, MAX_BITS + 1)
    for signed in (False, True)
    for narrow in (False, True)
}
_ASYM_LEVELS = {bits: asymmetric_levels(bits)[1] for bits in range(MIN_BITS, MAX_BITS + 1)}
_SYM_OP = None
_ASYM_OP = None


def _symmetric_levels(bits: int, signed: bool, narrow_range: bool) -> tuple[int, int]:
    if type(bits) is int:  # not bool, not float: those are refused by check_bits
        try:
            levels = _SYM_LEVELS.get((bits, signed, narrow_range))
        except TypeError:  # unhashable flags
            levels = None
        if levels is not None:
            return levels
    check_bits(bits)
    return symmetric_levels(bits, signed, narrow_range)


def _asymmetric_levels(bits: int) -> int:
    if type(bits) is int:
        levels = _ASYM_LEVELS.get(bits)
        if levels is not None:
            return levels
    check_bits(bits)
    return asymmetric_levels(bits)[1]


def _symmetric_op():
    global _SYM_OP
    if _SYM_OP is None:
        _SYM_OP = torch.ops.purecomp.fake_quantize_symmetric.default
    return _SYM_OP


def _asymmetric_op():
    global _ASYM_OP
    if _ASYM_OP is None:
        _ASYM_OP = torch.ops.purecomp.fake_quantize_asymmetric.default
    return _ASYM_OP


def note_path(path: str) -> None:
    """Tell every active ``record_paths`` block which path an op call took."""
    for recorder in _recorders:
        recorder.append(path)


def recording() -> bool:
    """Whether a ``record_paths`` block is active (callers skip ``note_path`` otherwise)."""
    return bool(_recorders)


@contextlib.contextmanager
def record_paths() -> Iterator[list[str]]:
    """Collect the name of the path (``"reference"``, ``"cpp"`` or ``"cuda"``) of every op call in the block."""
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


def _has_tangent(t: Tensor) -> bool:
    # A tangent exists only inside a forward-AD dual level (the level counter is -1 outside).
    if getattr(forward_ad, "_current_level", 0) < 0:
        return False
    return forward_ad.unpack_dual(t).tangent is not None


def use_cpp(x: Tensor, *params: Tensor) -> bool:
    """True when the C++ CPU kernels may run: eager, no transform, no tangent, CPU, supported dtypes."""
    return _kernel_path(x, *params) == "cpp"


def _kernel_path(x: Tensor, *params: Tensor) -> str | None:
    """``"cpp"`` (CPU kernels) or ``"cuda"`` (CUDA kernels) when one may run this call, else None:
    eager, no transform, no tangent, x float32/float16/bfloat16 and float32 parameters, all on
    the CPU or all on x's CUDA device, and the kernels built."""
    if torch.compiler.is_compiling() or torch._C._functorch.maybe_current_level() is not None:
        return None
    if x.dtype not in _CPP_DTYPES:
        return None
    if x.is_cpu:
        path = "cpp"
        for p in params:
            if not p.is_cpu or p.dtype != torch.float32:
                return None
    elif x.is_cuda:
        path = "cuda"
        for p in params:
            if p.device != x.device or p.dtype != torch.float32:
                return None
    else:
        return None
    if getattr(forward_ad, "_current_level", 0) >= 0:  # inside a dual level: look for tangents
        if _has_tangent(x) or any(_has_tangent(p) for p in params):
            return None
    if path == "cpp":
        return path if build.ensure_built() else None
    return path if build_cuda.ensure_cuda_built() else None


def fake_quantize_symmetric(
    x: Tensor, scale: Tensor, *, bits: int, signed: bool, narrow_range: bool, axis: int | None = None
) -> Tensor:
    """Symmetric fake quantization (see ``reference.fake_quantize_symmetric_reference``)."""
    ql, qh = _symmetric_levels(bits, signed, narrow_range)
    if axis is not None or scale.numel() != 1:
        _check_param("scale", scale, x, axis)
    path = _kernel_path(x, scale)
    if path is not None:
        if recording():
            note_path(path)
        return (_SYM_OP if _SYM_OP is not None else _symmetric_op())(x, scale, ql, qh, axis)
    note_path("reference")
    return fake_quantize_symmetric_reference(
        x, scale, bits=bits, signed=signed, narrow_range=narrow_range, axis=axis
    )


def fake_quantize_asymmetric(
    x: Tensor, input_low: Tensor, input_range: Tensor, *, bits: int, axis: int | None = None
) -> Tensor:
    """Asymmetric fake quantization (see ``reference.fake_quantize_asymmetric_reference``)."""
    levels = _asymmetric_levels(bits)
    if axis is not None or input_low.numel() != 1 or input_range.numel() != 1:
        _check_param("input_low", input_low, x, axis)
        _check_param("input_range", input_range, x, axis)
    path = _kernel_path(x, input_low, input_range)
    if path is not None:
        if recording():
            note_path(path)
        return (_ASYM_OP if _ASYM_OP is not None else _asymmetric_op())(x, input_low, input_range, levels, axis)
    note_path("reference")
    return fake_quantize_asymmetric_reference(x, input_low, input_range, bits=bits, axis=axis)
