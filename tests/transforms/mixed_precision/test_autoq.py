"""AutoQ: the agent learns a synthetic optimum, post-processing meets the ratio, runs reproduce
from the seed, a failing eval_fn keeps what was found, the model environment matches
``quantization(precision=plan)``, config, report."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import purecomp as pc
from purecomp.errors import ConfigError, SearchError
from purecomp.scopes import select_sites
from purecomp.transforms.mixed_precision import load_plan
from purecomp.transforms.mixed_precision.autoq import (
    FEATURES,
    AutoQOptions,
    AutoQReport,
    ModelEnvironment,
    autoq_precision,
    meet_ratio,
    noise_scale,
    normalize,
    reachable,
    run_search,
    size_ratio,
    truncated_normal,
)
from purecomp.transforms.quantize.placement import activation_targets, weight_targets
from purecomp.transforms.quantize.precision import PrecisionRequest

from checks import assert_config_error


class Synthetic:
    """Six equal units; the two depthwise ones score best at 2 bits, the others at 8:
    ``score = sum_{i in D} (8 - b_i) / 6 + sum_{i not in D} (b_i - 2) / 6``; optimum [8,2,8,8,2,8]
    (size ratio 0.1875)."""

    optimum = (8, 2, 8, 8, 2, 8)

    def __init__(self, fail_at: int | None = None, value: float | None = None) -> None:
        self.depthwise = {1, 4}
        self.sizes = (100,) * 6
        self.bits = (2, 4, 8)
        self.names = tuple((f"w{i}",) for i in range(6))
        self.features = normalize([
            {"op_kind": 0, "in_channels": 16 * (i + 1), "out_channels": 16 * (i + 2), "feature_map": 64 // (i + 1),
             "kernel": 9, "stride": 1, "depthwise": float(i in self.depthwise), "params": 100}
            for i in range(6)
        ])
        self.calls = 0
        self.fail_at, self.value = fail_at, value

    def evaluate(self, policy):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at + 2:  # call 1 is the INT8 baseline
            if self.value is not None:
                return self.value
            raise RuntimeError("validation crashed")
        return sum((8 - b) / 6 if i in self.depthwise else (b - 2) / 6 for i, b in enumerate(policy))

    def plan(self, policy):
        return {f"w{i}": b for i, b in enumerate(policy)}


def options(**kw) -> AutoQOptions:
    return AutoQOptions(**{"iter_number": 60, "warmup_iter_number": 10, "compression_ratio": 0.19, **kw})


# ------------------------------------------------------------------ the agent


@pytest.mark.parametrize("seed", [0, 1])
def test_agent_learns_the_synthetic_optimum(seed):
    env = Synthetic()
    report = run_search(env, options(seed=seed), progress_bar=False)
    last = report.log[-1]
    assert last.sigma == 0.0  # the last episode runs the deterministic actor
    assert tuple(last.policy.values()) == Synthetic.optimum
    assert tuple(report.weight_bits.values()) == Synthetic.optimum
    assert report.ratio == pytest.approx(0.1875) and report.ratio <= 0.19
    # the warm-up (uniform actions) alone did not find it: learning did
    warm = [e for e in report.log if e.sigma is None]
    assert len(warm) == 10 and all(tuple(e.policy.values()) != Synthetic.optimum for e in warm)


def test_run_is_reproducible_from_its_seed():
    a = run_search(Synthetic(), options(iter_number=12, seed=5), progress_bar=False)
    b = run_search(Synthetic(), options(iter_number=12, seed=5), progress_bar=False)
    c = run_search(Synthetic(), options(iter_number=12, seed=6), progress_bar=False)
    assert a.log == b.log and a.plan == b.plan
    assert [e.policy for e in a.log] != [e.policy for e in c.log]


def test_failing_eval_fn_raises_with_episode_policy_and_what_was_found():
    env = Synthetic(fail_at=7)
    with pytest.raises(SearchError) as info:
        run_search(env, options(iter_number=12, seed=2), progress_bar=False)
    err = info.value
    assert err.episode == 7 and "episode 7" in str(err) and "validation crashed" in str(err)
    assert isinstance(err.__cause__, RuntimeError)
    report = err.report
    assert [e.episode for e in report.log] == list(range(7))
    # the failing policy is the one the same seed runs at episode 7
    full = run_search(Synthetic(), options(iter_number=12, seed=2), progress_bar=False)
    assert err.policy == full.log[7].policy
    assert report.log == full.log[:7]
    best = max(report.log, key=lambda e: e.score)
    assert report.score == best.score and report.plan == best.policy
    assert report.baseline == full.baseline


@pytest.mark.parametrize("fail_at, value", [(-1, None), (3, float("nan"))])
def test_failing_baseline_and_non_finite_scores_raise(fail_at, value):
    with pytest.raises(SearchError) as info:
        run_search(Synthetic(fail_at=fail_at, value=value), options(iter_number=5, warmup_iter_number=2),
                   progress_bar=False)
    assert info.value.episode == fail_at
    if fail_at == -1:
        assert set(info.value.policy.values()) == {8} and info.value.report.plan == {}


def test_noise_decays_linearly_to_zero_after_uniform_warmup():
    sig = [noise_scale(e, 12, 2, 0.5) for e in range(12)]
    assert all(math.isnan(s) for s in sig[:2])
    assert sig[2] == 0.5 and sig[-1] == 0.0
    steps = [a - b for a, b in zip(sig[2:], sig[3:])]
    assert steps == pytest.approx([0.5 / 9] * 9)
    g = torch.Generator().manual_seed(0)
    samples = [truncated_normal(0.9, 0.3, g) for _ in range(2000)]
    assert 0 <= min(samples) and max(samples) <= 1
    assert truncated_normal(1.3, 0.0, g) == 1.0


# ------------------------------------------------------------------ post-processing


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 10_000), min_size=1, max_size=8),
    bits=st.lists(st.sampled_from([2, 3, 4, 5, 6, 8]), min_size=1, max_size=4, unique=True),
    data=st.data(),
)
def test_post_processing_always_meets_the_ratio(sizes, bits, data):
    policy = data.draw(st.lists(st.sampled_from(bits), min_size=len(sizes), max_size=len(sizes)))
    low, high = reachable(sizes, bits)
    target = data.draw(st.floats(low, high + 0.05))
    out = meet_ratio(policy, sizes, bits, target)
    assert size_ratio(out, sizes) <= target + 1e-9
    assert all(o <= p and o in bits for o, p in zip(out, policy))
    if size_ratio(policy, sizes) <= target:
        assert list(out) == list(policy)
    if low > 0.0001:
        with pytest.raises(ConfigError, match="cannot be reached"):
            meet_ratio(policy, sizes, bits, low * 0.99, origin="x.")


def test_post_processing_lowers_from_the_last_unit_backwards():
    assert meet_ratio([8, 8, 8], [1, 1, 1], [2, 4, 8], 0.2) == (8, 4, 4)  # 0.208 after the last, then the middle
    assert meet_ratio([8, 8, 8], [1, 1, 1], [2, 4, 8], 0.1) == (4, 2, 2)  # second walk: 0.104, then 0.083
    assert meet_ratio([8, 2, 8], [1, 100, 1], [2, 4, 8], 0.065) == (8, 2, 4)  # 0.0662 -> 0.0650


# ------------------------------------------------------------------ the model environment


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 12, 1, stride=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 3),
    ).eval()


def cnn_data(n: int = 32, batch: int = 8):
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


def agreement(model):
    """eval_fn: minus the mean squared distance of the quantized logits from the FP32 ones."""

    def eval_fn(model_apply, loader):
        with torch.no_grad():
            return -sum(float((model_apply(x) - model(x)).pow(2).mean()) for x, _ in loader)

    return eval_fn


WEIGHTS = {"per_channel": True}
ACTS = {"mode": "asymmetric"}


def test_model_search_returns_a_plan_quantization_takes():
    model = small_cnn()
    graph = pc.trace(model, (torch.zeros(2, 1, 8, 8),))
    params = dict(model.named_parameters())
    data = cnn_data()
    report = autoq_precision(graph, params, data, agreement(model), weights=WEIGHTS, activations=ACTS,
                             range_init=pc.RangeInit(num_init_samples=16), bits=[2, 4, 8], compression_ratio=0.15,
                             iter_number=12, warmup_iter_number=4, eval_subset_ratio=0.5, progress_bar=False)
    method = pc.quantization(weights=WEIGHTS, activations=ACTS, precision=report.plan,
                             range_init=pc.RangeInit(num_init_samples=16))
    state = method.init(graph, params, data)
    assert {k: q.bits for k, q in {**state.weights, **state.activations}.items()} == report.plan
    sizes = {n: params[n].numel() for n in state.weights}
    ratio = sum(sizes[n] * report.plan[n] for n in sizes) / (32 * sum(sizes.values()))
    assert ratio == pytest.approx(report.ratio) and ratio <= 0.15
    assert len(report.log) == 12 and report.score == max(e.score for e in report.log)
    assert report.score > -math.inf and report.baseline > report.score - 1e9


def test_environment_evaluates_exactly_what_quantization_builds():
    model = small_cnn()
    graph = pc.trace(model, (torch.zeros(2, 1, 8, 8),))
    params = dict(model.named_parameters())
    data = cnn_data()
    method = pc.quantization(weights=WEIGHTS, activations=ACTS, range_init=pc.RangeInit(num_init_samples=16))
    allowed = select_sites(graph, (), None, "")
    w_t = weight_targets(graph, allowed)
    a_t = activation_targets(graph, allowed, quantize_inputs=True, quantize_outputs=False)
    from purecomp.init_context import InitContext
    from purecomp.transforms.quantize.method import QuantizerSettings, activation_quantizers

    request = PrecisionRequest(
        graph, params, data, tuple(w_t), tuple(a_t), QuantizerSettings.of(WEIGHTS, "weights").for_weights("eval"),
        activation_quantizers=lambda p: activation_quantizers(InitContext.start(graph, params, data), a_t,
                                                              QuantizerSettings.of(ACTS, "a"), p,
                                                              pc.RangeInit(num_init_samples=16)))
    env = ModelEnvironment(request, agreement(model), data, AutoQOptions(bits=[2, 4, 8]))
    assert [u[0] for u in env.names] == [t.param for t in w_t]  # graph order
    assert env.features.shape == (4, len(FEATURES)) and 0 <= env.features.min() and env.features.max() <= 1
    assert env.features[:, FEATURES.index("depthwise")].tolist() == [0, 1, 0, 0]
    policy = (4, 2, 8, 2)
    plan = env.plan(policy)
    exact = pc.quantization(weights=WEIGHTS, activations=ACTS, precision=plan,
                            range_init=pc.RangeInit(num_init_samples=16))
    state = exact.init(graph, params, data)
    x = data[0][0]
    expected = pc.apply(model, exact, params, state, x)
    assert torch.equal(env.model_apply(plan)(x), expected)
    assert not torch.equal(expected, pc.apply(model, method, params, method.init(graph, params, data), x))


# ------------------------------------------------------------------ config and report


def autoq_config(**precision):
    return {
        "input_info": {"sample_size": [2, 1, 8, 8]},
        "compression": {"algorithm": "quantization", "weights": WEIGHTS, "activations": ACTS,
                        "initializer": {"range": {"num_init_samples": 16},
                                        "precision": {"type": "autoq", **precision}}},
    }


def test_config_autoq_builds_the_same_plan_as_code():
    model = small_cnn()
    data = cnn_data()
    cfg = autoq_config(bits=[2, 4, 8], compression_ratio=0.15, iter_number=8, warmup_iter_number=3,
                       eval_subset_ratio=0.5, seed=4)
    config = pc.load_config(cfg)
    graph = config.trace(model)
    params = dict(model.named_parameters())
    state = config.method(eval_fn=agreement(model), eval_data=data).init(graph, params, data)
    report = autoq_precision(graph, params, data, agreement(model), data, weights=WEIGHTS, activations=ACTS,
                             range_init=pc.RangeInit(num_init_samples=16), bits=[2, 4, 8], compression_ratio=0.15,
                             iter_number=8, warmup_iter_number=3, eval_subset_ratio=0.5, seed=4, progress_bar=False)
    assert {k: q.bits for k, q in {**state.weights, **state.activations}.items()} == report.plan


def test_front_door_takes_the_autoq_metric_like_nncf():
    """``register_default_init_args(..., autoq_eval_fn=, val_loader=)`` gives the same plan as code."""
    data = cnn_data()
    cfg = autoq_config(bits=[2, 4, 8], compression_ratio=0.15, iter_number=4, warmup_iter_number=2, seed=4)
    model = small_cnn()
    config = pc.load_config(cfg)
    code = config.method(eval_fn=agreement(model), eval_data=data).init(
        config.trace(model), dict(model.named_parameters()), data)
    fresh = small_cnn()  # the same weights, untouched by the first search
    front = pc.register_default_init_args(pc.Config.from_dict(cfg), data, autoq_eval_fn=agreement(fresh),
                                          val_loader=data)
    ctrl, _ = pc.create_compressed_model(fresh, front)
    bits = lambda state: {k: q.bits for k, q in {**state.weights, **state.activations}.items()}  # noqa: E731
    assert bits(ctrl.state) == bits(code)
    with pytest.raises(ConfigError, match="needs a metric"):
        pc.create_compressed_model(small_cnn(), pc.register_default_init_args(pc.Config.from_dict(cfg), data))


@pytest.mark.parametrize(
    "cfg, call, path, message",
    [
        (autoq_config(), {}, "compression.initializer.precision", "needs a metric"),
        (autoq_config(not_a_key=0.1), None, "compression.initializer.precision.not_a_key", ""),
        (autoq_config(eval_subset_ratio=0), None, "compression.initializer.precision.eval_subset_ratio", ""),
        (autoq_config(iter_number=5, warmup_iter_number=5), {"eval_fn": lambda f, d: 0.0},
         "compression.initializer.precision.warmup_iter_number", "warmup_iter_number < iter_number"),
    ],
)
def test_config_errors_name_the_key(cfg, call, path, message):
    assert_config_error(cfg, call, path, message)


def test_unreachable_ratio_names_the_key():
    model = small_cnn()
    data = cnn_data()
    config = pc.load_config(autoq_config(bits=[4, 8], compression_ratio=0.1, iter_number=2, warmup_iter_number=1))
    with pytest.raises(ConfigError) as info:
        config.method(eval_fn=agreement(model)).init(config.trace(model), dict(model.named_parameters()), data)
    assert info.value.path == "compression.initializer.precision.compression_ratio"
    assert "[0.125, 0.25]" in str(info.value)


def test_report_roundtrip_and_plot(tmp_path):
    report = run_search(Synthetic(), options(iter_number=15, warmup_iter_number=5), progress_bar=False)
    path = report.save(tmp_path / "autoq.json")
    assert AutoQReport.load(path) == report
    assert load_plan(path) == report.plan
    png = report.plot(tmp_path / "autoq.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
