"""Hypothesis strategies for quantizer math, for purecomp's tests and its users' tests.

``symmetric_cases()`` / ``asymmetric_cases()`` draw a quantizer's parameters together with an
input tensor whose values sit on grid points, exactly between grid points (ties), on and
beyond the range ends, and in between.
"""

from __future__ import annotations

import dataclasses

import torch
from hypothesis import strategies as st
from torch import Tensor

from purecomp.ops.levels import asymmetric_levels, symmetric_levels


@dataclasses.dataclass(frozen=True)
class SymmetricCase:
    x: Tensor
    scale: Tensor
    bits: int
    signed: bool
    narrow_range: bool
    axis: int | None

    @property
    def levels(self) -> tuple[int, int]:
        return symmetric_levels(self.bits, self.signed, self.narrow_range)

    def kwargs(self) -> dict:
        return dict(bits=self.bits, signed=self.signed, narrow_range=self.narrow_range, axis=self.axis)


@dataclasses.dataclass(frozen=True)
class AsymmetricCase:
    x: Tensor
    input_low: Tensor
    input_range: Tensor
    bits: int
    axis: int | None

    @property
    def levels(self) -> tuple[int, int]:
        return asymmetric_levels(self.bits)

    def kwargs(self) -> dict:
        return dict(bits=self.bits, axis=self.axis)


def bit_widths() -> st.SearchStrategy[int]:
    return st.integers(min_value=2, max_value=8)


def positive_scales(channels: int) -> st.SearchStrategy[Tensor]:
    """Scales between 2^-6 and 2^6, a mix of powers of two and arbitrary values."""
    one = st.one_of(
        st.integers(-6, 6).map(lambda e: 2.0**e),
        st.floats(min_value=2.0**-6, max_value=2.0**6, allow_nan=False, width=32),
    )
    return st.lists(one, min_size=channels, max_size=channels).map(lambda v: torch.tensor(v, dtype=torch.float32))


def _grid_values(draw: st.DrawFn, low: float, high: float, step: float, count: int) -> list[float]:
    """Values on grid points, on half steps, on the ends, outside the range, and anywhere."""
    levels_span = int(round((high - low) / step))
    k = st.integers(-3, levels_span + 3)
    value = st.one_of(
        k.map(lambda i: low + i * step),
        k.map(lambda i: low + (i + 0.5) * step),
        st.sampled_from([low, high, 0.0, low - step, high + step]),
        st.floats(min_value=low - 4 * step, max_value=high + 4 * step, allow_nan=False),
    )
    return draw(st.lists(value, min_size=count, max_size=count))


@st.composite
def symmetric_cases(draw: st.DrawFn, per_channel: bool | None = None, max_size: int = 24) -> SymmetricCase:
    bits = draw(bit_widths())
    signed = draw(st.booleans())
    narrow = draw(st.booleans())
    channel = draw(st.booleans()) if per_channel is None else per_channel
    channels = draw(st.integers(1, 4)) if channel else 1
    rows = draw(st.integers(1, max(1, max_size // channels)))
    scale = draw(positive_scales(channels))
    ql, qh = symmetric_levels(bits, signed, narrow)
    columns = []
    for c in range(channels):
        s = float(scale[c])
        columns.append(_grid_values(draw, s * ql / qh, s, s / qh, rows))
    x = torch.tensor(columns, dtype=torch.float32).T.contiguous()  # (rows, channels)
    axis = 1 if channel else None
    return SymmetricCase(x, scale if channel else scale.reshape(()), bits, signed, narrow, axis)


@st.composite
def asymmetric_cases(draw: st.DrawFn, per_channel: bool | None = None, max_size: int = 24) -> AsymmetricCase:
    bits = draw(bit_widths())
    channel = draw(st.booleans()) if per_channel is None else per_channel
    channels = draw(st.integers(1, 4)) if channel else 1
    rows = draw(st.integers(1, max(1, max_size // channels)))
    lows = draw(st.lists(st.floats(-8, 4, allow_nan=False), min_size=channels, max_size=channels))
    ranges = draw(st.lists(st.floats(0.05, 16, allow_nan=False), min_size=channels, max_size=channels))
    n = 2**bits - 1
    columns = [_grid_values(draw, lo, lo + r, r / n, rows) for lo, r in zip(lows, ranges)]
    x = torch.tensor(columns, dtype=torch.float32).T.contiguous()
    low = torch.tensor(lows, dtype=torch.float32)
    rng = torch.tensor(ranges, dtype=torch.float32)
    if not channel:
        low, rng = low.reshape(()), rng.reshape(())
    return AsymmetricCase(x, low, rng, bits, 1 if channel else None)
