"""The C++ activation binarization kernels against the reference composite, numpy, and under transforms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from purecomp.errors import QuantizerRangeError
from purecomp.ops import build, record_paths
from purecomp.ops.binarize import activation_binarize
from purecomp.ops.binarize_reference import activation_binarize_reference

if not build.cpp_available():
    pytest.skip(f"purecomp C++ ops unavailable: {build.build_error()!r}", allow_module_level=True)

P = torch.ops.purecomp
CASES = settings(deadline=None, max_examples=150)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def bits_of(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def assert_bit_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal bits, NaN anywhere NaN is expected (NaN payloads are not compared)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    nan = expected.isnan()
    assert torch.equal(actual.isnan(), nan)
    assert torch.equal(bits_of(actual[~nan].contiguous()), bits_of(expected[~nan].contiguous())), (
        (actual.float() - expected.float()).abs().max()
    )


def grads(fn, inputs, g):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    return torch.autograd.grad(fn(*inputs), inputs, g)


def reference_grads(x, scale, threshold, axis, g):
    return grads(lambda x, s, t: activation_binarize_reference(x, s, t, axis), (x, scale, threshold), g)


def assert_param_grad_close(actual, expected, g, scale=1.0):
    """Parameter gradients are sums of terms bounded by ~|g| (times |x| / s for the scale)."""
    tol = 1e-6 * scale * max(float(g.float().abs().sum()), 1.0)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=tol, equal_nan=True)


def numpy_oracle(x, scale, threshold, axis, g=None):
    """Independent numpy forward (and with ``g`` the gradients, summed in float64)."""
    xf = np.asarray(x.float().numpy(), dtype=np.float32)
    s = np.float32(scale.reshape(()).item())
    shape = [1] * xf.ndim
    shape[axis] = -1
    t = threshold.numpy().astype(np.float32).reshape(shape)
    out = np.where(xf > s * t, s, np.float32(0)).astype(np.float32)
    if g is None:
        return out
    gd = g.float().numpy().astype(np.float64)
    xd = xf.astype(np.float64)
    dx = np.where((xd >= 0) & (xd <= s), gd, 0.0)
    ds = np.where(xd > s, gd, gd * (out - xd) / np.float64(s)).sum()
    dims = tuple(d for d in range(xf.ndim) if d != axis)
    dt = -np.where((xd > 0) & (xd < s), gd, 0.0).sum(axis=dims)
    return out, dx, ds, dt


# ----------------------------------------------------------------- cases


@st.composite
def binarize_cases(draw: st.DrawFn, max_size: int = 64):
    """x, scale, threshold, axis; x mixes values at, just above and just below thr_c = s * t_c."""
    dtype = draw(st.sampled_from(DTYPES))
    ndim = draw(st.integers(1, 3))
    shape = draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim))
    while int(np.prod(shape)) > max_size:
        shape[shape.index(max(shape))] -= 1
    axis = draw(st.integers(-ndim, ndim - 1))
    channels = shape[axis]
    if draw(st.booleans()):  # dyadic: s * t is representable in float16, often in bfloat16
        s = draw(st.integers(1, 32)) / 8
        t = [draw(st.integers(-24, 24)) / 16 for _ in range(channels)]
    else:
        s = draw(st.floats(2.0**-10, 8.0, width=32))
        t = draw(st.lists(st.floats(-2.0, 2.0, width=32), min_size=channels, max_size=channels))
    scale = torch.tensor([s], dtype=torch.float32).reshape(draw(st.sampled_from([(), (1,), (1, 1)])))
    threshold = torch.tensor(t, dtype=torch.float32)
    view = [1] * ndim
    view[axis] = -1
    thr = (scale.reshape(()) * threshold.reshape(view)).expand(shape)
    thr_d = thr.to(dtype).float()  # ties that survive the rounding to dtype
    scale_f = scale.reshape(()).expand(shape)
    candidates = torch.stack(
        [
            thr,
            thr_d,
            torch.nextafter(thr_d, torch.tensor(np.inf)),
            torch.nextafter(thr_d, torch.tensor(-np.inf)),
            scale_f,
            torch.nextafter(scale_f, torch.tensor(np.inf)),
            scale_f / 2,
            torch.zeros(shape),
            torch.full(shape, -0.0),
            torch.tensor(
                draw(st.lists(st.floats(-10, 10, width=32), min_size=thr.numel(), max_size=thr.numel())),
                dtype=torch.float32,
            ).reshape(shape),
        ]
    )
    pick = torch.tensor(
        draw(st.lists(st.integers(0, len(candidates) - 1), min_size=thr.numel(), max_size=thr.numel())),
        dtype=torch.long,
    ).reshape(1, *shape)
    x = candidates.gather(0, pick)[0].to(dtype)
    return x, scale, threshold, axis


# ----------------------------------------------------------------- forward: bit for bit


@CASES
@given(binarize_cases())
def test_forward_equals_reference_bit_for_bit(case):
    x, scale, threshold, axis = case
    out = P.activation_binarize(x, scale, threshold, axis)
    ref = activation_binarize_reference(x, scale, threshold, axis)
    assert_bit_equal(out, ref)
    expected = torch.from_numpy(numpy_oracle(x, scale, threshold, axis % x.dim())).to(x.dtype)
    assert_bit_equal(out, expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_give_zero(dtype):
    # x exactly at thr_c = s * t_c gives 0; the next value above gives s
    scale = torch.tensor(0.75)
    threshold = torch.tensor([0.5, -0.25, 0.0, 1.0, 2.0])
    thr = (scale * threshold).to(dtype)
    assert torch.equal(thr.float(), scale * threshold)  # representable: these are exact ties
    up = torch.nextafter(thr, torch.tensor(np.inf, dtype=dtype))
    down = torch.nextafter(thr, torch.tensor(-np.inf, dtype=dtype))
    x = torch.stack([thr, up, down, -thr])  # (4, 5): channels along axis 1
    out = P.activation_binarize(x, scale, threshold, 1)
    assert_bit_equal(out, activation_binarize_reference(x, scale, threshold, 1))
    s = scale.to(dtype)
    assert torch.equal(bits_of(out[0]), bits_of(torch.zeros(5, dtype=dtype)))  # ties: +0
    assert torch.equal(out[1], s.expand(5))
    assert torch.equal(out[2], torch.zeros(5, dtype=dtype))


SPECIAL = {
    "non-finite x": ([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 0.5, 2.0], 1.0, 0.5),
    "huge x, small scale (surrogate overflows)": ([1e30, -1e30, -3e38, 3e38, -1e36, 0.001, -0.001], 0.01, 0.3),
    "subnormal scale": ([1e-40, -1e-40, 0.0, 1.0, -1.0, 1e-38, 5e-39], 2e-40, 0.5),
    "zero scale": ([0.0, -0.0, 1.0, -1.0, 1e-30], 0.0, 0.5),
    "negative scale": ([0.0, -0.5, -2.0, 0.5, 3.0], -1.0, 0.25),
    "infinite threshold": ([0.0, 1.0, -1.0, 1e30], 1.0, float("inf")),
    "nan threshold": ([0.0, 1.0, -1.0], 1.0, float("nan")),
    "huge threshold": ([0.0, 1.0, 3e38, -3e38], 1.0, 3e38),
}

SCALE_GRADIENT_OVERFLOWS = {"huge x, small scale (surrogate overflows)", "subnormal scale", "zero scale"}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(SPECIAL))
def test_special_values_follow_the_reference(name, dtype):
    values, s, t = SPECIAL[name]
    x = torch.tensor(values * 7).reshape(-1, 1).to(dtype)  # 7 copies: full vectors and a tail
    scale, threshold = torch.tensor(s), torch.tensor([t])
    out = P.activation_binarize(x, scale, threshold, 1)
    assert_bit_equal(out, activation_binarize_reference(x, scale, threshold, 1))
    g = torch.linspace(-1, 1, x.numel()).reshape(x.shape).to(dtype)
    op_grads = P.activation_binarize_backward(g, x, scale, threshold, 1)
    expected = reference_grads(x, scale, threshold, 1, g)
    assert torch.equal(op_grads[0], expected[0])
    torch.testing.assert_close(op_grads[2], expected[2], rtol=1e-4, atol=1e-4, equal_nan=True)
    if name in SCALE_GRADIENT_OVERFLOWS:
        # the reference sums g (out - x) / s per element, where terms overflow to +-inf (and
        # inf - inf to NaN); the kernel divides the sum once: non-finite too, maybe another one
        assert not expected[1].isfinite().any() and not op_grads[1].isfinite().any()
    else:
        torch.testing.assert_close(op_grads[1], expected[1], rtol=1e-4, atol=1e-4, equal_nan=True)


# ----------------------------------------------------------------- gradients


@pytest.mark.parametrize("axis", [0, 1, 2, -1])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients_match_reference_and_numpy(axis, dtype):
    gen = torch.Generator().manual_seed(1)
    shape = (6, 5, 70)
    x = (torch.randn(shape, generator=gen) * 1.5).to(dtype)
    g = torch.randn(shape, generator=gen).to(dtype)
    scale = torch.tensor(1.25)
    threshold = torch.rand(shape[axis], generator=gen) * 1.2 - 0.1
    with record_paths() as paths:
        gx, gs, gt = grads(lambda x, s, t: activation_binarize(x, s, t, axis), (x, scale, threshold), g)
    assert paths == ["cpp"]
    rx, rs, rt = reference_grads(x, scale, threshold, axis, g)
    assert torch.equal(gx, rx)
    assert_param_grad_close(gs, rs, g, scale=4.0)
    assert_param_grad_close(gt, rt, g)
    _, nx, ns, nt = numpy_oracle(x, scale, threshold, axis % 3, g)
    np.testing.assert_array_equal(gx.float().numpy(), nx.astype(np.float32))
    tol = 1e-6 * float(g.float().abs().sum())
    np.testing.assert_allclose(gs.item(), ns, rtol=1e-5, atol=4 * tol)
    np.testing.assert_allclose(gt.numpy(), nt, rtol=1e-5, atol=tol)


@CASES
@given(binarize_cases(), st.integers(0, 2**31 - 1))
def test_backward_op_matches_reference_on_cases(case, seed):
    x, scale, threshold, axis = case
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(x.dtype)
    gx, gs, gt = P.activation_binarize_backward(g, x, scale, threshold, axis)
    rx, rs, rt = reference_grads(x, scale, threshold, axis, g)
    assert torch.equal(gx, rx)
    assert gs.shape == scale.shape and gt.shape == threshold.shape
    s = float(scale.reshape(()))
    assert_param_grad_close(gs, rs, g, scale=max(1.0, 20.0 / s))  # |x| / s up to ~10 / s
    assert_param_grad_close(gt, rt, g)


# ----------------------------------------------------------------- layouts and kernel modes

LAYOUTS = {
    "conv activation, channel axis 1": ((4, 64, 9, 9), 1, lambda t: t),
    "channels_last": ((4, 16, 9, 9), 1, lambda t: t.contiguous(memory_format=torch.channels_last)),
    "strided slice": ((4, 16, 9, 12), 1, lambda t: t[:, :, :, ::2]),
    "transposed": ((8, 20, 33), 2, lambda t: t.transpose(0, 2)),
    "channel axis last (per-lane params)": ((300, 48), 1, lambda t: t),
    "short inner extent (per-lane params)": ((50, 7, 3), 1, lambda t: t),
    "many channels, axis 0": ((3000, 40), 0, lambda t: t),
    "one channel, many chunks": ((8, 1, 200, 200), 1, lambda t: t),
    "large per-channel, odd rows (streamed)": ((4, 30, 99, 101), 1, lambda t: t),
    "large, channel axis last (streamed, per-lane params)": ((150_001, 7), 1, lambda t: t),
    "empty": ((0, 5), 1, lambda t: t),
    "1-d": ((37,), 0, lambda t: t),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layouts_and_kernel_modes(name, dtype):
    shape, axis, make = LAYOUTS[name]
    gen = torch.Generator().manual_seed(3)
    x = make(torch.randn(shape, generator=gen) * 2).to(dtype)
    g = make(torch.randn(shape, generator=gen)).to(dtype)
    scale = torch.tensor(1.5)
    threshold = torch.rand(x.shape[axis], generator=gen) - 0.25
    out = P.activation_binarize(x, scale, threshold, axis)
    assert_bit_equal(out, activation_binarize_reference(x, scale, threshold, axis))
    assert out.stride() == torch.empty_like(x).stride()
    op_grads = P.activation_binarize_backward(g, x, scale, threshold, axis)
    expected = reference_grads(x, scale, threshold, axis, g)
    assert torch.equal(op_grads[0], expected[0])
    assert op_grads[0].stride() == torch.empty_like(x).stride()
    assert_param_grad_close(op_grads[1], expected[1], g, scale=4.0)
    assert_param_grad_close(op_grads[2], expected[2], g)


def test_strided_threshold_and_scale_views():
    x = torch.randn(4, 6, 5)
    scale = torch.tensor([[0.0, 1.25]])[:, 1:]  # numel 1, storage offset
    threshold = torch.linspace(-0.5, 1.0, 12)[::2]  # stride 2
    out = P.activation_binarize(x, scale, threshold, 1)
    assert_bit_equal(out, activation_binarize_reference(x, scale, threshold, 1))
    g = torch.randn_like(x)
    op_grads = P.activation_binarize_backward(g, x, scale, threshold, 1)
    for actual, want in zip(op_grads, reference_grads(x, scale, threshold, 1, g)):
        torch.testing.assert_close(actual, want, rtol=1e-5, atol=1e-5)


def test_backward_is_deterministic_and_thread_count_independent():
    x = torch.randn(16, 64, 33, 33)
    g = torch.randn_like(x)
    scale, threshold = torch.tensor(1.5), torch.rand(64)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            results.append(P.activation_binarize_backward(g, x, scale, threshold, 1)[1:])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for r in results for a, b in zip(r, results[0]))


def test_kernel_checks_its_inputs():
    x = torch.ones(2, 4)
    with pytest.raises(RuntimeError, match="threshold must have shape"):
        P.activation_binarize(x, torch.ones(()), torch.ones(3), 1)
    with pytest.raises(RuntimeError, match="scale must hold one value"):
        P.activation_binarize(x, torch.ones(2), torch.ones(4), 1)
    with pytest.raises(RuntimeError, match="float32 CPU"):
        P.activation_binarize(x, torch.ones((), dtype=torch.float64), torch.ones(4), 1)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        P.activation_binarize(x.double(), torch.ones(()), torch.ones(4), 1)
    with pytest.raises(RuntimeError, match="out of range"):
        P.activation_binarize(x, torch.ones(()), torch.ones(4), 2)
    with pytest.raises(RuntimeError, match="grad must match"):
        P.activation_binarize_backward(torch.ones(2, 3), x, torch.ones(()), torch.ones(4), 1)


def test_public_function_checks_its_inputs():
    x = torch.ones(2, 4)
    with pytest.raises(QuantizerRangeError, match="threshold"):
        activation_binarize(x, torch.ones(()), torch.ones(3))
    with pytest.raises(QuantizerRangeError, match="scale"):
        activation_binarize(x, torch.ones(2), torch.ones(4))
    with pytest.raises(QuantizerRangeError, match="axis"):
        activation_binarize(x, torch.ones(()), torch.ones(4), axis=2)
    with pytest.raises(QuantizerRangeError, match="floating-point"):
        activation_binarize(x.long(), torch.ones(()), torch.ones(4))


def test_backward_op_refuses_to_be_differentiated():
    x = torch.randn(3, 5, requires_grad=True)
    with pytest.raises(RuntimeError, match="not differentiable"):
        P.activation_binarize_backward(torch.ones(3, 5), x, torch.ones(()), torch.ones(5), 1)


# ----------------------------------------------------------------- router: which path runs


def test_cpp_path_runs_for_eager_calls():
    x, scale, threshold = torch.randn(4, 8, 3), torch.tensor(1.0), torch.rand(8)
    with record_paths() as paths:
        out = activation_binarize(x, scale, threshold)
        out_h = activation_binarize(x.half(), scale, torch.rand(3), axis=-1)
    assert paths == ["cpp", "cpp"]
    assert_bit_equal(out, activation_binarize_reference(x, scale, threshold, 1))
    assert out_h.dtype == torch.float16


def _loss(x, s, t):
    return (activation_binarize(x, s, t) * x).sum()


TRANSFORMS = {
    "grad": lambda x, s, t: torch.func.grad(_loss, (0, 1, 2))(x, s, t),
    "vmap": lambda x, s, t: torch.func.vmap(lambda xi: activation_binarize(xi, s, t, axis=0))(x),
    "jvp": lambda x, s, t: torch.func.jvp(lambda xi: _loss(xi, s, t), (x,), (torch.ones_like(x),)),
    "vjp": lambda x, s, t: torch.func.vjp(lambda xi: _loss(xi, s, t), x)[1](torch.tensor(1.0)),
    "compile": lambda x, s, t: torch.compile(_loss, fullgraph=True)(x, s, t),
}


@pytest.mark.parametrize("transform", list(TRANSFORMS))
def test_reference_runs_under_transforms(transform):
    torch._dynamo.reset()
    with record_paths() as paths:
        TRANSFORMS[transform](torch.randn(3, 5), torch.tensor(1.5), torch.rand(5))
    assert paths and set(paths) == {"reference"}


def test_reference_runs_for_forward_ad_dual_inputs_and_other_dtypes():
    import torch.autograd.forward_ad as fwAD

    x, scale, threshold = torch.randn(2, 6), torch.tensor(1.0), torch.rand(6)
    with fwAD.dual_level(), record_paths() as paths:
        out = activation_binarize(x, fwAD.make_dual(scale, torch.tensor(1.0)), threshold)
        tangent = fwAD.unpack_dual(out).tangent
        activation_binarize(x, scale, threshold)  # no tangent: C++
    assert paths == ["reference", "cpp"]
    assert tangent is not None
    with record_paths() as paths:
        activation_binarize(x.double(), scale, threshold)
        activation_binarize(x, scale.double(), threshold)
        activation_binarize(x, scale, threshold.double())
    assert paths == ["reference"] * 3


def test_env_reference_forces_the_reference(monkeypatch):
    monkeypatch.setenv("PURECOMP_OPS", "reference")
    with record_paths() as paths:
        activation_binarize(torch.randn(2, 4), torch.tensor(1.0), torch.rand(4))
    assert paths == ["reference"]


# ----------------------------------------------------------------- public function under transforms


def _public_loss(x, s, t):
    a = activation_binarize(x, s, t, axis=-2)
    return (a * x).sum() + (a * a).sum() * 0.5


def _reference_loss(x, s, t):
    a = activation_binarize_reference(x, s, t, axis=-2)
    return (a * x).sum() + (a * a).sum() * 0.5


def _loss_inputs():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(5, 6, 7, generator=gen) * 2
    return x, torch.tensor(1.3), torch.rand(6, generator=gen) * 1.2 - 0.2


def _close_trees(a, b):
    for u, v in zip(torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-4)


ARGS = (0, 1, 2)


def test_grad_matches_reference_and_eager_cpp():
    inputs = _loss_inputs()
    public = torch.func.grad(_public_loss, ARGS)(*inputs)
    _close_trees(public, torch.func.grad(_reference_loss, ARGS)(*inputs))
    leaves = [t.clone().requires_grad_() for t in inputs]
    with record_paths() as paths:
        eager = torch.autograd.grad(_public_loss(*leaves), leaves)
    assert paths == ["cpp"]
    _close_trees(public, eager)


def test_per_sample_grads_match_reference():
    inputs = _loss_inputs()
    dims = (0, None, None)
    per_sample = torch.func.vmap(torch.func.grad(_public_loss, ARGS), dims)(*inputs)
    _close_trees(per_sample, torch.func.vmap(torch.func.grad(_reference_loss, ARGS), dims)(*inputs))
    x, *params = inputs
    leaves = [p.clone().requires_grad_() for p in params]
    eager_first = torch.autograd.grad(_public_loss(x[0], *leaves), leaves)
    _close_trees([t[0] for t in per_sample[1:]], eager_first)


def test_jvp_of_grad_matches_reference():
    inputs = _loss_inputs()
    tangents = tuple(torch.randn_like(t) for t in inputs)
    public = torch.func.jvp(torch.func.grad(_public_loss, ARGS), inputs, tangents)
    _close_trees(public, torch.func.jvp(torch.func.grad(_reference_loss, ARGS), inputs, tangents))


def test_compile_fullgraph_matches_reference():
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
    assert paths == ["cpp"]
    _close_trees(public, second_order(_reference_loss))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_backward_with_owned_gradients_matches_reference(layout, dtype):
    # Gradients from C++ nodes (mul, add) are owned by the binarize node, which writes grad_x into
    # them; one gradient reaches two binarizers through an add and must stay intact for the second.
    gen = torch.Generator().manual_seed(7)
    shape = (3, 6, 5, 4)

    def make(t):
        t = t.to(dtype)
        return t.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else t

    xs = [make(torch.randn(shape, generator=gen) * 2) for _ in range(3)]
    w = make(torch.randn(shape, generator=gen))
    params = (torch.tensor(1.5), torch.rand(6, generator=gen))

    def run(binarize):
        leaves = [t.clone().requires_grad_() for t in (*xs, *params)]
        a, b, c, s, t = leaves
        loss = ((binarize(a, s, t) + binarize(b, s, t)) * w).sum() + (binarize(c, s, t) * w).sum()
        loss.backward()
        return [leaf.grad for leaf in leaves]

    with record_paths() as paths:
        actual = run(activation_binarize)
    assert paths == ["cpp"] * 3
    expected = run(activation_binarize_reference)
    for got, want in zip(actual[:3], expected[:3]):
        assert torch.equal(got, want)
    for got, want in zip(actual[3:], expected[3:]):
        assert_param_grad_close(got, want, 3 * w, scale=4.0)


def test_eager_backward_is_visible_to_profilers_and_leaves_held_gradients_intact():
    x = torch.randn(4, 50, requires_grad=True)
    scale, threshold = torch.tensor(1.0, requires_grad=True), torch.rand(50, requires_grad=True)
    with torch.profiler.profile() as prof:
        activation_binarize(x, scale, threshold).sum().backward()
    assert "purecomp::activation_binarize_backward" in {e.name for e in prof.events()}
    g = torch.randn(4, 50)
    g0 = g.clone()
    torch.autograd.grad(activation_binarize(x, scale, threshold), (x, scale, threshold), g)
    assert torch.equal(g, g0)


# ----------------------------------------------------------------- raw ops: vmap rules and opcheck


@pytest.mark.parametrize("batched", ["x", "x, threshold", "x, scale", "all"])
def test_vmap_rules_of_the_raw_ops(batched):
    gen = torch.Generator().manual_seed(8)
    B = 3
    x = torch.randn(B, 4, 6, generator=gen)
    g = torch.randn(B, 4, 6, generator=gen)
    scale = torch.rand(B, generator=gen) + 0.5
    threshold = torch.rand(B, 6, generator=gen)
    dims = {
        "x": (0, None, None),
        "x, threshold": (0, None, 0),
        "x, scale": (0, 0, None),
        "all": (0, 0, 0),
    }[batched]
    args = [x, scale if dims[1] == 0 else scale[0], threshold if dims[2] == 0 else threshold[0]]

    def sample(i):
        return [a[i] if d == 0 else a for a, d in zip(args, dims)]

    out = torch.func.vmap(lambda *a: P.activation_binarize(*a, -1), dims)(*args)
    assert torch.equal(out, torch.stack([P.activation_binarize(*sample(i), -1) for i in range(B)]))
    back = torch.func.vmap(lambda gg, *a: P.activation_binarize_backward(gg, *a, 1), (0, *dims))(g, *args)
    for k in range(3):
        want = torch.stack([P.activation_binarize_backward(g[i], *sample(i), 1)[k] for i in range(B)])
        assert torch.equal(back[k], want)


OPCHECK = [
    ("f32 axis 1", torch.float32, 1),
    ("f16 axis 0", torch.float16, 0),
    ("bf16 axis -1", torch.bfloat16, -1),
]


@pytest.mark.parametrize("name,dtype,axis", OPCHECK)
def test_opcheck(name, dtype, axis):
    gen = torch.Generator().manual_seed(5)
    shape = (6, 4, 5)
    x = (torch.randn(shape, generator=gen) * 2).to(dtype)
    g = torch.randn(shape, generator=gen).to(dtype)
    scale, threshold = torch.tensor([1.5]), torch.rand(shape[axis], generator=gen)
    fwd, bwd = P.activation_binarize.default, P.activation_binarize_backward.default
    torch.library.opcheck(fwd, (x.requires_grad_(), scale.requires_grad_(), threshold.requires_grad_(), axis))
    torch.library.opcheck(fwd, (x.detach(), scale.detach(), threshold.detach(), axis))
    torch.library.opcheck(bwd, (g, x.detach(), scale.detach(), threshold.detach(), axis))
