"""Scale estimation against a NumPy transcription of NNCF's ``ScaleEstimation.calculate_quantization_params``
fed explicit input rows, and its objectives against round-to-nearest's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from purecomp.errors import ConfigError
from purecomp.transforms.weight_compression import grid
from purecomp.transforms.weight_compression.layer_inputs import InputAccumulator, LayerInputs
from purecomp.transforms.weight_compression.precision import LayerConfig
from purecomp.transforms.weight_compression.scale_estimation import (
    ScaleEstimationParameters,
    estimate_scales,
    group_errors,
)

NF4 = grid.NF4_LEVELS.numpy()
NF4_CENTERS = grid.NF4_CENTERS.numpy()
EPS32 = np.float32(np.finfo(np.float32).eps)


def np_scales(w: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Round-to-nearest scales and zero points of ``w [out, n_groups, g]`` (float32)."""
    if mode == "nf4":
        s = np.abs(w).max(-1)
        return np.where(np.abs(s) < EPS32, EPS32, s), None
    if mode == "int4_asym":
        s = (w.max(-1) - w.min(-1)) / np.float32(15)
        s = np.where(np.abs(s) < EPS32, EPS32, s).astype(np.float32)
        return s, np.clip(-np.round(w.min(-1) / s), 0, 15).astype(np.float32)
    abs_min, hi = np.abs(w.min(-1)), w.max(-1)
    s = (np.where(abs_min >= hi, abs_min, -hi) / np.float32(8)).astype(np.float32)
    return np.where(np.abs(s) < EPS32, EPS32, s), None


def np_targets(w: np.ndarray, s: np.ndarray, z: np.ndarray | None, mode: str) -> np.ndarray:
    """The unscaled quantized values: ``q - z`` (integers) or the NF4 level."""
    x = (w / s[..., None]).astype(np.float32)
    if mode == "nf4":
        return NF4[np.searchsorted(NF4_CENTERS, x)]
    if z is None:
        return np.clip(np.round(x), -8, 7)
    return np.clip(np.round(x + z[..., None]), 0, 15) - z[..., None]


def reference_scale_estimation(w: np.ndarray, x: np.ndarray, magnitude: np.ndarray, mode: str, g: int,
                               initial_steps: int, scale_steps: int) -> np.ndarray:
    """NNCF's algorithm written out on input rows ``x [rows, in]`` (its per-sample mean vectors):
    the per-(row, group) objective is ``mean_r (w_K . x_rK - w'_K . x_rK)^2``; importance from
    ``magnitude`` (NNCF passes ``max |x|`` over the samples; purecomp ``mean |x|``)."""
    out, n = w.shape
    wg = w.reshape(out, n // g, g).astype(np.float32)
    xg = x.reshape(len(x), n // g, g)
    s0, z = np_scales(wg, mode)
    fp = np.einsum("okg,rkg->okr", wg.astype(np.float64), xg)

    def diff(scale: np.ndarray) -> np.ndarray:
        dq = np_targets(wg, scale, z, mode) * scale[..., None]
        return ((fp - np.einsum("okg,rkg->okr", dq.astype(np.float64), xg)) ** 2).mean(-1)

    target = np_targets(wg, s0, z, mode)
    zero = target == 0
    importance = np.where(zero, 0.0, np.broadcast_to(magnitude.reshape(1, n // g, g), wg.shape)).astype(np.float32)
    importance = importance / (importance.sum(-1, keepdims=True) + EPS32)
    sign = s0 / np.abs(s0)

    def estimate(t: np.ndarray) -> np.ndarray:
        ideal = np.abs(wg) / (np.abs(t) + np.float32(0.001) * (t == 0))
        return (ideal * importance).sum(-1) * sign

    best, result = diff(s0), s0
    for _ in range(initial_steps):
        near = estimate(np_targets(wg, result, z, mode))
        e = diff(near)
        keep = e > best
        best = np.where(keep, best, e)
        result = np.where(keep, result, near)
    for step in range(scale_steps):
        near = estimate(np_targets(wg, np.float32(1.0 - 0.05 * step) * s0, z, mode))
        e = diff(near)
        keep = e > best
        best = np.where(keep, best, e)
        result = np.where(keep, result, near)
    return result


def rows_with_outliers(rng: np.random.Generator, rows: int, n: int) -> np.ndarray:
    x = rng.standard_normal((rows, n)) * rng.lognormal(0, 1, size=n)
    x[:, rng.integers(0, n, size=max(n // 16, 1))] *= 10
    return x


def stats_of(x: np.ndarray) -> LayerInputs:
    return LayerInputs(torch.from_numpy(x.T @ x / len(x)), torch.from_numpy(np.abs(x).mean(0)), len(x))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), mode=st.sampled_from(["int4_sym", "int4_asym", "nf4"]),
       group=st.sampled_from([4, 8, 16]), n_groups=st.integers(1, 4), out=st.integers(1, 8),
       rows=st.integers(1, 24), steps=st.sampled_from([(5, 5), (0, 5), (3, 0), (5, 10)]))
def test_scale_estimation_equals_nncfs_algorithm(seed, mode, group, n_groups, out, rows, steps) -> None:
    rng = np.random.default_rng(seed)
    n = group * n_groups
    x = rows_with_outliers(rng, rows, n)
    w = (rng.standard_normal((out, n)) * 0.1).astype(np.float32)
    params = ScaleEstimationParameters(initial_steps=steps[0], scale_steps=steps[1])
    inputs = stats_of(x)
    q = estimate_scales(torch.from_numpy(w), LayerConfig(mode, group), inputs, params, never_worse=False)
    expected = reference_scale_estimation(w, x, inputs.magnitude.numpy(), mode, group, *steps)
    np.testing.assert_allclose(q.scale.numpy(), expected, rtol=2e-6)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), mode=st.sampled_from(["int4_sym", "int4_asym", "nf4"]),
       group=st.sampled_from([2, 4, 8]), n_groups=st.integers(1, 4), out=st.integers(1, 6),
       tokens=st.integers(1, 30), penalty=st.sampled_from([-1.0, 0.5]))
def test_scale_estimation_never_loses_to_round_to_nearest(seed, mode, group, n_groups, out, tokens, penalty) -> None:
    """Per (row, group) on its own objective (without the row fallback), and on the layer's output
    error (with it). The block objective is recomputed here from the explicit input rows."""
    rng = np.random.default_rng(seed)
    n = group * n_groups
    x = rows_with_outliers(rng, tokens, n)
    w = torch.from_numpy((rng.standard_normal((out, n)) * rng.lognormal(0, 1, size=(out, 1))).astype(np.float32))
    inputs, config = stats_of(x), LayerConfig(mode, group)
    params = ScaleEstimationParameters(weight_penalty=penalty)
    rtn = grid.fake_quantize(w, mode, group).double()

    def blocks(approx: torch.Tensor) -> np.ndarray:
        d = (w.double() - approx.double()).numpy().reshape(out, n_groups, group)
        err = (np.einsum("okg,rkg->okr", d, x.reshape(tokens, n_groups, group)) ** 2).mean(-1)
        return err + (penalty * (d**2).mean(-1) if penalty > 0 else 0.0)

    plain = grid.dequantize(*estimate_scales(w, config, inputs, params, never_worse=False), mode)
    assert np.all(blocks(plain) <= blocks(rtn) * (1 + 1e-9) + 1e-12)
    kept = grid.dequantize(*estimate_scales(w, config, inputs, params), mode)
    assert bool((inputs.row_errors(w, kept) <= inputs.row_errors(w, rtn)).all())


def test_scale_estimation_lowers_the_error_on_data_with_outlier_channels() -> None:
    rng = np.random.default_rng(0)
    x = rows_with_outliers(rng, 512, 256)
    w = torch.from_numpy((rng.standard_normal((64, 256)) * 0.05).astype(np.float32))
    inputs = stats_of(x)
    for mode in ("int4_sym", "int4_asym", "nf4"):
        q = estimate_scales(w, LayerConfig(mode, 64), inputs)
        e_rtn = inputs.output_error(w, grid.fake_quantize(w, mode, 64))
        assert inputs.output_error(w, grid.dequantize(*q, mode)) < 0.9 * e_rtn
        rtn = grid.quantize(w, mode, 64)
        assert (q.zero_point is None) == (rtn.zero_point is None)
        if q.zero_point is not None:
            assert torch.equal(q.zero_point, rtn.zero_point)  # zero points stay round-to-nearest's


def test_group_errors_and_the_layer_objective_from_explicit_rows() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 7, 32))  # a batch of token sequences
    w = torch.from_numpy(rng.standard_normal((3, 32)).astype(np.float32))
    approx = grid.fake_quantize(w, "int4_sym", 8)
    acc = InputAccumulator()
    acc.add(torch.from_numpy(x[0]).float())
    acc.add(torch.from_numpy(x[1]).float())
    inputs = acc.result()
    rows = x.reshape(-1, 32)
    d = (w - approx).double().numpy()
    np.testing.assert_allclose(inputs.output_error(w, approx), ((rows @ d.T) ** 2).mean(0).sum(), rtol=1e-5)
    np.testing.assert_allclose(inputs.magnitude.numpy(), np.abs(rows).mean(0), rtol=1e-6)
    blocks = group_errors(w, approx, inputs, 8).numpy()
    for k in range(4):
        part = rows[:, 8 * k:8 * (k + 1)] @ d[:, 8 * k:8 * (k + 1)].T
        np.testing.assert_allclose(blocks[:, k], (part**2).mean(0), rtol=1e-5)
    scaled = inputs.scaled(torch.linspace(0.5, 2, 32))
    np.testing.assert_allclose(scaled.gram.numpy(), (rows / np.linspace(0.5, 2, 32)).T
                               @ (rows / np.linspace(0.5, 2, 32)) / len(rows), rtol=1e-5, atol=1e-6)


def test_scale_estimation_errors() -> None:
    x = np.random.default_rng(0).standard_normal((8, 8))
    with pytest.raises(ConfigError, match="input channels"):
        estimate_scales(torch.zeros(2, 4), LayerConfig("int4_sym", 4), stats_of(x))
    with pytest.raises(ConfigError, match="initial_steps"):
        ScaleEstimationParameters(initial_steps=-1)
