"""Quantizer math: hypothesis properties and independent oracles (numpy, torch built-ins)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import purecomp.ops as ops
from purecomp.errors import QuantizerRangeError
from purecomp.ops import (
    asymmetric_levels,
    fake_quantize_asymmetric,
    fake_quantize_asymmetric_reference,
    fake_quantize_symmetric,
    fake_quantize_symmetric_reference,
    symmetric_levels,
)
from purecomp.testing import asymmetric_cases, symmetric_cases

import oracles

PROPERTY = settings(max_examples=150)  # on top of the profile tests/conftest.py loads


def sym(case, x=None):
    return fake_quantize_symmetric(case.x if x is None else x, case.scale, **case.kwargs())


def asym(case, x=None):
    return fake_quantize_asymmetric(case.x if x is None else x, case.input_low, case.input_range, **case.kwargs())


@pytest.fixture(autouse=True, params=["routed", "reference"])
def implementation(request, monkeypatch):
    """Run every test on the public functions as routed (C++ when built) and on the composite."""
    if request.param == "reference":
        monkeypatch.setattr(sys.modules[__name__], "fake_quantize_symmetric", fake_quantize_symmetric_reference)
        monkeypatch.setattr(sys.modules[__name__], "fake_quantize_asymmetric", fake_quantize_asymmetric_reference)
    return request.param


def test_levels_of_table_1():
    assert symmetric_levels(8, signed=True, narrow_range=True) == (-127, 127)
    assert symmetric_levels(8, signed=True, narrow_range=False) == (-128, 127)
    assert symmetric_levels(8, signed=False, narrow_range=False) == (0, 255)
    assert symmetric_levels(8, signed=False, narrow_range=True) == (0, 254)
    assert symmetric_levels(4, signed=True, narrow_range=True) == (-7, 7)
    assert asymmetric_levels(8) == (0, 255)
    assert asymmetric_levels(2) == (0, 3)


@pytest.mark.parametrize("bits", [1, 9, 0, 8.0, True])
def test_bits_outside_2_to_8_raise(bits):
    with pytest.raises(QuantizerRangeError, match="bits"):
        ops.fake_quantize_symmetric(torch.ones(3), torch.tensor(1.0), bits=bits, signed=True, narrow_range=False)


def test_per_channel_parameter_shape_is_checked():
    with pytest.raises(QuantizerRangeError, match=r"shape \(4,\)"):
        ops.fake_quantize_symmetric(torch.ones(2, 4), torch.ones(3), bits=8, signed=True, narrow_range=False, axis=1)
    with pytest.raises(QuantizerRangeError, match="one value"):
        ops.fake_quantize_asymmetric(torch.ones(2, 4), torch.zeros(4), torch.ones(4), bits=8)


# ----------------------------------------------------------------- symmetric properties


@PROPERTY
@given(symmetric_cases())
def test_symmetric_equals_numpy_oracle_bit_for_bit(case):
    expected = oracles.symmetric(case.x.numpy(), case.scale.numpy(), *case.levels, axis=case.axis)
    np.testing.assert_array_equal(sym(case).numpy(), expected)


@PROPERTY
@given(symmetric_cases())
def test_symmetric_outputs_lie_on_the_integer_grid_within_range(case):
    ql, qh = case.levels
    scale = case.scale if case.axis is None else case.scale.reshape(1, -1)
    step = (scale.abs() + 1e-16) / qh
    q = sym(case).double() / step.double()  # float division re-rounds: compare within 1e-4 levels
    assert torch.allclose(q, torch.round(q), rtol=0, atol=1e-4)
    assert (torch.round(q) >= ql).all() and (torch.round(q) <= qh).all()


@PROPERTY
@given(symmetric_cases())
def test_symmetric_is_idempotent(case):
    once = sym(case)
    assert torch.equal(sym(case, once), once)


@PROPERTY
@given(symmetric_cases())
def test_symmetric_maps_zero_to_zero_and_clamps(case):
    ql, qh = case.levels
    scale = case.scale if case.axis is None else case.scale.reshape(1, -1)
    zeros = sym(case, torch.zeros_like(case.x))
    assert torch.equal(zeros, torch.zeros_like(zeros))
    huge = sym(case, torch.full_like(case.x, 1e6))
    tiny = sym(case, torch.full_like(case.x, -1e6))
    s = scale.abs() + 1e-16
    assert torch.allclose(huge, (s / qh * qh).expand_as(huge))
    assert torch.allclose(tiny, (s / qh * ql).expand_as(tiny))


@PROPERTY
@given(symmetric_cases(per_channel=False))
def test_symmetric_is_monotone(case):
    xs = torch.sort(case.x.reshape(-1)).values
    out = sym(case, xs)
    assert (out[1:] >= out[:-1]).all()


@PROPERTY
@given(symmetric_cases(per_channel=True))
def test_per_channel_equals_per_tensor_when_channels_share_a_scale(case):
    shared = case.scale[0]
    per_channel = fake_quantize_symmetric(case.x, shared.expand_as(case.scale).clone(), **case.kwargs())
    kwargs = case.kwargs() | {"axis": None}
    per_tensor = fake_quantize_symmetric(case.x, shared, **kwargs)
    assert torch.equal(per_channel, per_tensor)


@PROPERTY
@given(symmetric_cases(), st.integers(0, 2**31 - 1))
def test_symmetric_gradients_per_region_match_numpy(case, seed):
    g = torch.randn(case.x.shape, generator=torch.Generator().manual_seed(seed))
    x = case.x.clone().requires_grad_(True)
    scale = case.scale.clone().requires_grad_(True)
    out = fake_quantize_symmetric(x, scale, **case.kwargs())
    out.backward(g)
    _, dx, ds = oracles.symmetric(case.x.numpy(), case.scale.numpy(), *case.levels, axis=case.axis, grad=g.numpy())
    np.testing.assert_array_equal(x.grad.numpy(), dx.astype(np.float32))
    np.testing.assert_allclose(scale.grad.numpy(), ds, rtol=1e-4, atol=1e-4)


def test_symmetric_scale_gradient_regions_exactly():
    scale = torch.tensor(1.0, requires_grad=True)  # signed 8-bit narrow: ql=-127, qh=127
    x = torch.tensor([5.0, -5.0, 0.3])
    for value, expected in [(5.0, 1.0), (-5.0, -1.0), (0.0, 0.0)]:
        scale.grad = None
        fake_quantize_symmetric(torch.tensor([value]), scale, bits=8, signed=True, narrow_range=True).sum().backward()
        assert scale.grad.item() == pytest.approx(expected)
    scale.grad = None
    out = fake_quantize_symmetric(x[2:], scale, bits=8, signed=True, narrow_range=True)
    out.sum().backward()
    assert scale.grad.item() == pytest.approx((out.item() - 0.3) / 1.0, abs=1e-7)


# ----------------------------------------------------------------- asymmetric properties


@PROPERTY
@given(asymmetric_cases())
def test_asymmetric_equals_numpy_oracle_bit_for_bit(case):
    expected = oracles.asymmetric(case.x.numpy(), case.input_low.numpy(), case.input_range.numpy(), case.bits, axis=case.axis)
    np.testing.assert_array_equal(asym(case).numpy(), expected)


@PROPERTY
@given(asymmetric_cases())
def test_asymmetric_range_adjustment_puts_zero_on_an_integer_level(case):
    n = 2**case.bits - 1
    low, rng = oracles.adjust_range(case.input_low.numpy(), np.abs(case.input_range.numpy()) + oracles.EPS, n)
    steps = -low.astype(np.float64) / (rng.astype(np.float64) / n)
    z = np.round(steps)
    interior = (z > 0) & (z < n)  # z of 0 or n keeps [l1, h1] (MATH.md); zero is then within half a step of an end
    np.testing.assert_allclose(steps[interior], z[interior], atol=1e-3)
    assert (np.abs(steps - z)[~interior] <= 0.5 + 1e-6).all()
    assert (low <= 0).all() and (low + rng >= 0).all()
    # the adjusted range still covers the original one (MATH.md: larger-span candidate)
    orig_low = np.minimum(case.input_low.numpy(), 0)
    orig_high = np.maximum(case.input_low.numpy() + np.abs(case.input_range.numpy()), 0)
    assert (low <= orig_low + 1e-5 * np.abs(orig_low) + 1e-6).all()
    assert (low + rng >= orig_high - 1e-5 * np.abs(orig_high) - 1e-6).all()


@PROPERTY
@given(asymmetric_cases())
def test_asymmetric_zero_maps_exactly_to_zero_and_is_idempotent(case):
    zeros = asym(case, torch.zeros_like(case.x))
    assert torch.equal(zeros, torch.zeros_like(zeros))
    once = asym(case)
    assert torch.allclose(asym(case, once), once, rtol=0, atol=1e-6)


@PROPERTY
@given(asymmetric_cases(per_channel=False))
def test_asymmetric_is_monotone_and_on_grid(case):
    xs = torch.sort(case.x.reshape(-1)).values
    out = asym(case, xs)
    assert (out[1:] >= out[:-1]).all()
    n = 2**case.bits - 1
    low, rng = oracles.adjust_range(case.input_low.numpy(), np.abs(case.input_range.numpy()) + oracles.EPS, n)
    q = out.numpy().astype(np.float64) / (float(rng) / n)
    np.testing.assert_allclose(q, np.round(q), atol=1e-3)


@PROPERTY
@given(asymmetric_cases(), st.integers(0, 2**31 - 1))
def test_asymmetric_gradients_per_region_match_numpy(case, seed):
    g = torch.randn(case.x.shape, generator=torch.Generator().manual_seed(seed))
    x = case.x.clone().requires_grad_(True)
    low = case.input_low.clone().requires_grad_(True)
    rng = case.input_range.clone().requires_grad_(True)
    fake_quantize_asymmetric(x, low, rng, **case.kwargs()).backward(g)
    _, dx, dlow, drange = oracles.asymmetric(
        case.x.numpy(), case.input_low.numpy(), case.input_range.numpy(), case.bits, axis=case.axis, grad=g.numpy()
    )
    np.testing.assert_array_equal(x.grad.numpy(), dx.astype(np.float32))
    np.testing.assert_allclose(low.grad.numpy(), dlow, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(rng.grad.numpy(), drange, rtol=1e-4, atol=1e-3)


# ----------------------------------------------------------------- torch's built-in fake quantize


@PROPERTY
@given(symmetric_cases(per_channel=False), st.integers(-8, 2))
def test_symmetric_equals_torch_fake_quantize_per_tensor(case, exponent):
    ql, qh = case.levels
    step = 2.0**exponent  # exact reciprocal: x * (1/step) == x / step
    scale = torch.tensor(step * qh)
    x = case.x / case.scale * scale  # same grid positions, new scale
    ours = fake_quantize_symmetric(x, scale, **case.kwargs())
    theirs = torch.fake_quantize_per_tensor_affine(x, step, 0, ql, qh)
    assert torch.equal(ours, theirs)


@PROPERTY
@given(symmetric_cases(per_channel=True), st.integers(-8, 2))
def test_symmetric_equals_torch_fake_quantize_per_channel(case, exponent):
    ql, qh = case.levels
    steps = torch.tensor([2.0 ** (exponent - c) for c in range(case.x.shape[1])])
    scale = steps * qh
    x = case.x / case.scale * scale
    ours = fake_quantize_symmetric(x, scale, **case.kwargs())
    theirs = torch.fake_quantize_per_channel_affine(x, steps, torch.zeros(len(steps), dtype=torch.int32), 1, ql, qh)
    assert torch.equal(ours, theirs)


@PROPERTY
@given(st.integers(2, 8), st.integers(-6, 0), st.data())
def test_asymmetric_equals_torch_fake_quantize_on_a_zero_aligned_grid(bits, exponent, data):
    n = 2**bits - 1
    step = 2.0**exponent
    # torch (like ONNX QuantizeLinear) rounds x/step and then adds the zero point; MATH.md rounds
    # (x - low)/step. The two agree except at exact ties with an odd zero point.
    zero_point = 2 * data.draw(st.integers(0, n // 2))
    low = torch.tensor(-zero_point * step)
    rng = torch.tensor(n * step)
    ks = torch.tensor(data.draw(st.lists(st.integers(-3 * 2, (n + 3) * 2), min_size=1, max_size=32)))
    x = ks.float() * (step / 2) + low  # grid points (even k) and exact ties (odd k)
    ours = fake_quantize_asymmetric(x, low, rng, bits=bits)
    theirs = torch.fake_quantize_per_tensor_affine(x, step, zero_point, 0, n)
    # the range adjustment's float arithmetic (t = (z - n) / z, h2 = t * l1) may move an
    # already aligned range by an ulp: grid points keep their level (values within 1e-6
    # relative); an exact tie may then round to either neighbour
    on_grid = ks % 2 == 0
    assert torch.equal(torch.round(ours / step)[on_grid], torch.round(theirs / step)[on_grid])
    assert torch.allclose(ours[on_grid], theirs[on_grid], rtol=1e-6, atol=0)
    assert ((ours - theirs).abs()[~on_grid] <= step * (1 + 1e-4)).all()
