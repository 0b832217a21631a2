"""AWQ's scale search against a brute-force NumPy search on explicit input rows, and its
guarantee: the layer's output error is never above round-to-nearest's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from purecomp.errors import ConfigError
from purecomp.transforms.weight_compression import grid
from purecomp.transforms.weight_compression.awq import AWQParameters, awq_scale, outlier_groups
from purecomp.transforms.weight_compression.layer_inputs import LayerInputs
from purecomp.transforms.weight_compression.precision import LayerConfig

MODES = ["int4_sym", "int4_asym", "nf4"]


def activations(rng: np.random.Generator, tokens: int, n: int, outliers: int = 2, factor: float = 30.0) -> np.ndarray:
    """Token rows whose ``outliers`` channels are ``factor`` times larger (LLM-like activations)."""
    x = rng.standard_normal((tokens, n)) * rng.uniform(0.5, 1.5, size=n)
    x[:, rng.choice(n, size=outliers, replace=False)] *= factor
    return x


def stats_of(x: np.ndarray) -> LayerInputs:
    return LayerInputs(torch.from_numpy(x.T @ x / len(x)), torch.from_numpy(np.abs(x).mean(0)), len(x))


def layer_error(w: np.ndarray, approx: np.ndarray, x: np.ndarray) -> float:
    """``mean_t ||(W - W') x_t||^2`` on the explicit rows."""
    return float(((x @ (w.astype(np.float64) - approx.astype(np.float64)).T) ** 2).mean(0).sum())


def awq_approx(w: np.ndarray, s: np.ndarray, mode: str, g: int) -> np.ndarray:
    ws = torch.from_numpy(w) * torch.from_numpy(s)
    return (grid.fake_quantize(ws, mode, g) / torch.from_numpy(s)).numpy()


def reference_awq(w: np.ndarray, x: np.ndarray, mode: str, g: int, params: AWQParameters) -> tuple[np.ndarray, float]:
    """Group by group (the outlier groups, ascending), every candidate ``s_K = b_K ** alpha`` scored
    by the whole layer's error on the rows ``x``, the other groups at their current scales."""
    n = w.shape[1]
    m = np.abs(x).mean(0)
    top = np.argsort(-m, kind="stable")[:max(int(n * params.percent_to_apply), 1)]
    s = np.ones(n, np.float32)
    best = layer_error(w, awq_approx(w, s, mode, g), x)
    for k in sorted({int(j) // g for j in top}):
        mk = m[k * g:(k + 1) * g].astype(np.float32)
        low = max(float(torch.quantile(torch.from_numpy(mk), 0.1)), np.finfo(np.float32).eps * mk.max())
        base = np.clip(mk, low, max(100.0, low)).astype(np.float32)
        chosen = s.copy()
        for i in range(params.steps):
            alpha = params.alpha_min + i * ((params.alpha_max - params.alpha_min) / params.steps)
            cand = s.copy()
            cand[k * g:(k + 1) * g] = (torch.from_numpy(base) ** alpha).numpy()  # torch's float32 pow, ulp for ulp
            e = layer_error(w, awq_approx(w, cand, mode, g), x)
            if e < best:
                best, chosen = e, cand
        s = chosen
    return s, best


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), mode=st.sampled_from(MODES), group=st.sampled_from([4, 8, 16]),
       n_groups=st.integers(1, 4), out=st.integers(1, 6), percent=st.sampled_from([0.002, 0.1, 1.0]),
       grid_=st.sampled_from([(0.0, 1.0, 10), (0.2, 0.9, 7)]))
def test_awq_equals_a_brute_force_search_on_explicit_rows(seed, mode, group, n_groups, out, percent, grid_) -> None:
    rng = np.random.default_rng(seed)
    n = group * n_groups
    x = activations(rng, 48, n, outliers=1 + n // 16)
    w = (rng.standard_normal((out, n)) * 0.1).astype(np.float32)
    params = AWQParameters(percent_to_apply=percent, alpha_min=grid_[0], alpha_max=grid_[1], steps=grid_[2])
    s = awq_scale(torch.from_numpy(w), LayerConfig(mode, group), stats_of(x), params).numpy()
    expected_s, expected_error = reference_awq(w, x, mode, group, params)
    np.testing.assert_allclose(layer_error(w, awq_approx(w, s, mode, group), x), expected_error, rtol=1e-9)
    np.testing.assert_array_equal(s, expected_s)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), mode=st.sampled_from(MODES), group=st.sampled_from([2, 4, 8, -1]),
       n_groups=st.integers(1, 4), out=st.integers(1, 6), tokens=st.integers(1, 40),
       percent=st.sampled_from([0.002, 0.25, 1.0]), alpha_min=st.sampled_from([0.0, 0.3]),
       factor=st.sampled_from([1.0, 30.0]))
def test_awq_never_loses_to_round_to_nearest(seed, mode, group, n_groups, out, tokens, percent, alpha_min,
                                             factor) -> None:
    """The layer's output error with AWQ's scales (``Q(W diag s) diag(1/s)``) is never above
    round-to-nearest's, whatever the inputs, the grid (``alpha_min > 0`` leaves ``alpha = 0`` out
    of the grid: "no scaling" is still a candidate) or the share of groups searched."""
    rng = np.random.default_rng(seed)
    g = 8 if group == -1 else group
    n = g * n_groups
    x = activations(rng, tokens, n, outliers=1, factor=factor)
    w = (rng.standard_normal((out, n)) * rng.lognormal(0, 1, size=(out, 1))).astype(np.float32)
    inputs = stats_of(x)
    params = AWQParameters(percent_to_apply=percent, alpha_min=alpha_min, steps=20)
    s = awq_scale(torch.from_numpy(w), LayerConfig(mode, group), inputs, params)
    assert bool((s > 0).all()) and bool(torch.isfinite(s).all())
    wt = torch.from_numpy(w)
    e_awq = inputs.output_error(wt, grid.fake_quantize(wt * s, mode, group) / s)
    e_rtn = inputs.output_error(wt, grid.fake_quantize(wt, mode, group))
    assert e_awq <= e_rtn


def test_awq_protects_the_outlier_channel() -> None:
    rng = np.random.default_rng(0)
    x = activations(rng, 256, 256, outliers=1, factor=50.0)
    w = torch.from_numpy((rng.standard_normal((64, 256)) * 0.05).astype(np.float32))
    inputs = stats_of(x)
    top = int(torch.argmax(inputs.magnitude))
    assert outlier_groups(inputs.magnitude, 64, 0.002) == [top // 64]  # NNCF's default: the top 0.2%, >= 1 channel
    for mode in MODES:
        e_rtn = inputs.output_error(w, grid.fake_quantize(w, mode, 64))
        s = awq_scale(w, LayerConfig(mode, 64), inputs)
        outside = torch.ones(256, dtype=torch.bool)
        outside[top // 64 * 64:(top // 64 + 1) * 64] = False
        assert bool((s[outside] == 1).all())
        assert float(s[top]) > 1 and float(s[top]) == float(s.max())  # scaled up: a finer relative grid
        assert inputs.output_error(w, grid.fake_quantize(w * s, mode, 64) / s) < 0.8 * e_rtn


def test_awq_keeps_unit_scales_when_nothing_helps() -> None:
    w = torch.zeros(4, 16)  # quantized exactly already
    x = activations(np.random.default_rng(0), 32, 16)
    assert torch.equal(awq_scale(w, LayerConfig("int4_sym", 8), stats_of(x), AWQParameters(percent_to_apply=1.0)),
                       torch.ones(16))


def test_awq_parameters_are_checked() -> None:
    with pytest.raises(ConfigError, match="percent_to_apply"):
        AWQParameters(percent_to_apply=0.0)
    with pytest.raises(ConfigError, match="steps"):
        AWQParameters(steps=0)
    with pytest.raises(ConfigError, match="alpha_min"):
        AWQParameters(alpha_min=0.8, alpha_max=0.5)
    with pytest.raises(ConfigError, match="input channels"):
        awq_scale(torch.zeros(2, 4), LayerConfig("int4_sym", 4), stats_of(np.ones((3, 8))))
