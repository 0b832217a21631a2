"""The weight grids (``purecomp.transforms.weight_compression.grid``): hypothesis properties of
every mode (integers in range, error within half a step, exact on the grid, idempotent) and an
independent NumPy transcription of NNCF 3.x's reference ``weight_lowering.py`` as the oracle."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from purecomp.errors import ConfigError
from purecomp.transforms.weight_compression import grid
from purecomp.transforms.weight_compression.grid import MODES

INT_MODES = ["int8_asym", "int8_sym", "int4_asym", "int4_sym"]
ALL_MODES = [*INT_MODES, "nf4"]

# NNCF v3.1.0 constants.py, typed in again from the source for the oracle
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0], dtype=np.float32)
NF4_MID = np.array([-0.84809643, -0.6106329, -0.45999527, -0.33967942, -0.2346074, -0.13791174, -0.045525018,
                    0.03979015, 0.120255254, 0.20352125, 0.29201376, 0.38931254, 0.5016634, 0.6427869, 0.8614784],
                   dtype=np.float32)


def nncf_oracle(w: np.ndarray, mode: str, group_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """NNCF's reference path in NumPy: ``reshape_weight_for_grouped_quantization``,
    ``calculate_integer_quantization_params`` / ``_calculate_signed_scale`` /
    ``calculate_float_quantization_params``, then ``_calculate_integer_quantized_weight`` or the NF4
    ``searchsorted``. Returns ``(values [out, in], scale [out, n_groups], zero_point or None)``."""
    out, cin = w.shape
    g = cin if group_size == -1 else group_size
    x = w.astype(np.float32).reshape(out, cin // g, g)
    eps = np.finfo(np.float32).eps
    bits = 8 if mode.startswith("int8") else 4
    if mode == "nf4":
        s = np.max(np.abs(x), axis=2, keepdims=True)
        s = np.where(np.abs(s) < eps, eps, s)
        q = np.searchsorted(NF4_MID, x / s)
        return q.reshape(out, cin).astype(np.uint8), s[..., 0], None
    if mode.endswith("asym"):
        lo, hi = np.min(x, axis=2, keepdims=True), np.max(x, axis=2, keepdims=True)
        s = ((hi - lo) / np.float32(2**bits - 1)).astype(np.float32)
        s = np.where(np.abs(s) < eps, eps, s)
        # NNCF casts to int32 before clipping; for a constant group (s = eps) with |min| >= 2^31 eps
        # that cast overflows, so the oracle clips first (the same value wherever NNCF's is defined)
        z = np.clip(0 - np.round(lo / s), 0, 2**bits - 1).astype(np.int32)
        q = np.clip(np.round(x / s + z.astype(np.float32)), 0, 2**bits - 1).astype(np.uint8)
        return q.reshape(out, cin), s[..., 0], z[..., 0].astype(np.uint8)
    factor = np.float32(2 ** (bits - 1))
    abs_min, hi = np.abs(np.min(x, axis=2, keepdims=True)), np.max(x, axis=2, keepdims=True)
    s = np.where(abs_min >= hi, abs_min, -hi) / factor
    s = np.where(np.abs(s) < eps, eps, s).astype(np.float32)
    q = np.clip(np.round(x / s), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1).astype(np.int8)
    return q.reshape(out, cin), s[..., 0], None


@st.composite
def weights(draw: st.DrawFn, max_abs: float = 1e3) -> tuple[np.ndarray, int]:
    """A float32 ``[out, n_groups * g]`` weight and its group size (-1 now and then)."""
    out = draw(st.integers(1, 4))
    n_groups = draw(st.integers(1, 3))
    g = draw(st.sampled_from([1, 2, 3, 8, 16]))
    elements = st.floats(-max_abs, max_abs, width=32, allow_nan=False, allow_infinity=False, allow_subnormal=False)
    w = draw(hnp.arrays(np.float32, (out, n_groups * g), elements=elements))
    group_size = -1 if n_groups == 1 and draw(st.booleans()) else g
    return w, group_size


def groups(t: torch.Tensor, n_groups: int) -> torch.Tensor:
    return t.reshape(t.shape[0], n_groups, -1)


@pytest.mark.parametrize("mode", ALL_MODES)
@settings(max_examples=60, deadline=None)
@given(case=weights())
def test_matches_nncf_reference_oracle(mode: str, case: tuple[np.ndarray, int]) -> None:
    w, g = case
    q = grid.quantize(torch.from_numpy(w), mode, g)
    values, scale, zero_point = nncf_oracle(w, mode, g)
    np.testing.assert_array_equal(q.values.numpy(), values)
    np.testing.assert_array_equal(q.scale.numpy(), scale)
    if zero_point is None:
        assert q.zero_point is None
    else:
        np.testing.assert_array_equal(q.zero_point.numpy(), zero_point)


@pytest.mark.parametrize("mode", ALL_MODES)
@settings(max_examples=60, deadline=None)
@given(case=weights())
def test_integers_in_range(mode: str, case: tuple[np.ndarray, int]) -> None:
    w, g = case
    spec = MODES[mode]
    q = grid.quantize(torch.from_numpy(w), mode, g)
    assert q.values.dtype == spec.dtype and q.values.shape == w.shape
    assert int(q.values.min()) >= spec.qmin and int(q.values.max()) <= spec.qmax
    if q.zero_point is not None:
        assert q.zero_point.dtype == torch.uint8
        assert int(q.zero_point.max()) <= spec.qmax


def _step_bound(w: torch.Tensor, wq: torch.Tensor, scale: torch.Tensor, n_groups: int, steps: float) -> None:
    err = groups((wq - w).abs(), n_groups)
    bound = steps * scale.abs().unsqueeze(-1) * (1 + 1e-5) + 1e-6 * groups(w.abs(), n_groups)
    assert bool((err <= bound).all()), float((err - bound).max())


@pytest.mark.parametrize("mode", ["int8_asym", "int4_asym"])
@settings(max_examples=80, deadline=None)
@given(case=weights())
def test_asym_error_within_half_step_when_group_contains_zero(mode: str, case: tuple[np.ndarray, int]) -> None:
    w, g = case
    t = torch.from_numpy(w)
    q = grid.quantize(t, mode, g)
    n = q.scale.shape[1]
    assume(bool(((groups(t, n).amin(-1) <= 0) & (groups(t, n).amax(-1) >= 0)).all()))
    _step_bound(t, grid.dequantize(*q, mode), q.scale, n, 0.5)


def test_asym_group_without_zero_loses_its_far_end_as_in_nncf() -> None:
    """NNCF does not widen the range to 0: an all-positive group clips its zero point to 0 and
    its largest values to the top level (error far beyond half a step)."""
    w = torch.tensor([[10.0, 11.0, 12.0, 25.0]])
    q = grid.quantize(w, "int4_asym", None)
    assert int(q.zero_point) == 0 and float(q.scale) == 1.0
    assert grid.dequantize(*q, "int4_asym").tolist() == [[10.0, 11.0, 12.0, 15.0]]


@pytest.mark.parametrize("mode", ["int8_sym", "int4_sym"])
@settings(max_examples=80, deadline=None)
@given(case=weights())
@example(case=(np.array([[1.0, -1.0, 1.0, 1.0]], dtype=np.float32), 2))  # a tie |min| == max
def test_sym_error_half_step_inside_the_grid_one_step_at_the_clipped_end(mode: str, case: tuple[np.ndarray, int]) -> None:
    w, g = case
    spec = MODES[mode]
    t = torch.from_numpy(w)
    q = grid.quantize(t, mode, g)
    n = q.scale.shape[1]
    wq = grid.dequantize(*q, mode)
    _step_bound(t, wq, q.scale, n, 1.0)
    ratio = groups(t, n) / q.scale.unsqueeze(-1)
    inside = (ratio >= spec.qmin - 0.5) & (ratio <= spec.qmax + 0.5)
    err = groups((wq - t).abs(), n)
    half = 0.5 * q.scale.abs().unsqueeze(-1) * (1 + 1e-5) + 1e-6 * groups(t.abs(), n)
    assert bool((err <= half)[inside].all())
    # the element of largest magnitude sits exactly on level -2^(b-1) and comes back exactly, except
    # in a group of one repeated positive value v (|min| >= max picks s = v / 2^(b-1): v clips to qmax);
    # on a tie |min| == max the scale comes from the minimum, so the minimum is the one on qmin
    grouped = groups(t, n)
    min_wins = grouped.amin(-1, keepdim=True).abs() >= grouped.amax(-1, keepdim=True)
    biggest = torch.where(min_wins, grouped.argmin(-1, keepdim=True), grouped.argmax(-1, keepdim=True))
    positive_constant = (groups(t, n).amin(-1) == groups(t, n).amax(-1)) & (groups(t, n).amin(-1) > 0)
    nonzero = (groups(t, n).abs().amax(-1) > grid.EPS * 2 ** (spec.bits - 1)) & ~positive_constant
    assert bool((groups(q.values, n).gather(-1, biggest)[..., 0] == spec.qmin)[nonzero].all())
    assert torch.equal(groups(wq, n).gather(-1, biggest)[nonzero], groups(t, n).gather(-1, biggest)[nonzero])


@settings(max_examples=80, deadline=None)
@given(case=weights())
def test_nf4_picks_the_nearest_level(case: tuple[np.ndarray, int]) -> None:
    w, g = case
    t = torch.from_numpy(w)
    q = grid.quantize(t, "nf4", g)
    n = q.scale.shape[1]
    x = (groups(t, n) / q.scale.unsqueeze(-1)).unsqueeze(-1)
    distances = (x - grid.NF4_LEVELS).abs()
    chosen = distances.gather(-1, groups(q.values, n).long().unsqueeze(-1))[..., 0]
    assert bool((chosen <= distances.amin(-1) + 1e-6).all())


@pytest.mark.parametrize("mode", ALL_MODES)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(case=weights())
def test_idempotent(mode: str, case: tuple[np.ndarray, int]) -> None:
    """Quantizing the dequantized weight gives the same integers (asymmetric groups: when they use
    both end levels, so the requantized range is the same; symmetric ones: unless a group becomes
    one repeated positive value, which the signed-scale rule clips, see the test above)."""
    w, g = case
    spec = MODES[mode]
    q = grid.quantize(torch.from_numpy(w), mode, g)
    n = q.scale.shape[1]
    assume(bool((q.scale.abs() > grid.EPS).all()))
    wq = groups(grid.dequantize(*q, mode), n)
    assume(not bool(((wq.amin(-1) == wq.amax(-1)) & (wq.amin(-1) > 0)).any()))
    if spec.asymmetric:
        assume(bool(((groups(q.values, n).amin(-1) == 0) & (groups(q.values, n).amax(-1) == spec.qmax)).all()))
    again = grid.quantize(grid.dequantize(*q, mode), mode, g)
    assert torch.equal(again.values, q.values)
    if spec.asymmetric:
        assert torch.equal(again.zero_point, q.zero_point)


@pytest.mark.parametrize("mode", ALL_MODES)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_exact_for_values_on_the_grid(mode: str, data: st.DataObject) -> None:
    """A weight built on a grid (using the extreme levels that define the scale) comes back exactly.
    Asymmetric scales are powers of two so that ``(max - min) / (2^b - 1)`` is exact in float32."""
    spec = MODES[mode]
    out, n_groups, g = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3)), data.draw(st.integers(2, 8))
    q = torch.tensor(data.draw(hnp.arrays(np.int64, (out, n_groups, g), elements=st.integers(spec.qmin, spec.qmax))))
    if spec.asymmetric:
        s = 2.0 ** torch.tensor(data.draw(hnp.arrays(np.int64, (out, n_groups, 1), elements=st.integers(-8, 8))))
        z = torch.tensor(data.draw(hnp.arrays(np.int64, (out, n_groups, 1), elements=st.integers(0, spec.qmax))))
        q[..., 0], q[..., 1] = 0, spec.qmax
        w = ((q - z) * s).float()
    else:
        s = torch.tensor(data.draw(hnp.arrays(np.float32, (out, n_groups, 1),
                                              elements=st.floats(0.0009765625, 1024.0, width=32)))).float()
        signs = st.sampled_from([1]) if spec.codebook else st.sampled_from([-1, 1])  # NF4 levels are not symmetric
        sign = torch.tensor(data.draw(hnp.arrays(np.int64, (out, n_groups, 1), elements=signs)))
        q[..., 0] = 0 if spec.codebook else spec.qmin  # the extreme: NF4 index 0 is -1, int level -2^(b-1)
        if not spec.codebook:
            q[..., 1] = 0  # not one repeated value (a repeated positive value is off NNCF's grid, see above)
        levels = grid.NF4_LEVELS[q] if spec.codebook else q.float()
        w = levels * s * sign
    w = w.reshape(out, n_groups * g)
    assert torch.equal(grid.fake_quantize(w, mode, g), w)


def test_group_size_and_mode_errors() -> None:
    w = torch.randn(4, 12)
    with pytest.raises(ConfigError, match="int2.*expected one of"):
        grid.quantize(w, "int2", None)
    with pytest.raises(ConfigError, match="does not divide the 12 input channels"):
        grid.quantize(w, "int4_sym", 8)
    with pytest.raises(ConfigError, match="positive group size"):
        grid.quantize(w, "int4_sym", 0)
    with pytest.raises(ConfigError, match="2-D weight"):
        grid.quantize(torch.randn(2, 3, 4), "int8_asym", None)
    assert grid.quantize(w, "int4_sym", -1).scale.shape == (4, 1)
    assert grid.quantize(w, "int4_sym", 4).scale.shape == (4, 3)


def test_quantization_error_matches_its_definition() -> None:
    w = torch.randn(6, 16, generator=torch.Generator().manual_seed(0))
    diff = grid.fake_quantize(w, "int8_asym") - w
    assert grid.quantization_error(w) == pytest.approx(float((diff ** 2).mean(1).max()))
    assert grid.quantization_error(w, reduction="frobenius") == pytest.approx(float(diff.norm()))


def test_sym_group_of_one_repeated_positive_value_clips_as_in_nncf() -> None:
    """``|min| >= max`` picks the positive scale ``v / 8``: ``v / s = 8`` clips to level 7."""
    w = torch.tensor([[1.0, 1.0]])
    assert grid.fake_quantize(w, "int4_sym").tolist() == [[0.875, 0.875]]
    assert grid.fake_quantize(-w, "int4_sym").tolist() == [[-1.0, -1.0]]
