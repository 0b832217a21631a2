"""HAWQ mixed precision: Hutchinson traces against autograd and the exact Hessian, the search
against brute force, the ratio constraint, the sensitive layer, config errors, resnet18."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import purecomp as pc
from purecomp.errors import ConfigError
from purecomp.transforms.mixed_precision import (
    PrecisionReport,
    autograd_traces,
    collect_batches,
    hawq_precision,
    hutchinson_traces,
    load_plan,
    rademacher,
    search,
)

from checks import assert_config_error


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3),
    )


def cnn_data(n: int = 16, batch: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(n, 1, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


def weight_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.dim() > 1]


@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_hutchinson_equals_autograd_double_backward_loop(mode):
    model = small_cnn().train()  # train mode on purpose: the estimate must run BN in eval mode
    model[1].running_mean.uniform_(-0.5, 0.5)
    before = {k: v.clone() for k, v in model.named_buffers()}
    params = dict(model.named_parameters())
    names = weight_names(model)
    probes_count, seed = 5, 7
    ours = hutchinson_traces(model, params, names, collect_batches(cnn_data(), 16), nn.functional.cross_entropy,
                             iter_number=probes_count, chunk=probes_count, tolerance=0.0, seed=seed, mode=mode)
    probes = rademacher({n: params[n].shape for n in names}, probes_count, torch.Generator().manual_seed(seed))
    # the loop sees the data as two batches of 8, ours as one batch of 16: same Hessian
    loop = autograd_traces(model, params, names, collect_batches(cnn_data(), 16, 8), nn.functional.cross_entropy,
                           probes)
    assert ours.probes == probes_count
    for n in names:
        assert ours.traces[n] == pytest.approx(loop[n], rel=1e-4, abs=1e-6)
    assert model.training
    for k, v in model.named_buffers():
        assert torch.equal(v, before[k]), k


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here; runs on GPU machines)")
@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_hutchinson_on_cuda_equals_the_loop_there(mode):
    torch.backends.cudnn.allow_tf32 = False  # float32 convolutions, as on the CPU
    cuda = torch.device("cuda")
    model = small_cnn().to(cuda)
    params, names = dict(model.named_parameters()), weight_names(model)
    data = [(x.to(cuda), y.to(cuda)) for x, y in cnn_data()]
    ours = hutchinson_traces(model, params, names, collect_batches(data, 16), nn.functional.cross_entropy,
                             iter_number=4, chunk=4, tolerance=0.0, seed=3, mode=mode)
    probes = rademacher({n: params[n].shape for n in names}, 4, torch.Generator(device=cuda).manual_seed(3))
    assert all(p.is_cuda for p in probes.values())
    loop = autograd_traces(model, params, names, collect_batches(data, 16, 8), nn.functional.cross_entropy, probes)
    for n in names:
        assert ours.traces[n] == pytest.approx(loop[n], rel=1e-4, abs=1e-6)


def test_hutchinson_is_deterministic_and_seeded():
    model, data = small_cnn(), collect_batches(cnn_data(), 16)
    params, names = dict(model.named_parameters()), weight_names(model)
    run = lambda seed: hutchinson_traces(model, params, names, data, nn.functional.cross_entropy,  # noqa: E731
                                         iter_number=4, chunk=2, tolerance=0.0, seed=seed).traces
    assert run(1) == run(1)
    assert run(1) != run(2)


def test_hutchinson_within_estimator_error_of_exact_trace():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).eval()
    x, y = torch.randn(12, 4), torch.randint(0, 3, (12,))
    params = {k: v.detach() for k, v in model.named_parameters()}
    names = ["0.weight", "2.weight"]
    shapes = {n: params[n].shape for n in names}
    sizes = [params[n].numel() for n in names]

    def loss(flat):
        ws = dict(zip(names, [c.view(shapes[n]) for c, n in zip(flat.split(sizes), names)]))
        out = torch.func.functional_call(model, {**params, **ws}, (x,))
        return nn.functional.cross_entropy(out, y)

    hess = torch.func.hessian(loss)(torch.cat([params[n].flatten() for n in names]))
    k = 4000
    est = hutchinson_traces(model, params, names, collect_batches([(x, y)], 12), nn.functional.cross_entropy,
                            iter_number=k, chunk=1000, tolerance=0.0, seed=0)
    start = 0
    for n, size in zip(names, sizes):
        block = slice(start, start + size)
        exact = float(hess[block, block].diagonal().sum())
        # variance of one probe: 2 sum_{a != b in block} H_ab^2 + sum_{a in block, b outside} H_ab^2
        inner = hess[block, block]
        rows = hess[block]
        var = 2 * float(inner.pow(2).sum() - inner.diagonal().pow(2).sum()) + float(rows.pow(2).sum() - inner.pow(2).sum())
        assert abs(est.traces[n] - exact) <= 4 * (var / k) ** 0.5 + 1e-6, (n, est.traces[n], exact)
        start += size


def test_tolerance_stops_early():
    model, data = small_cnn(), collect_batches(cnn_data(), 16)
    params, names = dict(model.named_parameters()), weight_names(model)
    est = hutchinson_traces(model, params, names, data, nn.functional.cross_entropy,
                            iter_number=200, chunk=2, tolerance=10.0, seed=0)
    assert est.probes == 4  # the first chunk sets the reference; the second is within 10x


# ------------------------------------------------------------------ search


@st.composite
def problems(draw):
    layers = draw(st.integers(1, 5))
    bits = sorted(draw(st.sets(st.sampled_from([2, 4, 6, 8]), min_size=1, max_size=3)))
    traces = draw(st.lists(st.floats(1e-3, 1e3), min_size=layers, max_size=layers, unique=True))
    flops = draw(st.lists(st.integers(1, 100), min_size=layers, max_size=layers))
    # sensitivities decrease with bits, as quantization noise does
    sens = [sorted((draw(st.floats(0, 10)) for _ in bits), reverse=True) for _ in range(layers)]
    target = draw(st.floats(0.5, 8 / bits[0]))
    return bits, traces, flops, [dict(zip(bits, s)) for s in sens], target


@settings(max_examples=150, deadline=None)
@given(problems())
def test_search_returns_brute_force_optimum(problem):
    bits, traces, flops, sens, target = problem
    ratio = lambda a: 8 * sum(flops) / sum(f * b for f, b in zip(flops, a))  # noqa: E731
    feasible = [
        a for a in itertools.product(bits, repeat=len(traces))
        if all(a[i] <= a[j] for i in range(len(a)) for j in range(len(a)) if traces[i] < traces[j])
        and ratio(a) >= target
    ]
    if not feasible:
        with pytest.raises(ConfigError, match="reachable range"):
            search(sens, traces, bits, ratio, target)
        return
    best = search(sens, traces, bits, ratio, target)
    optimum = min(sum(s[b] for s, b in zip(sens, a)) for a in feasible)
    assert best.bits in feasible
    assert best.ratio >= target
    assert best.sensitivity == pytest.approx(optimum, abs=1e-9)


def test_unreachable_ratio_names_the_range():
    with pytest.raises(ConfigError, match=r"compression_ratio: 3 cannot be reached .* \[1, 2\]"):
        search([{4: 1.0, 8: 0.0}], [1.0], [4, 8], lambda a: 8 / a[0], 3.0)


# ------------------------------------------------------------------ HAWQ on models


class ThreeBranches(nn.Module):
    """Three equal linear branches on separate inputs; branch ``b`` is scaled by ``scales[b]``
    before the loss, so its Hessian (and sensitivity) grows with ``scales[b]^2``."""

    def __init__(self, scales=(1.0, 10.0, 1.0)):
        super().__init__()
        torch.manual_seed(0)
        self.branches = nn.ModuleList(nn.Linear(8, 4) for _ in scales)
        self.scales = scales

    def forward(self, a, b, c):
        return torch.cat([s * m(x) for s, m, x in zip(self.scales, self.branches, (a, b, c))], dim=1)


def branch_data(n=32):
    g = torch.Generator().manual_seed(0)
    xs = tuple(torch.randn(n, 8, generator=g) for _ in range(3))
    return [(xs, torch.randn(n, 12, generator=g))]


@pytest.mark.parametrize("sensitive", [0, 1, 2])
def test_obviously_sensitive_layer_keeps_8_bits(sensitive):
    scales = [1.0, 1.0, 1.0]
    scales[sensitive] = 10.0
    model = ThreeBranches(tuple(scales)).eval()
    data = branch_data()
    graph = pc.trace(model, data[0][0])
    report = hawq_precision(graph, dict(model.named_parameters()), data, nn.functional.mse_loss,
                            bits=[4, 8], compression_ratio=1.5, iter_number=20, num_data_points=32)
    expected = {f"branches.{i}.weight": 8 if i == sensitive else 4 for i in range(3)}
    assert report.weight_bits == expected
    assert report.ratio == pytest.approx(1.5)
    # strict mode: each input activation follows the weight of the branch it feeds
    assert all(report.plan[f"input:{i}"] == expected[f"branches.{i}.weight"] for i in range(3))


def conv_flops(n, cin, cout, k, h, w):
    return 2 * n * cout * h * w * cin * k * k


def test_ratio_constraint_holds_against_hand_counted_flops(tmp_path):
    model = small_cnn().eval()
    data = cnn_data()
    graph = pc.trace(model, (data[0][0][:1],))
    params = dict(model.named_parameters())
    for target in (1.2, 1.5, 1.9):
        report = hawq_precision(graph, params, data, nn.functional.cross_entropy, bits=[4, 8],
                                compression_ratio=target, iter_number=10, num_data_points=16)
        flops = {"0.weight": conv_flops(1, 1, 4, 3, 6, 6), "3.weight": conv_flops(1, 4, 6, 3, 6, 6),
                 "8.weight": 2 * 6 * 3}
        inputs = {"0.weight": "input:0", "3.weight": "2/relu#0:out0", "8.weight": "6/adaptive_avg_pool2d#0:out0"}
        done = sum(f * max(report.weight_bits[w], report.plan[inputs[w]]) for w, f in flops.items())
        assert 8 * sum(flops.values()) / done == pytest.approx(report.ratio)
        assert report.ratio >= target
    with pytest.raises(ConfigError, match=r"compression_ratio: 2\.5 cannot be reached .* \[1, 2\]"):
        hawq_precision(graph, params, data, nn.functional.cross_entropy, bits=[4, 8], compression_ratio=2.5,
                       iter_number=2, num_data_points=16)
    # the plan runs in quantization, saves and loads
    state = pc.quantization(weights=dict(per_channel=True), precision=report.plan).init(graph, params, data)
    assert {k: q.bits for k, q in {**state.weights, **state.activations}.items()} == report.plan
    assert load_plan(report.save(tmp_path / "plan.json")) == report.plan
    assert PrecisionReport.load(tmp_path / "plan.json") == report
    png = report.plot(tmp_path / "plan.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_liberal_mode_lets_a_shared_input_take_the_narrowest_consumer():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b = nn.Linear(8, 4), nn.Linear(8, 4)

        def forward(self, x):
            return torch.cat([10 * self.a(x), self.b(x)], dim=1)

    model = Shared().eval()
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g))]
    graph = pc.trace(model, (data[0][0],))
    params = dict(model.named_parameters())
    kw = dict(bits=[4, 8], compression_ratio=1.3, iter_number=10, num_data_points=16)
    liberal = hawq_precision(graph, params, data, nn.functional.mse_loss, bitwidth_assignment_mode="liberal", **kw)
    assert liberal.weight_bits == {"a.weight": 8, "b.weight": 4} and liberal.plan["input:0"] == 4
    # strict: both weights read the same quantized input, so they share one width; 1.3 needs 4 bits
    strict = hawq_precision(graph, params, data, nn.functional.mse_loss, **kw)
    assert strict.weight_bits == {"a.weight": 4, "b.weight": 4} and strict.plan["input:0"] == 4
    # the concatenation's inputs (10 * a(x), b(x)) feed no weight: they keep the widest width
    assert strict.plan["mul#0:out0"] == 8 and strict.plan["b/linear#0:out0"] == 8


# ------------------------------------------------------------------ config


def hawq_config(**precision):
    return {
        "input_info": {"sample_size": [2, 1, 6, 6]},
        "compression": {"algorithm": "quantization", "weights": {"per_channel": True},
                        "initializer": {"range": {"num_init_samples": 8},
                                        "precision": {"type": "hawq", **precision}}},
    }


def test_config_hawq_builds_the_same_plan_as_code():
    cfg = hawq_config(bits=[4, 8], compression_ratio=1.5, iter_number=6, num_data_points=16, seed=3)
    model = small_cnn().eval()
    config = pc.load_config(cfg)
    graph = config.trace(model)
    params = dict(model.named_parameters())
    data = cnn_data()
    state = config.method(criterion=nn.functional.cross_entropy, init_data=data).init(graph, params, data)
    report = hawq_precision(graph, params, data, nn.functional.cross_entropy, weights={"per_channel": True},
                            bits=[4, 8], compression_ratio=1.5, iter_number=6, num_data_points=16, seed=3)
    assert {k: q.bits for k, q in {**state.weights, **state.activations}.items()} == report.plan
    assert 4 in report.plan.values()


@pytest.mark.parametrize(
    "cfg, call, path, message",
    [
        (hawq_config(), {}, "compression.initializer.precision", "needs a loss"),
        (hawq_config(not_a_key=1), None, "compression.initializer.precision.not_a_key", ""),
        (hawq_config(bits=[1, 8]), None, "compression.initializer.precision.bits[0]", "expected a value in [2, 8]"),
        (hawq_config(bitwidth_assignment_mode="loose"), None,
         "compression.initializer.precision.bitwidth_assignment_mode", "expected one of"),
        ({**hawq_config(), "target_device": "TRIAL"}, None, "target_device", "no mixed-precision hardware setting"),
        ({**hawq_config(bitwidth_assignment_mode="liberal"), "target_device": "CPU"}, None,
         "compression.initializer.precision.bitwidth_assignment_mode", "supports only ['strict']"),
        (hawq_config(type="manual"), None, "compression.initializer.precision.bitwidth_per_scope", "missing"),
    ],
)
def test_config_errors_name_the_key(cfg, call, path, message):
    assert_config_error(cfg, call, path, message)


def test_config_errors_at_init():
    model, data = small_cnn().eval(), cnn_data()
    params = dict(model.named_parameters())
    cpu = pc.load_config({**hawq_config(iter_number=2, num_data_points=8), "target_device": "CPU"})
    with pytest.raises(ConfigError, match=r"compression_ratio: 1\.5 cannot be reached with bits \[8\]") as info:
        cpu.method(criterion=nn.functional.cross_entropy).init(cpu.trace(model), params, data)
    assert info.value.path == "compression.initializer.precision.compression_ratio"
    config = pc.load_config(hawq_config())
    with pytest.raises(ConfigError, match="needs data") as info:
        config.method(criterion=nn.functional.cross_entropy).init(config.trace(model), params, None)
    assert info.value.path == "compression.initializer.precision"
    manual = pc.load_config(hawq_config(type="manual", bitwidth_per_scope=[[4, "0"], [6, "layer9"]]))
    with pytest.raises(ConfigError, match="'layer9' matches no quantizer") as info:
        manual.method().init(manual.trace(model), params, data)
    assert info.value.path == "compression.initializer.precision.bitwidth_per_scope[1]"


def test_config_manual_bitwidth_per_scope(tmp_path):
    cfg = hawq_config(type="manual", bitwidth_per_scope=[[4, "{re}.*weight"], [6, "3"], [5, "input:0"]])
    path = tmp_path / "manual.json"
    path.write_text(json.dumps(cfg))
    config = pc.load_config(path)
    model = small_cnn().eval()
    state = config.method().init(config.trace(model), dict(model.named_parameters()), cnn_data())
    assert {k: q.bits for k, q in state.weights.items()} == {"0.weight": 4, "3.weight": 6, "8.weight": 4}
    assert state.activations["input:0"].bits == 5
    assert state.activations["2/relu#0:out0"].bits == 8


@pytest.mark.slow
def test_resnet18_plan():
    from models import torchvision_model

    model, x = torchvision_model("resnet18")
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(4, 3, 64, 64, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(2)]
    graph = pc.trace(model, (x,))
    params = dict(model.named_parameters())
    report = hawq_precision(graph, params, data, nn.functional.cross_entropy, weights={"per_channel": True},
                            bits=[4, 8], compression_ratio=1.5, iter_number=2, num_data_points=8)
    convs = [n for n, p in model.named_parameters() if p.dim() == 4] + ["fc.weight"]
    assert set(report.weight_bits) == set(convs) and report.ratio >= 1.5
    assert set(report.weight_bits.values()) == {4, 8}
    # strict: a block's first conv and its downsample read the same input, so they share bits
    assert report.weight_bits["layer2.0.conv1.weight"] == report.weight_bits["layer2.0.downsample.0.weight"]
    state = pc.quantization(weights=dict(per_channel=True), precision=report.plan).init(graph, params, data)
    assert {k: q.bits for k, q in {**state.weights, **state.activations}.items()} == report.plan
