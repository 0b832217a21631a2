"""Export: materialize, ONNX (QDQ with int8 initializers), onnxruntime and OpenVINO."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import purecomp as pc
from purecomp import export

from models import tiny_bert, torchvision_model


def quantized(model, args, kwargs=None, data=None, **settings):
    graph = pc.trace(model, args, kwargs)
    method = pc.quantization(**settings)
    params = dict(model.named_parameters())
    state = method.init(graph, params, data or [args[0]])
    return method, params, state


DEEP_NOISE_FLOOR = 4.0  # output steps; see test_shallow_export_agrees_within_one_step for the strict bound


def int8_initializers(path):
    m = onnx.load(str(path))
    return {i.name: i for i in m.graph.initializer if i.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)}


def test_export_ops_follow_onnx_semantics():
    x = torch.tensor([-3.0, -0.25, 0.25, 0.74, 0.75, 10.0])
    out = torch.ops.purecomp.qdq(x, torch.tensor(0.5), torch.tensor(3, dtype=torch.uint8), 0, 15, 1)
    expected = (torch.clamp(torch.round(x / 0.5) + 3, 0, 15) - 3) * 0.5
    assert torch.equal(out, expected)
    q = torch.tensor([[-7, 0, 7], [1, 2, 3]], dtype=torch.int8)
    w = torch.ops.purecomp.dq(q, torch.tensor([0.5, 2.0]), torch.zeros(2, dtype=torch.int8), 0)
    assert torch.equal(w, q.float() * torch.tensor([[0.5], [2.0]]))


def test_materialize_equals_apply_and_round_trips():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3)).eval()
    x = torch.randn(5, 1, 8, 8)
    method, params, state = quantized(model, (x,), weights=dict(per_channel=True))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    module = export.materialize(model, method, params, state)
    with torch.no_grad():
        expected = pc.apply(model, method, params, state, x)
        torch.testing.assert_close(module(x), expected, rtol=0, atol=0)
    ints = module.model[0].parametrizations.weight.original
    assert ints.dtype == torch.int8 and int(ints.abs().max()) <= 127
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the user's model is untouched"
    # BatchNorm folded with the graph: same integers, scales times |gamma / sigma|
    folded = export.materialize(model, method, params, state, graph=pc.trace(model, (x,)))
    assert isinstance(folded.model[1], nn.Identity)
    assert torch.equal(folded.model[0].parametrizations.weight.original.abs(), ints.abs())
    with torch.no_grad():
        torch.testing.assert_close(folded(x), expected, rtol=1e-4, atol=1e-4)
    # saved and reloaded
    state_dict = module.state_dict()
    again = export.materialize(model, method, params, state)
    again.load_state_dict(state_dict)
    with torch.no_grad():
        assert torch.equal(again(x), module(x))
    exported = torch.export.export(module, (x,), strict=False)
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), module(x))


@pytest.mark.parametrize("mode", ["symmetric", "asymmetric"])
def test_shallow_export_agrees_within_one_step(mode, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    ).eval()
    model[1].running_mean.uniform_(-0.5, 0.5)
    model[1].running_var.uniform_(0.5, 2.0)
    x = torch.rand(6, 1, 8, 8)
    method, params, state = quantized(model, (x,), weights=dict(per_channel=True),
                                      activations=dict(mode=mode), quantize_outputs=True)
    path = export.to_onnx(model, method, params, state, (x,), tmp_path / "small.onnx")
    result = export.check(path, model, method, params, state, (torch.rand(32, 1, 8, 8),))
    assert result.output_quantized
    assert result.max_steps <= 1.0 + 1e-4 and result.fused_max_steps <= 1.0 + 1e-4
    assert export.fused_op_counts(path)["QLinearConv"] == 2


@pytest.mark.slow
def test_resnet18_int8_export_fuses_every_conv_and_add(tmp_path):
    model, x = torchvision_model("resnet18")
    method, params, state = quantized(
        model, (x,), data=[torch.randn(8, 3, 64, 64) for _ in range(2)],
        weights=dict(per_channel=True), quantize_outputs=True,
    )
    path = export.to_onnx(model, method, params, state, (x,), tmp_path / "r18.onnx")
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    counts = export.fused_op_counts(path)
    assert counts["QLinearConv"] == 20 and counts["Conv"] == 0
    assert counts["QLinearAdd"] == 8
    result = export.check(path, model, method, params, state, (torch.randn(3, 3, 64, 64),))
    assert result.output_quantized
    # 20 layers amplify float-level differences (conv accumulation order) at rounding
    # boundaries: PyTorch batched vs per-sample differs by up to 2 output steps on this model.
    assert result.max_steps <= DEEP_NOISE_FLOOR and result.fused_max_steps <= DEEP_NOISE_FLOOR
    inits = int8_initializers(path)
    weight_inits = [i for i in inits.values() if len(i.dims) == 4]
    assert len(weight_inits) == 20
    fp32 = export.to_onnx(model, pc.identity(), params, (), (x,), tmp_path / "fp32.onnx")
    ratio = path.stat().st_size / fp32.stat().st_size
    assert ratio <= 0.3, f"INT8 file is {ratio:.2f} of the FP32 file"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_b0"])
def test_torchvision_exports_run_in_onnxruntime(name, tmp_path):
    model, x = torchvision_model(name)
    method, params, state = quantized(model, (x,), weights=dict(per_channel=True),
                                      activations=dict(mode="asymmetric"), quantize_outputs=True)
    path = export.to_onnx(model, method, params, state, (x,), tmp_path / f"{name}.onnx")
    result = export.check(path, model, method, params, state, (x,))
    assert result.max_steps <= DEEP_NOISE_FLOOR and result.fused_max_steps <= DEEP_NOISE_FLOOR
    counts = export.fused_op_counts(path)
    assert counts["QLinearConv"] > 0
    if name == "mobilenet_v2":  # uint8 activations everywhere: every conv and residual add fuses
        assert counts["Conv"] == 0 and counts["QLinearAdd"] == 10
    assert int8_initializers(path)
    with torch.no_grad():
        expected = pc.apply(model, method, params, state, x)
    _openvino_matches(path, (x,), expected, result.output_step)


@pytest.mark.slow
@pytest.mark.parametrize("bits", [(4, 4), (4, 8)])
def test_low_and_mixed_bit_exports_run(bits, tmp_path):
    model, x = torchvision_model("resnet18")
    graph = pc.trace(model, (x,))
    params = dict(model.named_parameters())
    weight_bits, act_bits = bits
    base = pc.quantization(weights=dict(per_channel=True), quantize_outputs=True)
    plan = {}
    if weight_bits != act_bits:  # mixed: layer3/layer4 weights at 4 bits, everything else at 8
        plan = {name: 4 for name in base.init(graph, params, [x]).weights if name.startswith(("layer3", "layer4"))}
        method = pc.quantization(weights=dict(per_channel=True), quantize_outputs=True, precision=plan)
    else:
        method = pc.quantization(weights=dict(per_channel=True, bits=4), activations=dict(bits=4), quantize_outputs=True)
    state = method.init(graph, params, [x])
    path = export.to_onnx(model, method, params, state, (x,), tmp_path / "low.onnx")
    result = export.check(path, model, method, params, state, (x,))
    assert result.max_steps <= DEEP_NOISE_FLOOR
    clips = [n for n in onnx.load(str(path)).graph.node if n.op_type == "Clip"]
    if weight_bits == act_bits:
        assert clips, "4-bit activations need Clip between QuantizeLinear and DequantizeLinear"
        for q in state.weights.values():
            assert q.bits == 4
    ints = int8_initializers(path)
    four_bit = [i for i in ints.values() if len(i.dims) == 4 and np.abs(onnx.numpy_helper.to_array(i)).max() <= 7]
    assert len(four_bit) >= (20 if weight_bits == 4 and not plan else len(plan) - 1)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["symmetric", "asymmetric"])
def test_bert_export_runs_in_onnxruntime_and_openvino(mode, tmp_path):
    model, ids, mask = tiny_bert()

    class Encoder(nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids, attention_mask=attention_mask).last_hidden_state

    wrapped = Encoder(model).eval()
    method, params, state = quantized(wrapped, (ids, mask), data=[((ids, mask),)],
                                      weights=dict(per_channel=True), activations=dict(mode=mode))
    path = export.to_onnx(wrapped, method, params, state, (ids, mask), tmp_path / "bert.onnx")
    result = export.check(path, wrapped, method, params, state, (ids, mask))
    assert result.max_steps <= 1.0 + 1e-4 and result.fused_max_steps <= DEEP_NOISE_FLOOR
    assert len([i for i in int8_initializers(path).values() if len(i.dims) == 2]) >= 13
    _openvino_matches(path, (ids, mask), pc.apply(wrapped, method, params, state, ids, mask), result.output_step)


@pytest.mark.slow
def test_openvino_runs_the_resnet18_export(tmp_path):
    model, x = torchvision_model("resnet18")
    method, params, state = quantized(model, (x,), weights=dict(per_channel=True), quantize_outputs=True)
    path = export.to_onnx(model, method, params, state, (x,), tmp_path / "r18.onnx")
    with torch.no_grad():
        expected = pc.apply(model, method, params, state, x)
    step = export.check(path, model, method, params, state, (x,)).output_step
    _openvino_matches(path, (x,), expected, step)


def _openvino_matches(path, inputs, expected, step):
    ov = pytest.importorskip("openvino", reason="the optional 'openvino' extra is not installed")
    compiled = ov.Core().compile_model(ov.Core().read_model(str(path)), "CPU")
    out = compiled([t.numpy() for t in inputs])[0]
    diff = np.abs(out - expected.detach().numpy()).max()
    assert diff <= 4 * step, f"OpenVINO differs by {diff / step:.2f} output steps"
