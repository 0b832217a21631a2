"""Range initializers against numpy, signedness from calibration, BatchNorm adaptation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import purecomp as pc
from purecomp.transforms.quantize import RangeInit
from purecomp.transforms.quantize.range_init import TensorStatistics


def batches():
    g = torch.Generator().manual_seed(3)
    return [torch.randn(4, 50, generator=g) * (i + 1) + i for i in range(5)]


def numpy_range(kind, data, lo_p=0.1, hi_p=99.9):
    arrays = [b.numpy().ravel().astype(np.float64) for b in data]
    allv = np.concatenate(arrays)
    if kind == "min_max":
        return allv.min(), allv.max()
    if kind == "mean_min_max":
        return np.mean([a.min() for a in arrays]), np.mean([a.max() for a in arrays])
    if kind == "threesigma":
        return allv.mean() - 3 * allv.std(), allv.mean() + 3 * allv.std()
    if kind == "percentile":
        return np.percentile(allv, lo_p), np.percentile(allv, hi_p)
    if kind == "mean_percentile":
        return np.mean([np.percentile(a, lo_p) for a in arrays]), np.mean([np.percentile(a, hi_p) for a in arrays])
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["min_max", "mean_min_max", "threesigma", "percentile", "mean_percentile"])
def test_initializer_types_match_numpy(kind):
    stats = TensorStatistics()
    data = batches()
    for b in data:
        stats.observe(b)
    init = RangeInit(type=kind, min_percentile=1.0, max_percentile=95.0)
    low, high = stats.range(init)
    exp_low, exp_high = numpy_range(kind, data, 1.0, 95.0)
    assert float(low) == pytest.approx(exp_low, rel=1e-5, abs=1e-5)
    assert float(high) == pytest.approx(exp_high, rel=1e-5, abs=1e-5)


class TwoBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_activation_quantizers_take_their_range_and_signedness_from_calibration():
    torch.manual_seed(0)
    model = TwoBranch()
    data = [torch.randn(8, 4) for _ in range(3)]
    graph = pc.trace(model, (data[0],))
    method = pc.quantization(range_init=RangeInit(type="min_max", num_init_samples=24))
    state = method.init(graph, dict(model.named_parameters()), data)
    q_in = state.activations["input:0"]
    relu_key = "relu#0:out0"
    q_relu = state.activations[relu_key]
    assert q_in.signed and not q_relu.signed
    assert float(q_in.scale) == pytest.approx(float(torch.cat(data).abs().max()))
    with torch.no_grad():
        relu_max = max(float(torch.relu(model.a(x)).max()) for x in data)
    assert float(q_relu.scale) == pytest.approx(relu_max)
    forced = pc.quantization(activations=dict(signed=True)).init(graph, dict(model.named_parameters()), data)
    assert forced.activations[relu_key].signed


def test_num_init_samples_limits_the_batches_seen():
    torch.manual_seed(0)
    model = TwoBranch()
    seen = []

    def data():
        for i in range(10):
            seen.append(i)
            yield torch.randn(8, 4)

    graph = pc.trace(model, (torch.randn(8, 4),))
    pc.quantization(range_init=RangeInit(num_init_samples=16)).init(graph, dict(model.named_parameters()), data())
    assert seen == [0, 1]


def test_batchnorm_adaptation_is_pure_and_reestimates_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU()).eval()
    data = [torch.randn(4, 1, 6, 6) * 2 + 1 for _ in range(3)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    method = pc.identity()
    out = pc.adapt_batchnorm(model, method, params, (), data, num_samples=12)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training and model[1].momentum == 0.1
    with torch.no_grad():
        conv = [model[0](x) for x in data]
    expected_mean = torch.stack([c.mean(dim=(0, 2, 3)) for c in conv]).mean(0)
    expected_var = torch.stack([c.var(dim=(0, 2, 3), unbiased=True) for c in conv]).mean(0)
    torch.testing.assert_close(out["1.running_mean"], expected_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["1.running_var"], expected_var, rtol=1e-5, atol=1e-6)
    assert int(out["1.num_batches_tracked"]) == 3
