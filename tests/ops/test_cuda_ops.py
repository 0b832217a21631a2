"""The CUDA fake-quantize kernels against the reference and the CPU kernels (GPU machines only).

Skipped where torch sees no CUDA device. Where it sees one, the kernels must build: a failed
build fails these tests (``build_cuda.ensure_cuda_built`` is asserted, not skipped on).
"""

from __future__ import annotations

import collections

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from purecomp.ops import (
    asymmetric_levels,
    build,
    build_cuda,
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

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (none here; these tests run on GPU machines)", allow_module_level=True)

P = torch.ops.purecomp
CUDA = torch.device("cuda")
CHECKED_DEVICE = "cuda"  # CompareWithCpuKernels checks the calls made on this device type
CASES = settings(deadline=None, max_examples=80)
REDUCED = (torch.float16, torch.bfloat16)


def test_cuda_kernels_build_and_cpu_kernels_too():
    assert build.cpp_available(), build.build_error()
    assert build_cuda.ensure_cuda_built(), build_cuda.cuda_build_error()


def bits_of(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def assert_bit_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal bits, NaN payloads aside (the GPU's canonical NaN is 0x7fffffff, the CPU's 0x7fc00000)."""
    actual, expected = actual.cpu(), expected.cpu()
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    nan = actual.isnan()
    assert torch.equal(nan, expected.isnan())
    assert torch.equal(bits_of(actual[~nan]), bits_of(expected[~nan])), (actual - expected).abs().max()


def sym(x, scale, bits, signed, narrow_range, axis=None):
    return P.fake_quantize_symmetric(x, scale, *symmetric_levels(bits, signed, narrow_range), axis)


def asym(x, low, rng, bits, axis=None):
    return P.fake_quantize_asymmetric(x, low, rng, asymmetric_levels(bits)[1], axis)


def on_cuda(*tensors):
    return [t.to(CUDA) for t in tensors]


def assert_param_grad_close(actual, expected, g):
    tol = 1e-6 * max(float(g.float().abs().sum()), 1.0)
    torch.testing.assert_close(actual.cpu(), expected.cpu(), rtol=1e-5, atol=tol, equal_nan=True)


# ----------------------------------------------------------------- forward


@CASES
@given(symmetric_cases(max_size=64))
def test_symmetric_forward_equals_reference_and_cpu_bit_for_bit(case):
    x, scale = on_cuda(case.x, case.scale)
    out = sym(x, scale, case.bits, case.signed, case.narrow_range, case.axis)
    assert out.is_cuda
    assert_bit_equal(out, fake_quantize_symmetric_reference(case.x, case.scale, **case.kwargs()))
    assert_bit_equal(out, sym(case.x, case.scale, case.bits, case.signed, case.narrow_range, case.axis))


@CASES
@given(asymmetric_cases(max_size=64))
def test_asymmetric_forward_equals_reference_and_cpu_bit_for_bit(case):
    x, low, rng = on_cuda(case.x, case.input_low, case.input_range)
    out = asym(x, low, rng, case.bits, case.axis)
    assert_bit_equal(out, fake_quantize_asymmetric_reference(case.x, case.input_low, case.input_range, **case.kwargs()))
    assert_bit_equal(out, asym(case.x, case.input_low, case.input_range, case.bits, case.axis))


def test_exact_ties_round_half_to_even():
    step = 2.0**-4
    scale = torch.tensor(127 * step)
    k = torch.arange(-131, 131, dtype=torch.float32)
    x = torch.cat([(k + 0.5) * step, k * step, torch.tensor([-0.0, 0.0])])
    out = sym(x.to(CUDA), scale.to(CUDA), 8, True, False)
    assert_bit_equal(out, fake_quantize_symmetric_reference(x, scale, bits=8, signed=True, narrow_range=False))
    halves = torch.tensor([0.5, 1.5, 2.5, 3.5], device=CUDA) * step
    assert (sym(halves, scale.to(CUDA), 8, True, False) / step).tolist() == [0.0, 2.0, 2.0, 4.0]


@CASES
@given(symmetric_cases(max_size=64), st.sampled_from(REDUCED))
def test_symmetric_reduced_precision_within_one_step(case, dtype):
    x = case.x.to(dtype)
    out = sym(x.to(CUDA), case.scale.to(CUDA), case.bits, case.signed, case.narrow_range, case.axis)
    ref = fake_quantize_symmetric_reference(x, case.scale, **case.kwargs())
    assert out.dtype == dtype
    step = (case.scale.abs() + EPS) / case.levels[1]
    assert ((out.cpu().float() - ref.float()).abs() <= step).all()


@CASES
@given(asymmetric_cases(max_size=64), st.sampled_from(REDUCED))
def test_asymmetric_reduced_precision_within_one_step(case, dtype):
    x = case.x.to(dtype)
    out = asym(x.to(CUDA), case.input_low.to(CUDA), case.input_range.to(CUDA), case.bits, case.axis)
    ref = fake_quantize_asymmetric_reference(x, case.input_low, case.input_range, **case.kwargs())
    _, rng = adjust_asymmetric_range(case.input_low, case.input_range.abs() + EPS, case.levels[1])
    assert ((out.cpu().float() - ref.float()).abs() <= rng / case.levels[1]).all()


def test_special_values_follow_the_reference():
    x = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0, 0.0, 1e30, -1e30, 1e-40])
    scale = torch.tensor(1.5)
    out = sym(x.to(CUDA), scale.to(CUDA), 8, True, False)
    ref = fake_quantize_symmetric_reference(x, scale, bits=8, signed=True, narrow_range=False)
    assert_bit_equal(out, ref)
    low, rng = torch.tensor(-0.7), torch.tensor(2.3)
    assert_bit_equal(asym(x.to(CUDA), low.to(CUDA), rng.to(CUDA), 8),
                     fake_quantize_asymmetric_reference(x, low, rng, bits=8))


# ----------------------------------------------------------------- layouts and sizes


LAYOUTS = [
    ("per-tensor 4D", (4, 8, 5, 7), None),
    ("conv weight axis 0", (16, 8, 3, 3), 0),
    ("activation axis 1", (4, 8, 5, 7), 1),
    ("linear input last axis", (6, 5, 12), -1),
    ("large per-tensor (many blocks)", (64, 64, 32, 32), None),
    ("large per-channel (many blocks)", (64, 64, 32, 32), 1),
]


@pytest.mark.parametrize("name,shape,axis", LAYOUTS, ids=[name for name, _, _ in LAYOUTS])
@pytest.mark.parametrize("kind", ["symmetric", "asymmetric"])
@pytest.mark.parametrize("contiguous", [True, False])
def test_layouts_forward_and_backward_match_cpu_kernels(name, shape, axis, kind, contiguous):
    torch.manual_seed(0)
    x = torch.randn(shape) * 3
    if not contiguous:
        x = x.transpose(0, -1).contiguous().transpose(0, -1)  # same shape, other strides
    g = torch.randn(shape)
    channels = 1 if axis is None else shape[axis]
    if kind == "symmetric":
        params = [torch.rand(channels) * 4 + 0.5] if axis is not None else [torch.tensor(2.5)]
        levels = symmetric_levels(8, True, False)
        fwd, bwd = P.fake_quantize_symmetric, P.fake_quantize_symmetric_backward
    else:
        params = ([torch.randn(channels) - 1, torch.rand(channels) * 4 + 0.5] if axis is not None
                  else [torch.tensor(-1.2), torch.tensor(3.1)])
        levels = (asymmetric_levels(8)[1],)
        fwd, bwd = P.fake_quantize_asymmetric, P.fake_quantize_asymmetric_backward
    cuda_params = on_cuda(*params)
    assert_bit_equal(fwd(x.to(CUDA), *cuda_params, *levels, axis), fwd(x, *params, *levels, axis))
    got = bwd(g.to(CUDA), x.to(CUDA), *cuda_params, *levels, axis)
    want = bwd(g, x, *params, *levels, axis)
    assert_bit_equal(got[0], want[0])  # grad_x is g or 0
    for a, b in zip(got[1:], want[1:]):
        assert a.shape == b.shape and a.dtype == torch.float32 and a.is_cuda
        assert_param_grad_close(a, b, g)


def test_backward_is_deterministic():
    torch.manual_seed(1)
    x, g = torch.randn(64, 64, 32, 32, device=CUDA), torch.randn(64, 64, 32, 32, device=CUDA)
    low, rng = torch.full((64,), -1.0, device=CUDA), torch.full((64,), 2.5, device=CUDA)
    first = P.fake_quantize_asymmetric_backward(g, x, low, rng, 255, 1)
    for _ in range(3):
        again = P.fake_quantize_asymmetric_backward(g, x, low, rng, 255, 1)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


def test_empty_input():
    x = torch.empty(0, 3, device=CUDA)
    scale = torch.ones(3, device=CUDA)
    assert P.fake_quantize_symmetric(x, scale, -128, 127, 1).shape == (0, 3)
    dx, ds = P.fake_quantize_symmetric_backward(x, x, scale, -128, 127, 1)
    assert dx.shape == (0, 3) and torch.equal(ds, torch.zeros(3, device=CUDA))


def test_kernel_checks_its_inputs():
    x = torch.randn(4, 3, device=CUDA)
    with pytest.raises(RuntimeError, match="parameters must be float32 tensors on x's device"):
        P.fake_quantize_symmetric(x, torch.ones(()), -128, 127, None)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        P.fake_quantize_symmetric(x.double(), torch.ones((), device=CUDA), -128, 127, None)
    with pytest.raises(RuntimeError, match="must have 3 element"):
        P.fake_quantize_symmetric(x, torch.ones(4, device=CUDA), -128, 127, 1)
    with pytest.raises(RuntimeError, match="grad must match x"):
        P.fake_quantize_symmetric_backward(torch.randn(4, 4, device=CUDA), x, torch.ones((), device=CUDA),
                                           -128, 127, None)


# ----------------------------------------------------------------- the public functions


def test_public_functions_take_the_cuda_kernels_and_train():
    torch.manual_seed(2)
    x = torch.randn(8, 4, 6, device=CUDA, requires_grad=True)
    scale = torch.tensor(2.0, device=CUDA, requires_grad=True)
    low = torch.full((4,), -1.0, device=CUDA, requires_grad=True)
    rng = torch.full((4,), 2.0, device=CUDA, requires_grad=True)
    with record_paths() as paths:
        y = fake_quantize_symmetric(x, scale, bits=8, signed=True, narrow_range=False)
        z = fake_quantize_asymmetric(y, low, rng, bits=8, axis=1)
        z.square().sum().backward()
    assert paths == ["cuda", "cuda"]
    leaves = [t.detach().cpu().requires_grad_() for t in (x, scale, low, rng)]
    ref = fake_quantize_asymmetric_reference(
        fake_quantize_symmetric_reference(leaves[0], leaves[1], bits=8, signed=True, narrow_range=False),
        leaves[2], leaves[3], bits=8, axis=1)
    ref.square().sum().backward()
    for t, r in zip((x, scale, low, rng), leaves):
        torch.testing.assert_close(t.grad.cpu(), r.grad, rtol=1e-5, atol=1e-4)


def test_reference_runs_under_vmap_on_cuda():
    x = torch.randn(3, 5, device=CUDA)
    scale = torch.tensor(2.0, device=CUDA)
    with record_paths() as paths:
        out = torch.func.vmap(lambda r: fake_quantize_symmetric(r, scale, bits=8, signed=True, narrow_range=False))(x)
    assert set(paths) == {"reference"}
    assert_bit_equal(out, sym(x, scale, 8, True, False))


def test_env_reference_forces_the_reference(monkeypatch):
    monkeypatch.setenv("PURECOMP_OPS", "reference")
    with record_paths() as paths:
        fake_quantize_symmetric(torch.randn(4, device=CUDA), torch.tensor(1.0, device=CUDA),
                                bits=8, signed=True, narrow_range=False)
    assert paths == ["reference"]


@pytest.mark.parametrize("kind", ["symmetric", "asymmetric"])
def test_opcheck_on_cuda(kind):
    x = torch.randn(4, 3, 5, device=CUDA)
    g = torch.randn(4, 3, 5, device=CUDA)
    if kind == "symmetric":
        params, static = [torch.rand(3, device=CUDA) + 0.5], (-128, 127, 1)
        fwd, bwd = P.fake_quantize_symmetric.default, P.fake_quantize_symmetric_backward.default
    else:
        params, static = [torch.randn(3, device=CUDA), torch.rand(3, device=CUDA) + 0.5], (255, 1)
        fwd, bwd = P.fake_quantize_asymmetric.default, P.fake_quantize_asymmetric_backward.default
    torch.library.opcheck(fwd, (x.clone().requires_grad_(), *[p.clone().requires_grad_() for p in params], *static))
    torch.library.opcheck(bwd, (g, x, *params, *static))


# ----------------------------------------------------------------- a real model on the GPU


class CompareWithCpuKernels(TorchDispatchMode):
    """Runs every ``purecomp::`` op call a second time on CPU copies of its inputs (the CPU
    kernels) and checks the GPU result: forward outputs and grad_x bit for bit, parameter
    gradients to float tolerance. ``calls`` counts the checked calls per op."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        on_device = any(isinstance(a, torch.Tensor) and a.device.type == CHECKED_DEVICE for a in args)
        if func.namespace == "purecomp" and on_device:
            cpu = func(*[a.cpu() if isinstance(a, torch.Tensor) else a for a in args], **kwargs)
            name = func.__name__.split(".")[0]
            self.calls[name] += 1
            if name.endswith("_backward"):
                assert_bit_equal(out[0], cpu[0])
                for a, b in zip(out[1:], cpu[1:]):
                    assert_param_grad_close(a, b, args[0])
            else:
                assert_bit_equal(out, cpu)
        return out


def qat_step_checked_against_cpu(arch: str, device: torch.device) -> CompareWithCpuKernels:
    """One INT8 QAT forward and backward of a torchvision model on ``device``, every fake-quantize
    call compared with the CPU kernels on the same inputs."""
    import torchvision

    import purecomp as pc

    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None, num_classes=10).to(device).train()
    x, y = torch.randn(4, 3, 64, 64, device=device), torch.randint(0, 10, (4,), device=device)
    method = pc.quantization(weights=dict(per_channel=True), activations=dict(mode="asymmetric"))
    params = dict(model.named_parameters())
    state = method.init(pc.trace(model, (x,)), params, [x])
    compare = CompareWithCpuKernels()
    with record_paths() as paths, compare:
        loss = torch.nn.functional.cross_entropy(pc.apply(model, method, params, state, x), y)
        loss.backward()
    assert set(paths) == {device.type if device.type == "cuda" else "cpp"}
    assert torch.isfinite(loss)
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in pc.trainable(state))
    return compare


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_qat_step_on_cuda_model_matches_the_cpu_kernels_call_by_call(arch):
    compare = qat_step_checked_against_cpu(arch, CUDA)
    assert compare.calls["fake_quantize_symmetric"] > 0 and compare.calls["fake_quantize_asymmetric"] > 0
    assert compare.calls["fake_quantize_symmetric_backward"] == compare.calls["fake_quantize_symmetric"]
    assert compare.calls["fake_quantize_asymmetric_backward"] == compare.calls["fake_quantize_asymmetric"]
