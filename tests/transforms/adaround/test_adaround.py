"""AdaRound: the rounding math against closed forms and torch's own fake-quantize, one layer's
optimization, the sequential recording, and ``pc.quantize(..., adaround=...)`` on resnet18."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import purecomp as pc
from purecomp.errors import ConfigError
from purecomp.transforms.adaround import (
    AdaRoundParameters,
    adaround_layer,
    adaround_weights,
    beta_at,
    initial_variables,
    rectified_sigmoid,
    rounding_regularizer,
    soft_weight,
)
from purecomp.transforms.adaround.rounding import broadcast_grid, is_on_grid, nearest_weight
from purecomp.transforms.adaround.sequential import _record, weight_quantizers
from purecomp.transforms.ptq.bias_correction import input_quantizers

# ------------------------------------------------------------------ the rounding math


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(0.01, 2.0))
def test_soft_weight_starts_at_the_float_weight_and_h_stays_in_0_1(seed, delta):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(64, generator=g, dtype=torch.float64) * 3 * delta
    d, z = torch.tensor(delta, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)
    u = w / d
    v = initial_variables(u - torch.floor(u))
    h = rectified_sigmoid(v)
    assert bool(((h >= 0) & (h <= 1)).all())
    inside = (u > -8) & (u < 7)  # 4-bit signed grid: the clip does not act
    torch.testing.assert_close(soft_weight(torch.floor(u), v, d, z, -8, 7)[inside], w[inside], rtol=0, atol=1e-5 * delta)


@settings(max_examples=40, deadline=None)
@given(st.floats(-6, 6))
def test_gradient_of_the_soft_weight_is_the_rectified_sigmoids(v0):
    v = torch.tensor([v0], dtype=torch.float64, requires_grad=True)
    delta = 0.3
    soft_weight(torch.tensor([0.0], dtype=torch.float64), v, torch.tensor(delta, dtype=torch.float64),
                torch.tensor(0.0, dtype=torch.float64), -8, 7).sum().backward()
    s = 1 / (1 + np.exp(-v0))
    inner = s * 1.2 - 0.1
    expected = delta * 1.2 * s * (1 - s) if 0 < inner < 1 else 0.0  # the clip stops the gradient outside [0, 1]
    assert abs(float(v.grad) - expected) < 1e-9


def test_regularizer_is_zero_only_at_0_or_1_and_beta_anneals():
    assert float(rounding_regularizer(torch.tensor([-20.0, 20.0]), 2.0)) == 0.0
    assert float(rounding_regularizer(torch.tensor([0.0]), 2.0)) == pytest.approx(1.0)  # h = 0.5
    assert beta_at(0.0) == beta_at(0.2) == 20.0
    assert beta_at(0.6) == pytest.approx(11.0) and beta_at(1.0) == pytest.approx(2.0)


# ------------------------------------------------------------------ one layer


def _linear_problem(seed: int = 0, rows: int = 256):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(12, 24, generator=g)
    # correlated inputs (rounding matters), small enough that the regularizer (0.01 per weight) can settle every
    # variable within the reconstruction error's scale: AdaRound's balance, as AIMET's, is not scale-free
    x = torch.randn(rows, 24, generator=g) @ torch.randn(24, 24, generator=g) * 0.1 / 24**0.5
    scale = w.abs().amax(1) / 7
    return w, x, x @ w.T, scale


def test_layer_ends_with_variables_at_0_or_1_on_the_grid_and_below_nearest():
    w, x, y, scale = _linear_problem()
    delta, zero = broadcast_grid(scale, torch.zeros(12), w, 0)
    result = adaround_layer(lambda inp, weight: inp @ weight.T, x, y, w, (delta, zero, -8, 7),
                            AdaRoundParameters(num_iterations=3000, batch_size=64), channel_dim=-1)
    assert result.settled == 1.0  # every h(V) exactly 0 or 1
    assert is_on_grid(result.weight, delta, zero, -8, 7)
    # torch's own per-channel fake-quantize on the same grid leaves the result unchanged
    oracle = torch.fake_quantize_per_channel_affine(result.weight, scale, torch.zeros(12, dtype=torch.int32), 0, -8, 7)
    torch.testing.assert_close(oracle, result.weight, rtol=0, atol=1e-6)
    # each weight is rounded down or up from its float value, never further
    u = w / delta
    k = result.weight / delta
    assert bool(((k - torch.floor(u)).round().abs() <= 1).all() and ((k >= torch.floor(u) - 1e-4).all()))
    assert result.error_adaround < 0.7 * result.error_nearest
    nearest = nearest_weight(w, delta, zero, -8, 7)
    assert result.flipped == pytest.approx(float((result.weight != nearest).float().mean()))


def test_layer_keeps_nearest_rounding_when_the_learned_one_reconstructs_worse():
    w, x, y, scale = _linear_problem()
    delta, zero = broadcast_grid(scale, torch.zeros(12), w, 0)
    # five wild Adam steps scatter the rounding: it must lose to nearest, which is then kept
    result = adaround_layer(lambda inp, weight: inp @ weight.T, x, y, w, (delta, zero, -8, 7),
                            AdaRoundParameters(num_iterations=5, learning_rate=50.0, warm_start=0.0), channel_dim=-1)
    assert result.kept_nearest and result.flipped == 0.0
    torch.testing.assert_close(result.weight, nearest_weight(w, delta, zero, -8, 7), rtol=0, atol=0)
    assert result.error_adaround == result.error_nearest


def test_parameters_refuse_bad_values_by_name():
    with pytest.raises(ConfigError, match="adaround.num_iterations"):
        AdaRoundParameters(num_iterations=0)
    with pytest.raises(ConfigError, match="adaround.beta_range"):
        AdaRoundParameters(beta_range=(2, 20))
    with pytest.raises(ConfigError, match="adaround.warm_up"):
        AdaRoundParameters.of({"warm_up": 0.2})


# ------------------------------------------------------------------ over a model


class TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(16, 32), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.relu(self.first(x)))


def _quantized_state(model: nn.Module, data: list[torch.Tensor], bits: int = 4, before: pc.Compression | None = None):
    """Graph, method (``before`` chained ahead of the quantization), params and state on ``data``."""
    graph = pc.trace(model, (data[0],))
    method = pc.quantization(weights=dict(mode="symmetric", bits=bits, per_channel=True),
                             activations=dict(mode="asymmetric", bits=8))
    if before is not None:
        method = pc.chain(before, method)
    params = dict(model.named_parameters())
    state = method.init(graph, params, [(x,) for x in data], calibration_mode="eval")
    return graph, method, params, state


def _adarounded(model: nn.Module, data: list[torch.Tensor], iterations: int, before: pc.Compression | None = None):
    """``_quantized_state``'s four, then ``adaround_weights``' rounded params and report."""
    graph, method, params, state = _quantized_state(model, data, before=before)
    rounded, report = adaround_weights(model, graph, method, params, state, [(x,) for x in data],
                                       dict(num_iterations=iterations), num_samples=8 * len(data), progress_bar=False)
    return graph, method, params, state, rounded, report


def test_sequential_mode_records_the_quantized_models_input():
    torch.manual_seed(0)
    model = TwoLayers().eval()
    data = [torch.randn(8, 16) for _ in range(3)]
    _, method, params, state, rounded, report = _adarounded(model, data, 50)
    assert [layer.weight for layer in report.layers] == ["first.weight", "second.weight"]
    # the second layer's input as AdaRound records it: the quantized model with the first layer rounded
    current = method.params(rounded | {"second.weight": params["second.weight"].detach()}, state)
    sites = method.sites(state)
    recorded, _ = _record(model, current, sites, [((x,), {}) for x in data], "second/linear#0", current["second.weight"],
                          current["second.bias"], (), False)
    by_hand = []
    with torch.no_grad():
        for x in data:
            h = x
            for fn in input_quantizers("first/linear#0", sites, state):
                h = fn(h)
            h = torch.relu(nn.functional.linear(h, current["first.weight"], current["first.bias"]))
            for fn in input_quantizers("second/linear#0", sites, state):
                h = fn(h)
            by_hand.append(h)
    torch.testing.assert_close(recorded, torch.cat(by_hand))
    assert not torch.equal(recorded, torch.cat([torch.relu(model.first(x)) for x in data]).detach())
    # the first layer's weight was rounded, the model's own parameters were not touched
    assert not torch.equal(rounded["first.weight"], params["first.weight"])
    quantizers = weight_quantizers(state)
    for name in ("first.weight", "second.weight"):
        torch.testing.assert_close(quantizers[name](rounded[name]), rounded[name], rtol=0, atol=1e-6)


def test_shared_weights_are_skipped_by_name():
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4)
            self.b.weight = self.a.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c(torch.relu(self.b(torch.relu(self.a(x)))))

    torch.manual_seed(0)
    model = Shared().eval()
    data = [torch.randn(8, 16) for _ in range(2)]
    _, _, params, _, rounded, report = _adarounded(model, data, 5)
    assert [r.weight for r in report.layers] == ["c.weight"]
    assert report.skipped == (("a.weight", "read by 2 calls"),)
    assert torch.equal(rounded["a.weight"], params["a.weight"])


def test_weights_transformed_before_their_quantizer_are_refused():
    from purecomp.transforms.smooth_quant import smooth_quant

    torch.manual_seed(0)
    model = TwoLayers().eval()
    data = [torch.randn(8, 16) * torch.linspace(0.1, 10, 16) for _ in range(2)]
    with pytest.raises(ConfigError, match="transformed before their quantizer"):
        _adarounded(model, data, 5, before=smooth_quant(0.5))
    # pc.quantize with SmoothQuant (model_type="transformer") refuses it under its option's name
    with pytest.raises(ConfigError, match="advanced_parameters.adaround.*transformed before their quantizer"):
        pc.quantize(model, pc.Dataset(data), model_type="transformer",
                    advanced_parameters={"adaround": {"num_iterations": 5}})


def test_bias_correction_measures_given_rounded_weights_against_the_float_ones():
    """``bias_correction(..., quantized_weights=...)``: the quantized side uses those weights (AdaRound's),
    the float model stays the reference, so the rounding's output mean is corrected channel by channel
    (measuring the rounded weights against themselves would correct nothing)."""
    from purecomp.transforms.ptq import bias_correction

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64)).eval()
    data = [torch.randn(32, 32) + 1 for _ in range(4)]
    graph, method, params, state = _quantized_state(model, data, bits=3)
    rounded, _ = adaround_weights(model, graph, method, params, state, [(x,) for x in data], dict(num_iterations=100),
                                  num_samples=128, progress_bar=False)
    batches = [(x,) for x in data]

    def mean_error(p: dict) -> float:  # of the quantized model (weights and input quantizer) against the float one
        from purecomp.apply import call_with_sites

        q, sites = method.params(p, state), method.sites(state)
        with torch.no_grad():
            return float(torch.stack([(call_with_sites(model, q, sites, (x,), {}) - model(x)).mean(0)
                                      for x in data]).mean(0).abs().max())

    float_params = {k: v.detach() for k, v in params.items()}
    corrected = bias_correction(model, graph, method, float_params, state, batches, 128, progress_bar=False,
                                quantized_weights={"0.weight": rounded["0.weight"]})
    against_themselves = bias_correction(model, graph, method, rounded, state, batches, 128, progress_bar=False)
    with_rounded = {"0.weight": rounded["0.weight"]}
    assert mean_error(float_params | with_rounded | {"0.bias": corrected["0.bias"]}) < 1e-4
    assert mean_error(rounded | {"0.bias": against_themselves["0.bias"]}) > 1e-2


def test_quantize_leaves_adarounded_layers_out_of_bias_correction():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    data = [torch.randn(32, 32) + 1 for _ in range(4)]
    advanced = {"weights_quantization_params": {"num_bits": 4}, "adaround": {"num_iterations": 20},
                "int32_bias": False}  # bias correction alone moves biases
    q = pc.quantize(model, pc.Dataset(data), subset_size=128, advanced_parameters=advanced)
    nearest = pc.quantize(model, pc.Dataset(data), subset_size=128, advanced_parameters=advanced | {"adaround": None})
    for name in ("0.bias", "2.bias"):
        assert torch.equal(q.model_params()[name], model.state_dict()[name])  # AdaRound's layers: not corrected
        assert not torch.equal(nearest.model_params()[name], model.state_dict()[name])  # nearest's: corrected


@pytest.fixture(scope="module")
def resnet_and_data():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    g = torch.Generator().manual_seed(3)
    data = [torch.randn(4, 3, 16, 16, generator=g) for _ in range(2)]
    model.train()
    with torch.no_grad():
        for x in data:
            model(x)
    return model.eval(), data


@pytest.fixture(scope="module")
def adarounded(resnet_and_data):
    """resnet18 through ``pc.quantize`` at W4A8 with AdaRound (10 steps per layer) and without."""
    model, data = resnet_and_data
    original = copy.deepcopy(model.state_dict())
    advanced = {"weights_quantization_params": {"num_bits": 4}, "adaround": {"num_iterations": 10},
                "disable_bias_correction": True}
    q = pc.quantize(model, pc.Dataset(data), subset_size=8, advanced_parameters=advanced)
    nearest = pc.quantize(model, pc.Dataset(data), subset_size=8, advanced_parameters=advanced | {"adaround": None})
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in original.items())  # the model is untouched
    return q, nearest


def test_quantize_with_adaround_rounds_every_conv_and_linear_of_resnet18_onto_its_grid(resnet_and_data, adarounded,
                                                                                         tmp_path):
    model, data = resnet_and_data
    q, nearest = adarounded
    report = q.adaround_report
    assert len(report.layers) == 21 and not report.skipped  # 20 convs and the fc
    # one layer's inputs and outputs at a time: the peak is the largest single layer's, not a sum over layers
    sizes: list[int] = []
    hooks = [m.register_forward_hook(lambda m, i, o: sizes.append(4 * (i[0].numel() + o.numel())))
             for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(torch.cat(data))
    for hook in hooks:
        hook.remove()
    assert report.peak_buffer_bytes == max(sizes) < sum(sizes) / 5
    quantizers = weight_quantizers(q.state)
    params = q.model_params()
    for layer in report.layers:
        w = params[layer.weight]
        torch.testing.assert_close(quantizers[layer.weight](w), w, rtol=0, atol=1e-6)  # on the 4-bit grid
        assert quantizers[layer.weight].bits == 4
    assert sum(not torch.equal(params[r.weight], nearest.model_params()[r.weight]) for r in report.layers) >= 15
    x = data[0][:2]
    with torch.no_grad():
        torch.testing.assert_close(pc.strip(q)(x), q(x), rtol=0, atol=1e-5)
    path = pc.export_quantized(q, (x,), tmp_path / "resnet18_adaround.onnx")
    assert pc.export.check(path, q.model, q.method, q.model_params(), q.state, (x,)).max_steps <= 1.0


def test_accuracy_control_returns_an_adarounded_layer_to_its_float_weight(adarounded):
    from purecomp.transforms.ptq.accuracy_control import float_biases

    q, nearest = adarounded
    rounded = q.model_params()["layer1.0.conv1.weight"].detach().clone()
    float_weight = nearest.model_params()["layer1.0.conv1.weight"]  # folded, never rounded
    assert not torch.equal(rounded, float_weight)
    with float_biases(q, ["layer1.0.conv1"]):
        assert torch.equal(q.model_params()["layer1.0.conv1.weight"], float_weight)
    assert torch.equal(q.model_params()["layer1.0.conv1.weight"], rounded)


def test_quantize_refuses_bad_quantization_params_by_name(resnet_and_data):
    model, data = resnet_and_data
    with pytest.raises(ConfigError, match="weights_quantization_params.num_bits"):
        pc.quantize(model, pc.Dataset(data), advanced_parameters={"weights_quantization_params": {"num_bits": 1}})
    with pytest.raises(ConfigError, match="signedness_to_force"):
        pc.quantize(model, pc.Dataset(data),
                    advanced_parameters={"activations_quantization_params": {"signedness_to_force": True}})
    with pytest.raises(ConfigError, match="advanced_parameters.adaround.reg_param"):
        pc.quantize(model, pc.Dataset(data), advanced_parameters={"adaround": {"reg_param": -1}})
    with pytest.raises(ConfigError, match="adaround.learning_rate"):
        AdaRoundParameters(learning_rate=True)
