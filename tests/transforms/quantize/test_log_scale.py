"""Quantizers that train the logarithm of their range (NNCF's ``logarithm_scale``): the forward is
MATH.md's, the gradient of the log leaf is ``range * d out / d range`` (numpy oracle), an SGD step
can never make the range cross zero, and the quantizers go through config, MSE range search,
checkpoints and export like the linear ones."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import purecomp as pc
from purecomp.testing import asymmetric_cases, symmetric_cases
from purecomp.transforms.ptq.ranges import mse_quantizer
from purecomp.transforms.quantize import (
    AsymmetricQuantizer,
    LogRangeAsymmetricQuantizer,
    LogScaleSymmetricQuantizer,
    SymmetricQuantizer,
    make_quantizer,
)
from purecomp.transforms.quantize.quantizer import rescaled

import oracles

PROPERTY = settings(max_examples=60)  # on top of the profile tests/conftest.py loads


def log_symmetric(case) -> LogScaleSymmetricQuantizer:
    return LogScaleSymmetricQuantizer(case.scale.log().requires_grad_(True), case.bits, case.signed,
                                      case.narrow_range, case.axis)


def log_asymmetric(case) -> LogRangeAsymmetricQuantizer:
    return LogRangeAsymmetricQuantizer(case.input_low.clone().requires_grad_(True),
                                       case.input_range.abs().log().requires_grad_(True), case.bits, case.axis)


@PROPERTY
@given(symmetric_cases(), st.integers(0, 2**31 - 1))
def test_log_scale_symmetric_forward_and_gradient_match_numpy(case, seed):
    q = log_symmetric(case)
    scale = q.scale.detach().numpy()  # exp(log s): the oracle gets the scale the quantizer uses
    g = torch.randn(case.x.shape, generator=torch.Generator().manual_seed(seed))
    out = q(case.x)
    out.backward(g)
    expected, _, ds = oracles.symmetric(case.x.numpy(), scale, *case.levels, axis=case.axis, grad=g.numpy())
    np.testing.assert_array_equal(out.detach().numpy(), expected)
    # d out / d log s = s * d out / d s
    np.testing.assert_allclose(q.log_scale.grad.numpy(), ds * scale, rtol=1e-4, atol=1e-4 * max(1.0, scale.max()))


@PROPERTY
@given(asymmetric_cases(), st.integers(0, 2**31 - 1))
def test_log_range_asymmetric_forward_and_gradient_match_numpy(case, seed):
    q = log_asymmetric(case)
    rng = q.input_range.detach().numpy()
    g = torch.randn(case.x.shape, generator=torch.Generator().manual_seed(seed))
    out = q(case.x)
    out.backward(g)
    expected, _, dlow, drange = oracles.asymmetric(case.x.numpy(), case.input_low.numpy(), rng, case.bits,
                                                   axis=case.axis, grad=g.numpy())
    np.testing.assert_array_equal(out.detach().numpy(), expected)
    np.testing.assert_allclose(q.input_low.grad.numpy(), dlow, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(q.log_input_range.grad.numpy(), drange * rng, rtol=1e-4,
                               atol=1e-4 * max(1.0, float(rng.max())))


def test_an_sgd_step_never_makes_the_scale_cross_zero():
    x = torch.full((64,), 10.0)  # every value above the range
    linear = make_quantizer("symmetric", torch.tensor(-1.0), torch.tensor(1.0), bits=8, signed=True,
                            narrow_range=True, axis=None)
    logarithmic = make_quantizer("symmetric", torch.tensor(-1.0), torch.tensor(1.0), bits=8, signed=True,
                                 narrow_range=True, axis=None, log_scale=True)
    assert isinstance(linear, SymmetricQuantizer) and isinstance(logarithmic, LogScaleSymmetricQuantizer)
    for q, leaf in ((linear, linear.scale), (logarithmic, logarithmic.log_scale)):
        opt = torch.optim.SGD([leaf], lr=0.1)
        q(x).sum().backward()  # pushes the scale down: d loss / d scale = +1 per value above the range
        opt.step()
    assert float(linear.scale.detach()) == pytest.approx(1.0 - 0.1 * 64)  # crossed zero
    assert float(logarithmic.scale.detach()) == pytest.approx(math.exp(-0.1 * 64), rel=1e-5)


@pytest.mark.parametrize("mode, cls", [("symmetric", LogScaleSymmetricQuantizer),
                                       ("asymmetric", LogRangeAsymmetricQuantizer)])
def test_rescaled_multiplies_the_float_range(mode, cls):
    q = make_quantizer(mode, torch.tensor([-1.0, -2.0]), torch.tensor([3.0, 4.0]), bits=8, signed=True,
                       narrow_range=False, axis=0, log_scale=True)
    assert isinstance(q, cls)
    alpha = torch.tensor([0.5, 0.25])
    low, high = q.float_range()
    low2, high2 = rescaled(q, alpha).float_range()
    linear = rescaled(q.linear(), alpha)
    assert isinstance(linear, SymmetricQuantizer | AsymmetricQuantizer)
    torch.testing.assert_close(high2, linear.float_range()[1])
    torch.testing.assert_close(low2, linear.float_range()[0])
    if mode == "symmetric":
        torch.testing.assert_close(high2, high * alpha)


def test_mse_search_keeps_the_log_leaf_trainable_and_never_loses_to_min_max():
    torch.manual_seed(0)
    w = torch.randn(8, 32) * torch.linspace(0.1, 2.0, 8)[:, None]
    w[0, 0] = 40.0  # an outlier that min-max pays for
    q = make_quantizer("symmetric", w.amin(1), w.amax(1), bits=4, signed=True, narrow_range=True, axis=0,
                       log_scale=True)
    best = mse_quantizer(q, w)
    assert isinstance(best, LogScaleSymmetricQuantizer) and best.log_scale.requires_grad
    err = lambda quantizer: ((quantizer(w) - w) ** 2).sum(1)  # noqa: E731
    with torch.no_grad():
        assert bool((err(best) <= err(q) + 1e-6).all()) and float(err(best).sum()) < float(err(q).sum())


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


NNCF_SECTION = {"algorithm": "quantization", "weights": {"logarithm_scale": True, "per_channel": True},
                "activations": {"mode": "asymmetric", "logarithm_scale": True},
                "initializer": {"range": {"num_init_samples": 4}, "batchnorm_adaptation": {
                    "num_bn_adaptation_samples": 0}}}


def test_nncf_logarithm_scale_config_trains_checkpoints_and_exports(tmp_path):
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    x = torch.rand(4, 1, 8, 8)
    cfg = pc.Config.from_dict({"input_info": {"sample_size": [1, 1, 8, 8]}, "compression": NNCF_SECTION})
    cfg = pc.register_default_init_args(cfg, [(x, torch.zeros(4, dtype=torch.long))], nn.functional.cross_entropy)
    ctrl, model = pc.create_compressed_model(small_cnn(), cfg)
    state = ctrl.state
    assert state.weights and all(isinstance(q, LogScaleSymmetricQuantizer) for q in state.weights.values())
    assert state.activations and all(isinstance(q, LogRangeAsymmetricQuantizer) for q in state.activations.values())
    names = [n for n, _ in model.named_parameters()]
    assert any(n.endswith("log_scale") for n in names) and any(n.endswith("log_input_range") for n in names)

    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    before = {k: q.log_scale.detach().clone() for k, q in ctrl.state.weights.items()}
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 0])).backward()
        opt.step()
    assert any(not torch.equal(before[k], q.log_scale) for k, q in ctrl.state.weights.items())

    pc.save_state(tmp_path / "state.pt", ctrl.state)
    loaded = pc.load_state(tmp_path / "state.pt")
    for k, q in ctrl.state.weights.items():
        assert torch.equal(loaded.weights[k].log_scale, q.log_scale) and loaded.weights[k].log_scale.requires_grad

    model.eval()
    path = ctrl.export_model(tmp_path / "model.onnx")
    with torch.no_grad():
        ours = model(x).numpy()
    theirs = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"args_0": x.numpy()})[0]
    np.testing.assert_allclose(theirs, ours, atol=1e-4)


def _quantizer_types(logarithm_scale: bool | None, calibration_mode: str) -> tuple[set[type], set[type]]:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).train()
    x = torch.randn(2, 3, 32, 32)
    graph = pc.trace(model, (x,))
    weights = {} if logarithm_scale is None else {"logarithm_scale": logarithm_scale}
    method = pc.quantization(weights=weights)
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    state = method.init(graph, params, [(x, None)], calibration_mode=calibration_mode)
    return {type(q) for q in state.weights.values()}, {type(q) for q in state.activations.values()}


@pytest.mark.parametrize(("logarithm_scale", "calibration_mode", "log_weights"), [
    (None, "train", True),    # trained from scratch: log(scale), so SGD cannot drive it across zero
    (None, "eval", False),    # a trained model fine-tunes its scale as it is
    (False, "train", False),  # an explicit choice is kept
    (True, "eval", True),
])
def test_logarithm_scale_left_unset_follows_the_calibration_mode_for_weights_only(
        logarithm_scale, calibration_mode, log_weights):
    weights, activations = _quantizer_types(logarithm_scale, calibration_mode)
    assert weights == ({LogScaleSymmetricQuantizer} if log_weights else {SymmetricQuantizer})
    assert activations == {SymmetricQuantizer}


def test_logarithm_scale_must_be_a_boolean_or_unset():
    with pytest.raises(pc.errors.ConfigError, match=r"weights\.logarithm_scale"):
        pc.quantization(weights={"logarithm_scale": 1})
