"""The C++ fake-quantize kernels against the reference composite, numpy, and under transforms."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from purecomp.errors import ConfigError
from purecomp.ops import (
    asymmetric_levels,
    build,
    fake_quantize_asymmetric,
    fake_quantize_symmetric,
    record_paths,
    symmetric_levels,
)
from purecomp.ops.reference import (
    EPS,
    adjust_asymmetric_range,
    fake_quantize_asymmetric_reference,
    fake_quantize_symmetric_reference,
)
from purecomp.testing import asymmetric_cases, symmetric_cases

import oracles

if not build.cpp_available():
    pytest.skip(f"purecomp C++ ops unavailable: {build.build_error()!r}", allow_module_level=True)

P = torch.ops.purecomp
CASES = settings(deadline=None, max_examples=120)
REDUCED = (torch.float16, torch.bfloat16)


def bits_of(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def assert_bit_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert torch.equal(bits_of(actual.contiguous()), bits_of(expected.contiguous())), (
        (actual - expected).abs().max()
    )


def sym_cpp(x, scale, bits, signed, narrow_range, axis=None):
    return P.fake_quantize_symmetric(x, scale, *symmetric_levels(bits, signed, narrow_range), axis)


def asym_cpp(x, low, rng, bits, axis=None):
    return P.fake_quantize_asymmetric(x, low, rng, asymmetric_levels(bits)[1], axis)


def grads(fn, inputs, g):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    return torch.autograd.grad(fn(*inputs), inputs, g)


def assert_param_grad_close(actual, expected, g):
    """Parameter gradients are sums of terms bounded by ~|g|: float error scales with sum(|g|)."""
    tol = 1e-6 * max(float(g.float().abs().sum()), 1.0)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=tol, equal_nan=True)


# ----------------------------------------------------------------- forward: bit for bit


@CASES
@given(symmetric_cases(max_size=64))
def test_symmetric_forward_equals_reference_bit_for_bit(case):
    out = sym_cpp(case.x, case.scale, case.bits, case.signed, case.narrow_range, case.axis)
    assert_bit_equal(out, fake_quantize_symmetric_reference(case.x, case.scale, **case.kwargs()))
    np.testing.assert_array_equal(
        out.numpy(),
        oracles.symmetric(case.x.numpy(), case.scale.numpy(), *case.levels, axis=case.axis),
    )


@CASES
@given(asymmetric_cases(max_size=64))
def test_asymmetric_forward_equals_reference_bit_for_bit(case):
    out = asym_cpp(case.x, case.input_low, case.input_range, case.bits, case.axis)
    assert_bit_equal(
        out,
        fake_quantize_asymmetric_reference(
            case.x, case.input_low, case.input_range, **case.kwargs()
        ),
    )
    expected = oracles.asymmetric(
        case.x.numpy(), case.input_low.numpy(), case.input_range.numpy(), case.bits, axis=case.axis
    )
    np.testing.assert_array_equal(out.numpy(), expected)


@pytest.mark.parametrize(
    "signed,narrow_range", [(True, False), (True, True), (False, False), (False, True)]
)
def test_symmetric_exact_ties_round_half_to_even(signed, narrow_range):
    ql, qh = symmetric_levels(8, signed, narrow_range)
    step = 2.0**-4
    scale = torch.tensor(qh * step)  # s = scale exactly (EPS is absorbed), so step = 2^-4 exactly
    k = torch.arange(ql - 3, qh + 3, dtype=torch.float32)
    x = torch.cat([(k + 0.5) * step, k * step, torch.tensor([ql * step, qh * step, -0.0, 0.0])])
    out = sym_cpp(x, scale, 8, signed, narrow_range)
    assert_bit_equal(
        out,
        fake_quantize_symmetric_reference(
            x, scale, bits=8, signed=signed, narrow_range=narrow_range
        ),
    )
    expected = np.clip(np.round(x.numpy() / step), ql, qh) * step  # numpy rounds half to even
    np.testing.assert_array_equal(out.numpy(), expected)
    halves = torch.tensor([0.5, 1.5, 2.5, 3.5]) * step
    assert sym_cpp(halves, scale, 8, signed, narrow_range).div(step).tolist() == [
        0.0,
        2.0,
        2.0,
        4.0,
    ]
    if signed:
        assert sym_cpp(-halves, scale, 8, signed, narrow_range).div(step).tolist() == [
            0.0,
            -2.0,
            -2.0,
            -4.0,
        ]


def test_asymmetric_exact_ties_and_range_ends():
    step = 2.0**-5
    low, rng = torch.tensor(0.0), torch.tensor(255 * step)  # zero is already a level: no adjustment
    k = torch.arange(-3, 258, dtype=torch.float32)
    x = torch.cat(
        [(k + 0.5) * step, k * step, torch.tensor([0.0, 255 * step, -step / 2, 255.5 * step])]
    )
    out = asym_cpp(x, low, rng, 8)
    assert_bit_equal(out, fake_quantize_asymmetric_reference(x, low, rng, bits=8))
    np.testing.assert_array_equal(out.numpy(), np.clip(np.round(x.numpy() / step), 0, 255) * step)


@CASES
@given(symmetric_cases(max_size=64), st.sampled_from(REDUCED))
def test_symmetric_reduced_precision_within_one_step(case, dtype):
    x = case.x.to(dtype)
    out = sym_cpp(x, case.scale, case.bits, case.signed, case.narrow_range, case.axis)
    ref = fake_quantize_symmetric_reference(x, case.scale, **case.kwargs())
    assert out.dtype == dtype
    step = (case.scale.abs() + EPS) / case.levels[1]
    assert ((out.float() - ref.float()).abs() <= step).all()


@CASES
@given(asymmetric_cases(max_size=64), st.sampled_from(REDUCED))
def test_asymmetric_reduced_precision_within_one_step(case, dtype):
    x = case.x.to(dtype)
    out = asym_cpp(x, case.input_low, case.input_range, case.bits, case.axis)
    ref = fake_quantize_asymmetric_reference(x, case.input_low, case.input_range, **case.kwargs())
    assert out.dtype == dtype
    _, rng = adjust_asymmetric_range(case.input_low, case.input_range.abs() + EPS, case.levels[1])
    assert ((out.float() - ref.float()).abs() <= rng / case.levels[1]).all()


# ----------------------------------------------------------------- gradients

AXES = [None, 0, 1]


def _params(axis, shape, gen, kind):
    channels = 1 if axis is None else shape[axis]
    if kind == "sym":
        sign = torch.where(
            torch.rand(channels, generator=gen) < 0.25, -1.0, 1.0
        )  # some negative scales
        return ((torch.rand(channels, generator=gen) * 2 + 0.2) * sign,)
    return (
        torch.randn(channels, generator=gen) - 0.5,
        torch.rand(channels, generator=gen) * 3 + 0.1,
    )


@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("signed", [True, False])
def test_symmetric_gradients_match_reference_and_numpy(axis, dtype, signed):
    gen = torch.Generator().manual_seed(1)
    shape = torch.Size((6, 5, 70))
    x = (torch.randn(shape, generator=gen) * 1.5).to(dtype)
    g = torch.randn(shape, generator=gen).to(dtype)
    (scale,) = _params(axis, shape, gen, "sym")
    kw = dict(bits=4, signed=signed, narrow_range=False, axis=axis)
    with record_paths() as paths:
        gx, gs = grads(lambda x, s: fake_quantize_symmetric(x, s, **kw), (x, scale), g)
    assert paths == ["cpp"]
    rx, rs = grads(lambda x, s: fake_quantize_symmetric_reference(x, s, **kw), (x, scale), g)
    assert torch.equal(gx, rx)
    assert_param_grad_close(gs, rs, g)
    _, nx, ns = oracles.symmetric(
        x.float().numpy(),
        scale.abs().numpy(),
        *symmetric_levels(4, signed, False),
        axis=axis,
        grad=g.float().numpy(),
    )
    np.testing.assert_array_equal(gx.float().numpy(), nx)
    assert_param_grad_close(gs, torch.from_numpy(ns).float().reshape(gs.shape) * scale.sign(), g)


@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_asymmetric_gradients_match_reference_and_numpy(axis, dtype):
    gen = torch.Generator().manual_seed(2)
    shape = torch.Size((6, 5, 70))
    x = (torch.randn(shape, generator=gen) * 2).to(dtype)
    g = torch.randn(shape, generator=gen).to(dtype)
    low, rng = _params(axis, shape, gen, "asym")
    with record_paths() as paths:
        gx, gl, gr = grads(
            lambda x, lo, r: fake_quantize_asymmetric(x, lo, r, bits=5, axis=axis), (x, low, rng), g
        )
    assert paths == ["cpp"]
    rx, rl, rr = grads(
        lambda x, lo, r: fake_quantize_asymmetric_reference(x, lo, r, bits=5, axis=axis),
        (x, low, rng),
        g,
    )
    assert torch.equal(gx, rx)
    assert_param_grad_close(gl, rl, g)
    assert_param_grad_close(gr, rr, g)
    _, nx, nl, nr = oracles.asymmetric(
        x.float().numpy(), low.numpy(), rng.numpy(), 5, axis=axis, grad=g.float().numpy()
    )
    np.testing.assert_array_equal(gx.float().numpy(), nx)
    assert_param_grad_close(gl, torch.from_numpy(nl).float().reshape(gl.shape), g)
    assert_param_grad_close(gr, torch.from_numpy(nr).float().reshape(gr.shape), g)


@CASES
@given(symmetric_cases(max_size=64), st.integers(0, 2**31 - 1))
def test_symmetric_backward_op_matches_reference_on_grid_cases(case, seed):
    g = torch.randn(case.x.shape, generator=torch.Generator().manual_seed(seed))
    gx, gs = P.fake_quantize_symmetric_backward(g, case.x, case.scale, *case.levels, case.axis)
    rx, rs = grads(
        lambda x, s: fake_quantize_symmetric_reference(x, s, **case.kwargs()),
        (case.x, case.scale),
        g,
    )
    assert torch.equal(gx, rx)
    assert_param_grad_close(gs, rs, g)


@CASES
@given(asymmetric_cases(max_size=64), st.integers(0, 2**31 - 1))
def test_asymmetric_backward_op_matches_reference_on_grid_cases(case, seed):
    g = torch.randn(case.x.shape, generator=torch.Generator().manual_seed(seed))
    gx, gl, gr = P.fake_quantize_asymmetric_backward(
        g, case.x, case.input_low, case.input_range, case.levels[1], case.axis
    )
    rx, rl, rr = grads(
        lambda x, lo, r: fake_quantize_asymmetric_reference(x, lo, r, **case.kwargs()),
        (case.x, case.input_low, case.input_range),
        g,
    )
    assert torch.equal(gx, rx)
    assert_param_grad_close(gl, rl, g)
    assert_param_grad_close(gr, rr, g)


# ----------------------------------------------------------------- layouts and kernel modes

LAYOUTS = {
    "per-tensor, many chunks": ((8, 64, 40, 40), None, lambda t: t),
    "conv activation, channel axis 1": ((4, 64, 9, 9), 1, lambda t: t),
    "channels_last": ((4, 16, 9, 9), 1, lambda t: t.contiguous(memory_format=torch.channels_last)),
    "strided slice": ((4, 16, 9, 12), 1, lambda t: t[:, :, :, ::2]),
    "channel axis last (per-lane params)": ((300, 48), 1, lambda t: t),
    "short inner extent (per-lane params)": ((50, 7, 3), 1, lambda t: t),
    "many channels, axis 0": ((3000, 40), 0, lambda t: t),
    # outputs of 4 MB and more are written with streaming stores from the first aligned element
    "large per-tensor (streamed)": ((1_100_003,), None, lambda t: t),
    "large per-channel, odd rows (streamed)": ((4, 30, 99, 101), 1, lambda t: t),
    "large, channel axis last (streamed, per-lane params)": ((150_001, 7), 1, lambda t: t),
    "empty": ((0, 5), 1, lambda t: t),
    "scalar": ((), None, lambda t: t),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("kind", ["sym", "asym"])
def test_layouts_and_kernel_modes(name, kind):
    shape, axis, make = LAYOUTS[name]
    gen = torch.Generator().manual_seed(3)
    x = make(torch.randn(shape, generator=gen) * 2)
    g = make(torch.randn(shape, generator=gen))
    params = _params(axis, shape, gen, kind)

    def ref(x, *p):
        if kind == "sym":
            return fake_quantize_symmetric_reference(
                x, *p, bits=8, signed=True, narrow_range=True, axis=axis
            )
        return fake_quantize_asymmetric_reference(x, *p, bits=8, axis=axis)

    if kind == "sym":
        out = sym_cpp(x, *params, 8, True, True, axis)
        op_grads = P.fake_quantize_symmetric_backward(g, x, *params, -127, 127, axis)
    else:
        out = asym_cpp(x, *params, 8, axis)
        op_grads = P.fake_quantize_asymmetric_backward(g, x, *params, 255, axis)
    assert_bit_equal(out, ref(x, *params))
    assert out.stride() == torch.empty_like(x).stride()
    expected = grads(ref, (x, *params), g)
    assert torch.equal(op_grads[0], expected[0])
    for actual, want in zip(op_grads[1:], expected[1:]):
        assert_param_grad_close(actual, want, g)


SPECIAL = {
    "non-finite": [float("nan"), float("inf"), -float("inf"), 1e30, -1e30, -0.0, 0.0, 1e-40],
    "huge, zeros, subnormal": [1e30, -1e30, -0.0, 0.0, 1e-40, -1e-40, 3e38, 0.3],
}


@pytest.mark.parametrize("values", list(SPECIAL))
@pytest.mark.parametrize("kind", ["sym", "asym"])
def test_special_values_follow_the_reference(kind, values):
    # Non-finite inputs give NaN parameter gradients in the reference (0 * inf in its where()).
    x = torch.tensor(SPECIAL[values] * 5)
    g = torch.linspace(-1, 1, x.numel())
    if kind == "sym":
        params, levels = (torch.tensor(2.0),), (-128, 127)
        out = P.fake_quantize_symmetric(x, *params, *levels, None)
        op_grads = P.fake_quantize_symmetric_backward(g, x, *params, *levels, None)
        ref = fake_quantize_symmetric_reference(x, *params, bits=8, signed=True, narrow_range=False)
        expected = grads(
            lambda x, s: fake_quantize_symmetric_reference(
                x, s, bits=8, signed=True, narrow_range=False
            ),
            (x, *params),
            g,
        )
    else:
        params = (torch.tensor(-1.0), torch.tensor(3.0))
        out = P.fake_quantize_asymmetric(x, *params, 255, None)
        op_grads = P.fake_quantize_asymmetric_backward(g, x, *params, 255, None)
        ref = fake_quantize_asymmetric_reference(x, *params, bits=8)
        expected = grads(
            lambda x, lo, r: fake_quantize_asymmetric_reference(x, lo, r, bits=8), (x, *params), g
        )
    torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)
    not_nan = ~x.isnan()
    assert torch.equal(bits_of(out[not_nan]), bits_of(ref[not_nan]))
    assert all(t.isfinite().all() for t in expected[1:]) == bool(x.isfinite().all())
    assert torch.equal(op_grads[0], expected[0])
    for actual, want in zip(op_grads[1:], expected[1:]):
        assert_param_grad_close(actual, want, g)


def test_backward_is_deterministic_and_thread_count_independent():
    x = torch.randn(16, 64, 33, 33)
    g = torch.randn_like(x)
    scale = torch.tensor([2.5])
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            results.append(P.fake_quantize_symmetric_backward(g, x, scale, -128, 127, None)[1])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(r, results[0]) for r in results)


def test_kernel_checks_its_inputs():
    with pytest.raises(RuntimeError, match="shape"):
        P.fake_quantize_symmetric(torch.ones(2, 4), torch.ones(3), -128, 127, 1)
    with pytest.raises(RuntimeError, match="float32"):
        P.fake_quantize_symmetric(
            torch.ones(2, 4), torch.ones(1, dtype=torch.float64), -128, 127, None
        )
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        P.fake_quantize_asymmetric(
            torch.ones(3, dtype=torch.float64), torch.zeros(1), torch.ones(1), 255, None
        )


def test_backward_ops_refuse_to_be_differentiated():
    x = torch.randn(5, requires_grad=True)
    with pytest.raises(RuntimeError, match="not differentiable"):
        P.fake_quantize_symmetric_backward(torch.ones(5), x, torch.ones(1), -128, 127, None)


# ----------------------------------------------------------------- router: which path runs


def test_cpp_path_runs_for_eager_calls():
    x, scale, low, rng = torch.randn(4, 8), torch.tensor(1.0), torch.zeros(8) - 1, torch.ones(8) * 2
    with record_paths() as paths:
        out_s = fake_quantize_symmetric(x, scale, bits=8, signed=True, narrow_range=True)
        out_a = fake_quantize_asymmetric(x.half(), low, rng, bits=8, axis=1)
    assert paths == ["cpp", "cpp"]
    assert_bit_equal(
        out_s, fake_quantize_symmetric_reference(x, scale, bits=8, signed=True, narrow_range=True)
    )
    assert_bit_equal(out_a, fake_quantize_asymmetric_reference(x.half(), low, rng, bits=8, axis=1))


def _sym_loss(x, s):
    return fake_quantize_symmetric(x, s, bits=8, signed=True, narrow_range=False).square().sum()


TRANSFORMS = {
    "grad": lambda x, s: torch.func.grad(_sym_loss)(x, s),
    "vmap": lambda x, s: torch.func.vmap(
        lambda xi: fake_quantize_symmetric(xi, s, bits=8, signed=True, narrow_range=False)
    )(x),
    "jvp": lambda x, s: torch.func.jvp(lambda xi: _sym_loss(xi, s), (x,), (torch.ones_like(x),)),
    "vjp": lambda x, s: torch.func.vjp(lambda xi: _sym_loss(xi, s), x)[1](torch.tensor(1.0)),
    "compile": lambda x, s: torch.compile(_sym_loss, fullgraph=True)(x, s),
}


@pytest.mark.parametrize("transform", list(TRANSFORMS))
def test_reference_runs_under_transforms(transform):
    torch._dynamo.reset()
    with record_paths() as paths:
        TRANSFORMS[transform](torch.randn(3, 5), torch.tensor(1.5))
    assert paths and set(paths) == {"reference"}


def test_reference_runs_for_forward_ad_dual_inputs():
    import torch.autograd.forward_ad as fwAD

    x, scale = torch.randn(6), torch.tensor(1.0)
    with fwAD.dual_level(), record_paths() as paths:
        out = fake_quantize_symmetric(
            fwAD.make_dual(x, torch.ones(6)), scale, bits=8, signed=True, narrow_range=False
        )
        tangent = fwAD.unpack_dual(out).tangent
        fake_quantize_symmetric(
            x, scale, bits=8, signed=True, narrow_range=False
        )  # no tangent: C++
    assert paths == ["reference", "cpp"]
    assert tangent is not None


def test_reference_runs_for_unsupported_dtypes():
    with record_paths() as paths:
        fake_quantize_symmetric(
            torch.randn(4, dtype=torch.float64),
            torch.tensor(1.0),
            bits=8,
            signed=True,
            narrow_range=False,
        )
        fake_quantize_symmetric(
            torch.randn(4),
            torch.tensor(1.0, dtype=torch.float64),
            bits=8,
            signed=True,
            narrow_range=False,
        )
    assert paths == ["reference", "reference"]


# ----------------------------------------------------------------- public functions under transforms

SYM_KW = dict(bits=6, signed=True, narrow_range=True, axis=-2)


def _public_loss(x, s, low, rng):
    a = fake_quantize_symmetric(x, s, **SYM_KW)
    b = fake_quantize_asymmetric(x, low, rng, bits=5, axis=-2)
    return (a * b).sum() + a.square().sum()


def _reference_loss(x, s, low, rng):
    a = fake_quantize_symmetric_reference(x, s, **SYM_KW)
    b = fake_quantize_asymmetric_reference(x, low, rng, bits=5, axis=-2)
    return (a * b).sum() + a.square().sum()


def _loss_inputs():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(5, 6, 7, generator=gen) * 2
    return (
        x,
        torch.rand(6, generator=gen) + 0.5,
        torch.randn(6, generator=gen) - 1,
        torch.rand(6, generator=gen) * 3 + 0.5,
    )


def _close_trees(a, b):
    for u, v in zip(torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)


def test_public_functions_under_grad_match_reference_and_eager_cpp():
    inputs = _loss_inputs()
    argnums = (0, 1, 2, 3)
    public = torch.func.grad(_public_loss, argnums)(*inputs)
    _close_trees(public, torch.func.grad(_reference_loss, argnums)(*inputs))
    leaves = [t.clone().requires_grad_() for t in inputs]
    with record_paths() as paths:
        eager = torch.autograd.grad(_public_loss(*leaves), leaves)
    assert paths == ["cpp", "cpp"]
    _close_trees(public, eager)


def test_public_functions_per_sample_grads_match_reference():
    inputs = _loss_inputs()
    dims = (0, None, None, None)
    per_sample = torch.func.vmap(torch.func.grad(_public_loss, (0, 1, 2, 3)), dims)(*inputs)
    _close_trees(
        per_sample, torch.func.vmap(torch.func.grad(_reference_loss, (0, 1, 2, 3)), dims)(*inputs)
    )
    x, *params = inputs
    leaves = [p.clone().requires_grad_() for p in params]
    eager_first = torch.autograd.grad(_public_loss(x[0], *leaves), leaves)
    _close_trees([t[0] for t in per_sample[1:]], eager_first)


def test_public_functions_jvp_of_grad_matches_reference():
    inputs = _loss_inputs()
    tangents = tuple(torch.randn_like(t) for t in inputs)
    public = torch.func.jvp(torch.func.grad(_public_loss, (0, 1, 2, 3)), inputs, tangents)
    _close_trees(
        public, torch.func.jvp(torch.func.grad(_reference_loss, (0, 1, 2, 3)), inputs, tangents)
    )


def test_public_functions_compile_fullgraph_matches_reference():
    torch._dynamo.reset()
    inputs = _loss_inputs()
    compiled = torch.compile(_public_loss, fullgraph=True)
    leaves = [t.clone().requires_grad_() for t in inputs]
    value = compiled(*leaves)
    grads_c = torch.autograd.grad(value, leaves)
    ref_leaves = [t.clone().requires_grad_() for t in inputs]
    ref_value = _reference_loss(*ref_leaves)
    _close_trees((value, grads_c), (ref_value, torch.autograd.grad(ref_value, ref_leaves)))


def test_eager_double_backward_through_cpp_matches_reference():
    inputs = _loss_inputs()

    def second_order(loss):
        leaves = [t.clone().requires_grad_() for t in inputs]
        first = torch.autograd.grad(loss(*leaves), leaves, create_graph=True)
        return torch.autograd.grad(
            sum((g**2).sum() for g in first), leaves, allow_unused=True, materialize_grads=True
        )

    with record_paths() as paths:
        public = second_order(_public_loss)
    assert paths == ["cpp", "cpp"]
    _close_trees(public, second_order(_reference_loss))


# ----------------------------------------------------------------- eager backward: gradient buffers


@pytest.mark.parametrize("kind", ["sym", "asym"])
@pytest.mark.parametrize(
    "axis,layout", [(None, "contiguous"), (1, "contiguous"), (1, "channels_last"), (3, "contiguous")]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_backward_with_owned_gradients_matches_reference(kind, axis, layout, dtype):
    # The gradients reaching the quantizers come from C++ nodes only (mul, add), so the C++
    # backward owns them and writes grad_x into their buffers. One gradient reaches two
    # quantizers through an add (the first to run must leave it intact for the second), another
    # a quantizer and a relu.
    gen = torch.Generator().manual_seed(7)
    shape = (3, 6, 5, 4)

    def make(t):
        t = t.to(dtype)
        return t.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else t

    xs = [make(torch.randn(shape, generator=gen) * 2) for _ in range(4)]
    w = make(torch.randn(shape, generator=gen))
    params = _params(axis, shape, gen, kind)

    def run(quantize):
        leaves = [t.clone().requires_grad_() for t in (*xs, *params)]
        a, b, c, d, *p = leaves
        loss = ((quantize(a, p) + quantize(b, p)) * w).sum()
        loss = loss + ((quantize(c, p) + torch.relu(d)) * w).sum()
        loss.backward()
        return [t.grad for t in leaves]

    def cpp(x, p):
        if kind == "sym":
            return fake_quantize_symmetric(x, *p, bits=6, signed=True, narrow_range=False, axis=axis)
        return fake_quantize_asymmetric(x, *p, bits=6, axis=axis)

    def ref(x, p):
        if kind == "sym":
            return fake_quantize_symmetric_reference(
                x, *p, bits=6, signed=True, narrow_range=False, axis=axis
            )
        return fake_quantize_asymmetric_reference(x, *p, bits=6, axis=axis)

    with record_paths() as paths:
        actual = run(cpp)
    assert paths == ["cpp"] * 3
    expected = run(ref)
    for got, want in zip(actual[:4], expected[:4]):
        assert torch.equal(got, want)
    for got, want in zip(actual[4:], expected[4:]):
        assert_param_grad_close(got, want, 3 * w)


def test_eager_backward_leaves_gradients_held_elsewhere_intact():
    x, scale = torch.randn(4, 50, requires_grad=True), torch.tensor(1.0, requires_grad=True)
    w = torch.randn(4, 50)
    kept = []
    y = fake_quantize_symmetric(x, scale, bits=4, signed=True, narrow_range=False)
    y.register_hook(kept.append)  # holds the incoming gradient
    (y * w).sum().backward()
    assert torch.equal(kept[0], w)
    g = torch.randn(4, 50)
    g0 = g.clone()
    y = fake_quantize_asymmetric(x, scale - 2, scale * 3, bits=4)
    torch.autograd.grad(y, (x, scale), g)  # the caller holds g
    assert torch.equal(g, g0)


def test_eager_backward_is_visible_to_profilers_and_dispatch_modes():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Log(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    x, scale = torch.randn(64, requires_grad=True), torch.tensor(1.0, requires_grad=True)
    with torch.profiler.profile() as prof:
        fake_quantize_symmetric(x, scale, bits=4, signed=True, narrow_range=False).sum().backward()
    assert "purecomp::fake_quantize_symmetric_backward" in {e.name for e in prof.events()}
    with Log() as log:
        fake_quantize_asymmetric(x, scale - 2, scale * 3, bits=4).sum().backward()
    assert "purecomp.fake_quantize_asymmetric_backward.default" in log.ops


OPCHECK = [
    ("sym per-tensor f32", torch.float32, None),
    ("sym per-channel f16", torch.float16, 1),
    ("asym per-tensor bf16", torch.bfloat16, None),
    ("asym per-channel f32", torch.float32, 0),
]


@pytest.mark.parametrize("name,dtype,axis", OPCHECK)
def test_opcheck(name, dtype, axis):
    gen = torch.Generator().manual_seed(5)
    shape = (6, 4, 5)
    x = (torch.randn(shape, generator=gen) * 2).to(dtype)
    g = torch.randn(shape, generator=gen).to(dtype)
    kind = name.split()[0]
    params = _params(axis, shape, gen, kind)
    if kind == "sym":
        fwd, bwd, static = (
            P.fake_quantize_symmetric.default,
            P.fake_quantize_symmetric_backward.default,
            (-128, 127, axis),
        )
    else:
        fwd, bwd, static = (
            P.fake_quantize_asymmetric.default,
            P.fake_quantize_asymmetric_backward.default,
            (255, axis),
        )
    torch.library.opcheck(fwd, (x.requires_grad_(), *[p.requires_grad_() for p in params], *static))
    torch.library.opcheck(fwd, (x.detach(), *[p.detach() for p in params], *static))
    torch.library.opcheck(bwd, (g, x.detach(), *[p.detach() for p in params], *static))


# ----------------------------------------------------------------- build switch


def test_env_reference_forces_the_reference(monkeypatch):
    monkeypatch.setenv("PURECOMP_OPS", "reference")
    with record_paths() as paths:
        fake_quantize_symmetric(
            torch.randn(4), torch.tensor(1.0), bits=8, signed=True, narrow_range=False
        )
    assert paths == ["reference"]
    assert not build.cpp_available()


def test_env_rejects_unknown_values(monkeypatch):
    monkeypatch.setenv("PURECOMP_OPS", "fast")
    with pytest.raises(ConfigError, match="PURECOMP_OPS"):
        build.cpp_available()


def test_failed_build_warns_once_and_falls_back(monkeypatch, caplog):
    def broken() -> None:
        raise OSError("no C++ compiler found")

    monkeypatch.setattr(build, "_state", build.BuildState())
    monkeypatch.setattr(build, "_compile_and_load", broken)
    monkeypatch.setenv("PURECOMP_OPS", "auto")
    with caplog.at_level(logging.WARNING, logger=build.__name__), record_paths() as paths:
        assert not build.cpp_available()
        fake_quantize_symmetric(
            torch.randn(4), torch.tensor(1.0), bits=8, signed=True, narrow_range=False
        )
        assert not build.cpp_available()
    assert paths == ["reference"]
    assert isinstance(build.build_error(), OSError)
    warnings = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(warnings) == 1 and "no C++ compiler found" in warnings[0].getMessage()
    monkeypatch.setenv("PURECOMP_OPS", "cpp")
    with pytest.raises(build.OpsBuildError, match=re.escape("no C++ compiler found")):
        fake_quantize_symmetric(
            torch.randn(4), torch.tensor(1.0), bits=8, signed=True, narrow_range=False
        )


def test_build_directory_is_keyed_by_torch_and_sources(monkeypatch, tmp_path):
    monkeypatch.setenv("PURECOMP_CACHE_DIR", str(tmp_path))
    directory = build.build_directory()
    assert directory.parent == tmp_path
    assert torch.__version__.replace("+", "_") in directory.name
    assert [p.name for p in build.sources()] == [
        "binarize.cpp",
        "binarize_autograd.cpp",
        "fake_quantize.cpp",
        "fake_quantize_autograd.cpp",
    ]
    assert {"autograd_util.h", "binarize.h", "cpu_kernels.h", "fake_quantize.h"} <= {
        p.name for p in build.headers()
    }
    monkeypatch.setattr(build, "cflags", lambda: ["-O0"])
    assert build.build_directory() != directory
