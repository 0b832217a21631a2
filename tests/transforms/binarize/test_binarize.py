"""Binarization: exact two-valued weights and activations, gradients against numpy, the staged
schedule, placement on resnet18, configs, and ONNX export equal to PyTorch."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import purecomp as pc
from purecomp import export
from purecomp.errors import CalibrationError, ConfigError, StateError
from purecomp.ops.binarize import activation_binarize, dorefa_binarize, xnor_binarize
from purecomp.transforms.binarize import BinarizationState, StagedSchedule, apply_to_optimizer

from models import torchvision_model

RESNET_IGNORED = ["conv1", "fc", "layer2.0.downsample", "layer3.0.downsample", "layer4.0.downsample"]


def weights(draw: st.DrawFn) -> torch.Tensor:
    shape = draw(st.sampled_from([(1, 1, 1, 1), (3, 2, 3, 3), (8, 4, 1, 1), (5, 7)]))
    seed = draw(st.integers(0, 2**16))
    scale = draw(st.floats(1e-3, 1e3))
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale
    if draw(st.booleans()):  # exact zeros and repeated values
        w = torch.where(w.abs() < scale / 2, torch.zeros_like(w), w.round())
    return w


weight_tensors = st.composite(weights)


# ---------------------------------------------------------------- weights


@settings(max_examples=60, deadline=None)
@given(weight_tensors())
def test_xnor_takes_exactly_two_values_per_filter(w):
    w = w.requires_grad_()
    b = xnor_binarize(w)
    wn = w.detach().numpy().astype(np.float64)
    alpha = np.abs(wn).reshape(wn.shape[0], -1).mean(axis=1)
    for o in range(w.shape[0]):
        magnitudes = set(b[o].detach().abs().reshape(-1).tolist())
        assert len(magnitudes) == 1  # exactly +a and/or -a
        assert magnitudes.pop() == pytest.approx(alpha[o], rel=1e-6)
        expected = np.where(wn[o] > 0, alpha[o], -alpha[o])
        np.testing.assert_allclose(b[o].detach().numpy(), expected, rtol=1e-6)
    g = torch.randn_like(b)
    b.backward(g)
    assert torch.equal(w.grad, g)  # straight-through


@settings(max_examples=60, deadline=None)
@given(weight_tensors())
def test_dorefa_takes_exactly_two_values_per_tensor(w):
    w = w.requires_grad_()
    b = dorefa_binarize(w)
    alpha = float(np.abs(w.detach().numpy().astype(np.float64)).mean())
    magnitudes = set(b.detach().abs().reshape(-1).tolist())
    assert len(magnitudes) == 1 and magnitudes.pop() == pytest.approx(alpha, rel=1e-6)
    np.testing.assert_allclose(b.detach().numpy(), np.where(w.detach().numpy() > 0, alpha, -alpha), rtol=1e-6)
    g = torch.randn_like(b)
    b.backward(g)
    assert torch.equal(w.grad, g)


# ---------------------------------------------------------------- activations


def numpy_activation(x, s, t, g):
    """Independent numpy statement of paper eq. 5 and its gradients (float64 sums)."""
    shape = (1, -1) + (1,) * (x.ndim - 2)
    thr = np.float32(s) * t.astype(np.float32).reshape(shape)
    out = np.where(x > thr, np.float32(s), np.float32(0)).astype(np.float32)
    gx = g * ((x >= 0) & (x <= s))
    gs = np.sum(np.where(x > s, g, g * (out - x) / s), dtype=np.float64)
    axes = tuple(a for a in range(x.ndim) if a != 1)
    gt = -np.sum(g * ((x > 0) & (x < s)), axis=axes, dtype=np.float64)
    return out, gx, gs, gt


@st.composite
def activation_cases(draw: st.DrawFn):
    shape = draw(st.sampled_from([(2, 3, 4, 4), (1, 5, 3, 2), (3, 1, 2, 7), (4, 6)]))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    s = draw(st.floats(0.05, 20.0))
    x = (torch.randn(shape, generator=gen) * s).float()
    t = torch.rand(shape[1], generator=gen)
    if draw(st.booleans()):  # put elements exactly on the threshold and on 0 and s
        thr = (torch.tensor(s, dtype=torch.float32) * t).reshape((1, -1) + (1,) * (len(shape) - 2))
        x = torch.where(torch.rand(shape, generator=gen) < 0.3, thr.expand(shape), x)
        x.view(-1)[0] = 0.0
        x.view(-1)[-1] = float(np.float32(s))
    return x, torch.tensor([s], dtype=torch.float32), t


@settings(max_examples=80, deadline=None)
@given(activation_cases())
def test_activation_outputs_are_zero_or_s_and_gradients_match_numpy(case):
    x, s, t = case
    xg, sg, tg = x.clone().requires_grad_(), s.clone().requires_grad_(), t.clone().requires_grad_()
    out = activation_binarize(xg, sg, tg)
    assert set(torch.unique(out.detach()).tolist()) <= {0.0, float(s)}
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    out.backward(g)
    ref_out, gx, gs, gt = numpy_activation(x.numpy(), float(s), t.numpy(), g.numpy())
    assert np.array_equal(out.detach().numpy(), ref_out)  # ties (x == s t) give 0
    np.testing.assert_allclose(xg.grad.numpy(), gx, rtol=0, atol=0)
    np.testing.assert_allclose(float(sg.grad), gs, rtol=1e-4, atol=1e-4 * (1 + np.abs(g.numpy()).sum()))
    np.testing.assert_allclose(tg.grad.numpy(), gt, rtol=1e-5, atol=1e-5)


def test_activation_binarize_checks_its_parameters():
    x = torch.rand(2, 3, 4, 4)
    with pytest.raises(Exception, match="threshold must have shape"):
        activation_binarize(x, torch.ones(1), torch.ones(4))
    with pytest.raises(Exception, match="scale must hold one value"):
        activation_binarize(x, torch.ones(3), torch.ones(3))


# ---------------------------------------------------------------- staged schedule


def test_staged_schedule_switches_at_the_configured_epochs():
    sched = StagedSchedule(
        activations_quant_start_epoch=2, weights_quant_start_epoch=4, lr_poly_drop_start_epoch=6,
        lr_poly_drop_duration_epochs=4, disable_wd_start_epoch=7, base_lr=1e-2, base_wd=1e-4,
    )
    stages = [sched.stage(e) for e in range(12)]
    assert [s.activations for s in stages] == [e >= 2 for e in range(12)]
    assert [s.weights for s in stages] == [e >= 4 for e in range(12)]
    assert [s.weight_decay for s in stages] == [1e-4 if e < 7 else 0.0 for e in range(12)]
    for e, s in enumerate(stages):
        if e < 6:
            assert s.lr == 1e-2
        elif e < 10:
            assert s.lr == pytest.approx(1e-2 * ((10 - e) / 4) ** 2.1)
        else:
            assert s.lr == 0.0
    assert sched.lr(7.5) == pytest.approx(1e-2 * (2.5 / 4) ** 2.1)  # fractional epochs drop smoothly


def test_apply_to_optimizer_sets_every_group():
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam([{"params": [a]}, {"params": [b], "lr": 5.0}], lr=1.0, weight_decay=0.5)
    apply_to_optimizer(opt, StagedSchedule(base_lr=0.01, base_wd=0.0).stage(0))
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == [(0.01, 0.0), (0.01, 0.0)]


def test_method_steps_through_the_stages():
    model, x = torchvision_model("resnet18")
    graph = pc.trace(model, (x,))
    params = dict(model.named_parameters())
    method = pc.binarization("dorefa", schedule=StagedSchedule(1, 3), ignored_scopes=RESNET_IGNORED)
    state = method.init(graph, params, [x])
    assert not state.activations_on and not state.weights_on
    assert method.params(params, state)["layer1.0.conv1.weight"] is params["layer1.0.conv1.weight"]
    assert method.sites(state) == {}
    state = method.step(state, pc.Progress(epoch=1))
    assert state.activations_on and not state.weights_on and len(method.sites(state)) == 16
    state = method.step(state, pc.Progress(epoch=3))
    assert state.weights_on
    assert len(torch.unique(method.params(params, state)["layer1.0.conv1.weight"])) == 2


# ---------------------------------------------------------------- placement and training


@pytest.mark.slow
def test_resnet18_binarizes_the_expected_convs_and_trains():
    model, x = torchvision_model("resnet18")  # eval-mode BN: a batch of 2 at 1x1 would normalize to 0
    graph = pc.trace(model, (x,))
    params = dict(model.named_parameters())
    method = pc.binarization("xnor", schedule=StagedSchedule(0, 0), ignored_scopes=RESNET_IGNORED)
    state = method.init(graph, params, [x])
    convs = [n.scope for n in graph if n.op == "conv2d"]
    expected = {c for c in convs if not any(c == p or c.startswith(p + ".") for p in RESNET_IGNORED)}
    assert {name.rsplit(".", 1)[0] for name in state.weights} == expected and len(expected) == 16
    assert {k.split("/")[0] for k in state.activations} == expected
    for b in state.activations.values():  # scale from calibration: the input's top-0.1% value
        assert b.scale.item() > 0 and torch.equal(b.threshold, torch.full_like(b.threshold, 0.5))
    opt = torch.optim.Adam(list(params.values()) + pc.trainable(state), lr=1e-3)
    before = {k: (b.log_scale.detach().clone(), b.hidden_threshold.detach().clone()) for k, b in state.activations.items()}
    y = torch.tensor([1, 2])
    for _ in range(2):
        loss = nn.functional.cross_entropy(pc.apply(model, method, params, state, x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    # an untrained network's deepest binarized inputs may be all below threshold (no gradient)
    scales = [not torch.equal(before[k][0], b.log_scale) for k, b in state.activations.items()]
    thresholds = [not torch.equal(before[k][1], b.hidden_threshold) for k, b in state.activations.items()]
    assert sum(scales) >= 10 and sum(thresholds) >= 10


def test_init_needs_data_and_a_conv():
    model, x = torchvision_model("resnet18")
    graph = pc.trace(model, (x,))
    params = dict(model.named_parameters())
    with pytest.raises(CalibrationError, match="needs calibration data"):
        pc.binarization().init(graph, params, None)
    with pytest.raises(ConfigError, match="no conv2d is left"):
        pc.binarization(target_scopes=["fc"]).init(graph, params, [x])
    with pytest.raises(ConfigError, match="mode"):
        pc.binarization("sign")


def test_inputs_without_positive_values_are_refused():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Conv2d(2, 2, 1)).eval()
    x = -torch.rand(2, 1, 5, 5)
    graph = pc.trace(model, (x,))
    with pytest.raises(CalibrationError, match="no positive values"):
        pc.binarization().init(graph, dict(model.named_parameters()), [x])


# ---------------------------------------------------------------- config


def test_config_builds_the_staged_method():
    cfg = {
        "input_info": {"sample_size": [2, 3, 64, 64]},
        "compression": {
            "algorithm": "binarization", "mode": "dorefa",
            "params": {"activations_quant_start_epoch": 2, "weights_quant_start_epoch": 5, "base_lr": 0.01},
            "initializer": {"range": {"num_init_samples": 4}},
            "ignored_scopes": RESNET_IGNORED,
        },
    }
    config = pc.load_config(cfg)
    model, x = torchvision_model("resnet18")
    method = config.method()
    state = method.init(config.trace(model), dict(model.named_parameters()), [x])
    assert isinstance(state, BinarizationState) and state.mode == "dorefa"
    assert not method.step(state, pc.Progress(epoch=1)).activations_on
    stepped = method.step(state, pc.Progress(epoch=2))
    assert stepped.activations_on and not stepped.weights_on


@pytest.mark.parametrize(
    ("section", "path"),
    [
        ({"params": {"batch_size": 2}}, "compression.params.batch_size"),
        ({"mode": "ternary"}, "compression.mode"),
        ({"params": {"lr_poly_drop_duration_epochs": 0}}, "compression.params.lr_poly_drop_duration_epochs"),
    ],
)
def test_config_errors_name_the_key(section, path):
    cfg = {"compression": {"algorithm": "binarization", **section}}
    with pytest.raises(ConfigError) as info:
        pc.load_config(cfg)
    assert info.value.path == path


# ---------------------------------------------------------------- export


def digits_cnn() -> nn.Module:
    """The examples' digits CNN: three conv-BN-ReLU blocks, max pool, average pool, linear."""

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(1, 16), *block(16, 32), nn.MaxPool2d(2), *block(32, 64),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )


def _staged_digits_state():
    torch.manual_seed(0)
    model = digits_cnn().eval()
    for m in model.modules():  # non-trivial BN statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.rand(16, 1, 8, 8)
    graph = pc.trace(model, (x,))
    params = dict(model.named_parameters())
    method = pc.binarization("xnor", schedule=StagedSchedule(0, 0), ignored_scopes=["0"])
    state = method.init(graph, params, [x])
    with torch.no_grad():  # thresholds away from 0.5
        for b in state.activations.values():
            b.hidden_threshold.uniform_(-2, 2)
    return model, method, params, state, graph, x


def test_materialized_binarized_model_equals_apply_and_stores_signs():
    model, method, params, state, graph, x = _staged_digits_state()
    small = export.materialize(model, method, params, state, graph)
    assert torch.equal(small(x), pc.apply(model, method, params, state, x))
    conv = small.model[3]
    signs = conv.parametrizations.weight.original
    assert signs.dtype == torch.int8 and set(torch.unique(signs).tolist()) == {-1, 1}
    assert isinstance(small.model[4], nn.BatchNorm2d)  # BN after a binarized conv stays (exact)


def test_onnx_export_runs_in_onnxruntime_equal_to_pytorch(tmp_path):
    import onnxruntime as ort

    model, method, params, state, graph, x = _staged_digits_state()
    path = export.to_onnx(model, method, params, state, (x,), tmp_path / "bin.onnx")
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"Greater", "Where", "DequantizeLinear"} <= ops
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    expected = pc.apply(model, method, params, state, x).detach().numpy()
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_exported_activation_binarizer_is_exact_in_onnxruntime(tmp_path):
    import onnxruntime as ort

    from purecomp.export.modules import BinarizeActivation

    torch.manual_seed(0)
    s = torch.tensor(0.7)
    t = torch.rand(5)
    layer = BinarizeActivation(s, s * t, 1, 4).eval()
    x = torch.randn(3, 5, 6, 6)
    x[0, :, 0, 0] = s * t  # exactly on the thresholds: 0
    path = tmp_path / "act.onnx"
    torch.onnx.export(layer, (x,), str(path), dynamo=True, opset_version=21).save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert np.array_equal(got, layer(x).numpy())
    assert np.array_equal(layer(x).numpy(), activation_binarize(x, s.reshape(1), t).numpy())


def test_binarization_and_pruning_do_not_materialize_together():
    model, x = torchvision_model("resnet18")
    graph = pc.trace(model, (x,))
    params = dict(model.named_parameters())
    method = pc.chain(
        pc.filter_pruning(0.3), pc.binarization(schedule=StagedSchedule(0, 0), ignored_scopes=RESNET_IGNORED)
    )
    state = method.init(graph, params, [x])
    with pytest.raises(StateError, match="does not combine filter pruning with binarization"):
        export.materialize(model, method, params, state, graph)


def test_log_scale_reparametrization():
    b = pc.transforms.binarize.ActivationBinarizer(torch.tensor([math.log(2.0)]), torch.zeros(3))
    assert b.scale.item() == pytest.approx(2.0) and torch.allclose(b.threshold, torch.full((3,), 0.5))


def test_statistics_table_lists_binarized_weights_and_inputs():
    model, method, params, state, graph, x = _staged_digits_state()
    table = pc.statistics(graph, state)["binarization"]
    kinds = [row["kind"] for row in table.rows]
    assert kinds.count("weight") == 2 and kinds.count("activation") == 2
    assert "3/conv2d#0:in0" in str(table)


def test_training_step_runs_the_cpp_kernel_and_matches_the_reference(monkeypatch):
    from purecomp.ops import build, record_paths

    if not build.cpp_available():
        pytest.skip(f"C++ ops unavailable: {build.build_error()}")
    model, method, params, state, graph, x = _staged_digits_state()

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        for leaf in pc.trainable(state):
            leaf.grad = None
        out = pc.apply(model, method, params, state, x)
        out.square().sum().backward()
        return out.detach(), [leaf.grad.clone() for leaf in pc.trainable(state)]

    with record_paths() as paths:
        out_cpp, grads_cpp = run()
    assert set(paths) == {"cpp"} and len(paths) == 2
    monkeypatch.setenv("PURECOMP_OPS", "reference")
    with record_paths() as paths:
        out_ref, grads_ref = run()
    assert set(paths) == {"reference"}
    assert torch.equal(out_cpp, out_ref)
    for a, b in zip(grads_cpp, grads_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
