"""Group-wise weight quantization grids with NNCF 3.x's definitions (pure functions).

A weight ``W [out, in]`` is split along its INPUT dimension into groups of ``g`` columns
(``g = in`` when ``group_size`` is ``None`` or ``-1``: one group per output channel), so
``W`` is viewed as ``[out, in / g, g]`` and every group ``G`` gets its own scale ``s`` (and zero
point ``z``). All arithmetic is float32, as in NNCF's reference implementation
(``nncf/quantization/algorithms/weight_compression/weight_lowering.py``, v3.1.0):

- ``int8_asym`` / ``int4_asym`` (``b`` = 8 / 4 bits, levels ``0 .. 2^b - 1``):
  ``s = (max G - min G) / (2^b - 1)``, ``z = clip(-round(min G / s), 0, 2^b - 1)``,
  ``q = clip(round(w / s + z), 0, 2^b - 1)``, ``w' = (q - z) s``
  (``calculate_integer_quantization_params`` -> ``fake_quantize.calculate_scale_zero_point``
  with ``narrow_range=False``). The range is not widened to contain 0: a group whose values are
  all positive (or all negative) gets ``z`` clipped and loses its far end, exactly as in NNCF.
- ``int8_sym`` / ``int4_sym`` (levels ``-2^(b-1) .. 2^(b-1) - 1``), a SIGNED scale:
  ``s = |min G| / 2^(b-1)`` if ``|min G| >= max G`` else ``s = -max G / 2^(b-1)``,
  ``q = clip(round(w / s), -2^(b-1), 2^(b-1) - 1)``, ``w' = q s`` (``_calculate_signed_scale``).
  The value of largest magnitude lands exactly on level ``-2^(b-1)``, so the full negative
  level is used whichever sign the extreme has; the opposite extreme may clip by up to one step.
- ``nf4``: ``s = max |G|``, ``q = searchsorted(NF4_CENTERS, w / s)`` (an index 0..15 into
  ``NF4_LEVELS``, 16 quantiles of a normal distribution scaled to ``[-1, 1]``),
  ``w' = NF4_LEVELS[q] s`` (``do_float_quantization`` / ``_calculate_float_quantized_weight``).

Every scale with ``|s| < eps`` (float32 machine epsilon) becomes ``eps``, as in NNCF; so an
asymmetric group of equal values (``max = min``, e.g. groups of one column) dequantizes to about
0, as NNCF's does. Rounding is round-half-to-even (``torch.round``, like NumPy's).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
from torch import Tensor

from purecomp.errors import ConfigError

EPS = float(torch.finfo(torch.float32).eps)

# NNCF v3.1.0 src/nncf/quantization/algorithms/weight_compression/constants.py: NF4_QUANTILES,
# CENTER_OF_NF4_QUANTILES (float32)
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
], dtype=torch.float32)
NF4_CENTERS = torch.tensor([
    -0.84809643, -0.6106329, -0.45999527, -0.33967942, -0.2346074, -0.13791174, -0.045525018,
    0.03979015, 0.120255254, 0.20352125, 0.29201376, 0.38931254, 0.5016634, 0.6427869, 0.8614784,
], dtype=torch.float32)


@dataclasses.dataclass(frozen=True)
class ModeSpec:
    """A weight compression mode: ``bits`` per weight, the stored integer range ``[qmin, qmax]``
    (for ``nf4``: indices into ``NF4_LEVELS``), whether a zero point is stored, and the integer
    dtype that holds one unpacked value."""

    name: str
    bits: int
    qmin: int
    qmax: int
    asymmetric: bool
    codebook: bool = False

    @property
    def dtype(self) -> torch.dtype:
        return torch.int8 if self.qmin < 0 else torch.uint8


MODES: dict[str, ModeSpec] = {
    "int8_asym": ModeSpec("int8_asym", 8, 0, 255, True),
    "int8_sym": ModeSpec("int8_sym", 8, -128, 127, False),
    "int4_asym": ModeSpec("int4_asym", 4, 0, 15, True),
    "int4_sym": ModeSpec("int4_sym", 4, -8, 7, False),
    "nf4": ModeSpec("nf4", 4, 0, 15, False, codebook=True),
}


class Quantized(NamedTuple):
    """Integers ``values [out, in]`` (``ModeSpec.dtype``), ``scale [out, n_groups]`` (float32) and
    ``zero_point [out, n_groups]`` (uint8; ``None`` for symmetric modes and nf4)."""

    values: Tensor
    scale: Tensor
    zero_point: Tensor | None


def mode_spec(mode: str, path: str = "mode") -> ModeSpec:
    """The ``ModeSpec`` of ``mode``; ``ConfigError`` at ``path`` listing the supported modes."""
    name = getattr(mode, "value", mode)
    if not isinstance(name, str) or name.lower() not in MODES:
        raise ConfigError(path, f"unknown weight compression mode {mode!r}; expected one of {list(MODES)}")
    return MODES[name.lower()]


def resolve_group_size(in_features: int, group_size: int | None, path: str = "group_size") -> int:
    """The number of columns per group: ``in_features`` for ``None`` / ``-1`` (per output channel),
    else ``group_size``, which must be positive and divide ``in_features`` (``ConfigError``)."""
    if group_size is None or group_size == -1:
        return in_features
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ConfigError(path, f"expected a positive group size, -1 or None, got {group_size!r}")
    if in_features % group_size:
        raise ConfigError(path, f"group size {group_size} does not divide the {in_features} input channels; "
                          "expected a divisor (or -1 / None for one group per output channel)")
    return group_size


def _grouped(weight: Tensor, group_size: int | None) -> Tensor:
    if weight.dim() != 2:
        raise ConfigError("weight", f"expected a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise ConfigError("weight", f"expected a floating-point weight, got {weight.dtype}")
    out, in_features = weight.shape
    g = resolve_group_size(in_features, group_size)
    return weight.detach().to(torch.float32).reshape(out, in_features // g, g)


def compute_scale(weight: Tensor, mode: str, group_size: int | None = None) -> tuple[Tensor, Tensor | None]:
    """``(scale, zero_point)`` of every group, each ``[out, n_groups]`` (module docstring)."""
    spec = mode_spec(mode)
    w = _grouped(weight, group_size)
    if spec.codebook:
        scale = w.abs().amax(dim=-1)
        return torch.where(scale.abs() < EPS, EPS, scale), None
    if spec.asymmetric:
        low, high = w.amin(dim=-1), w.amax(dim=-1)
        scale = (high - low) / (spec.qmax - spec.qmin)
        scale = torch.where(scale.abs() < EPS, EPS, scale)
        zero_point = (spec.qmin - torch.round(low / scale)).clamp(spec.qmin, spec.qmax).to(torch.uint8)
        return scale, zero_point
    factor = 2 ** (spec.bits - 1)
    abs_min, high = w.amin(dim=-1).abs(), w.amax(dim=-1)
    scale = torch.where(abs_min >= high, abs_min, -high) / factor
    return torch.where(scale.abs() < EPS, EPS, scale), None


def quantize_with(weight: Tensor, mode: str, group_size: int | None, scale: Tensor,
                  zero_point: Tensor | None = None) -> Quantized:
    """Quantize ``weight`` with GIVEN per-group ``scale`` (and ``zero_point``, required for the
    asymmetric modes): ``q = clip(round(w / s + z), qmin, qmax)``, or for nf4
    ``q = searchsorted(NF4_CENTERS, w / s)``. Algorithms that refine scales (scale estimation,
    GPTQ) call this with their own ``scale``."""
    spec = mode_spec(mode)
    w = _grouped(weight, group_size)
    out, n_groups, _ = w.shape
    if tuple(scale.shape) != (out, n_groups):
        raise ConfigError("scale", f"expected shape {(out, n_groups)} (one per output channel and group), "
                          f"got {tuple(scale.shape)}")
    if spec.asymmetric != (zero_point is not None):
        raise ConfigError("zero_point", f"mode {spec.name} {'needs' if spec.asymmetric else 'takes no'} zero point")
    s = scale.to(torch.float32).unsqueeze(-1)
    if spec.codebook:
        values = torch.searchsorted(NF4_CENTERS.to(w.device), (w / s).contiguous()).to(torch.uint8)
    else:
        x = w / s
        if zero_point is not None:
            x = x + zero_point.to(torch.float32).unsqueeze(-1)
        values = torch.round(x).clamp(spec.qmin, spec.qmax).to(spec.dtype)
    zp = None if zero_point is None else zero_point.to(torch.uint8)
    return Quantized(values.reshape(out, -1), scale.to(torch.float32), zp)


def quantize(weight: Tensor, mode: str, group_size: int | None = None) -> Quantized:
    """Round-to-nearest quantization of ``weight [out, in]`` in ``mode`` with groups of
    ``group_size`` input columns (module docstring for each mode's formulas)."""
    scale, zero_point = compute_scale(weight, mode, group_size)
    return quantize_with(weight, mode, group_size, scale, zero_point)


def dequantize(values: Tensor, scale: Tensor, zero_point: Tensor | None, mode: str,
               dtype: torch.dtype = torch.float32) -> Tensor:
    """``w' = (q - z) s`` (asymmetric), ``q s`` (symmetric) or ``NF4_LEVELS[q] s`` (nf4), computed in
    float32 from ``values [out, in]`` and ``scale [out, n_groups]`` (any float dtype; the group
    size is ``in / n_groups``), returned in ``dtype``."""
    spec = mode_spec(mode)
    out, in_features = values.shape
    n_groups = scale.shape[-1]
    if tuple(scale.shape) != (out, n_groups) or in_features % n_groups:
        raise ConfigError("scale", f"shape {tuple(scale.shape)} does not fit values of shape {(out, in_features)}")
    q = values.reshape(out, n_groups, in_features // n_groups)
    if spec.codebook:
        x = NF4_LEVELS.to(values.device)[q.long()]
    elif zero_point is not None:
        x = (q.to(torch.int32) - zero_point.to(torch.int32).unsqueeze(-1)).to(torch.float32)
    else:
        x = q.to(torch.float32)
    return (x * scale.to(torch.float32).unsqueeze(-1)).reshape(out, in_features).to(dtype)


def fake_quantize(weight: Tensor, mode: str, group_size: int | None = None) -> Tensor:
    """``dequantize(quantize(weight))`` in the weight's dtype."""
    q = quantize(weight, mode, group_size)
    return dequantize(q.values, q.scale, q.zero_point, mode, dtype=weight.dtype)


def quantization_error(weight: Tensor, mode: str = "int8_asym", group_size: int | None = None,
                       reduction: str = "max_mean") -> float:
    """NNCF's ``get_integer_quantization_error``: ``max_i mean_j (w'_ij - w_ij)^2`` (``max_mean``:
    the worst output channel's mean squared error) or ``||W' - W||_F`` (``frobenius``)."""
    if reduction not in ("max_mean", "frobenius"):
        raise ConfigError("reduction", f"expected 'max_mean' or 'frobenius', got {reduction!r}")
    w = weight.detach().to(torch.float32)
    diff = fake_quantize(w, mode, group_size) - w
    if reduction == "max_mean":
        return float((diff ** 2).mean(dim=1).max())
    return float(torch.linalg.norm(diff))
