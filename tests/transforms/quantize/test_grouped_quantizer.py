"""Per-embedding-group activation quantizers: math against the numpy oracle of MATH.md's
asymmetric quantizer applied per group, the grouping search against brute force, bad inputs,
and the export on a small BERT (onnxruntime agrees with PyTorch, integer matmuls)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from purecomp.errors import CalibrationError, ConfigError, QuantizerRangeError, ScopeError
from purecomp.transforms.quantize import (
    AsymmetricQuantizer,
    GroupedQuantizer,
    RangeInit,
    channel_groups,
    grouped_activations,
    make_grouped_quantizer,
    make_quantizer,
    quantization,
)
from purecomp.transforms.quantize.grouped import ChannelStatistics

import oracles


def _case(seed: int, channels: int, count: int) -> tuple[torch.Tensor, tuple[int, ...], torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    groups = tuple(int(k) for k in torch.randint(0, count, (channels,), generator=g))
    groups = tuple(range(count)) + groups[count:]  # every group used
    low = -torch.rand(count, generator=g) * 3
    high = torch.rand(count, generator=g) * 5 + 0.1
    scale = torch.rand(channels, generator=g) * 4 + 0.2
    x = torch.randn(3, 5, channels, generator=g) * scale
    x[0, 0, :count] = low  # values exactly on the range ends
    x[0, 1, :count] = high
    return x, groups, low, high


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), channels=st.integers(3, 12), count=st.integers(1, 3), bits=st.sampled_from([4, 8]))
def test_forward_and_gradients_match_the_per_group_oracle(seed, channels, count, bits):
    x, groups, low, high = _case(seed, channels, count)
    q = make_grouped_quantizer(low, high, groups, bits=bits)
    x = x.requires_grad_(True)
    out = q(x)
    grad = torch.randn_like(out)
    out.backward(grad)
    index = np.asarray(groups)
    expected, dx, dlow_c, drange_c = oracles.asymmetric(
        x.detach().numpy(), q.input_low.detach().numpy()[index], q.input_range.detach().numpy()[index], bits,
        axis=2, grad=grad.numpy())
    np.testing.assert_allclose(out.detach().numpy(), expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(x.grad.numpy(), dx, rtol=0, atol=1e-6)
    dlow, drange = np.zeros(count), np.zeros(count)
    np.add.at(dlow, index, dlow_c)
    np.add.at(drange, index, drange_c)
    np.testing.assert_allclose(q.input_low.grad.numpy(), dlow, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(q.input_range.grad.numpy(), drange, rtol=1e-4, atol=1e-4)


def test_each_group_is_torch_per_tensor_fake_quantize_and_one_group_is_the_asymmetric_quantizer():
    x, groups, low, high = _case(3, 10, 3)
    q = make_grouped_quantizer(low, high, groups)
    out = q(x)
    lo, hi = q.float_range()
    for k, channels in enumerate(q.members()):
        step = float((hi[k] - lo[k]) / 255)
        zp = int(torch.round(-lo[k] / step))
        ref = torch.fake_quantize_per_tensor_affine(x[..., channels], step, zp, 0, 255)
        torch.testing.assert_close(out[..., channels], ref, atol=1e-5, rtol=0)
    one = make_grouped_quantizer(low[:1], high[:1], (0,) * 10)
    plain = make_quantizer("asymmetric", low[0], high[0], bits=8, signed=None, narrow_range=False, axis=None)
    assert isinstance(plain, AsymmetricQuantizer)
    torch.testing.assert_close(one(x), plain(x), atol=0, rtol=0)


def _brute_force(low: torch.Tensor, high: torch.Tensor, count: int) -> float:
    order = torch.argsort(high - low, stable=True)
    lo, hi = low[order].double(), high[order].double()
    best = float("inf")
    for k in range(count):
        for cuts in itertools.combinations(range(1, len(lo)), k):
            bounds = (0, *cuts, len(lo))
            cost = sum((b - a) * float(hi[a:b].max() - lo[a:b].min()) ** 2 for a, b in itertools.pairwise(bounds))
            best = min(best, cost)
    return best


def _cost(low: torch.Tensor, high: torch.Tensor, groups: tuple[int, ...]) -> float:
    index = torch.tensor(groups)
    low, high = low.double(), high.double()
    total = 0.0
    for k in set(groups):
        members = index == k
        total += int(members.sum()) * float(high[members].max() - low[members].min()) ** 2
    return total


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), channels=st.integers(1, 9), count=st.integers(1, 4))
def test_channel_groups_is_the_best_contiguous_split_by_width(seed, channels, count):
    g = torch.Generator().manual_seed(seed)
    low = -torch.rand(channels, generator=g) * torch.rand(channels, generator=g) * 20
    high = torch.rand(channels, generator=g) * torch.rand(channels, generator=g) * 20
    groups = channel_groups(low, high, count)
    assert len(groups) == channels and len(set(groups)) <= count
    assert sorted(set(groups)) == list(range(len(set(groups))))
    assert _cost(low, high, groups) == pytest.approx(_brute_force(low, high, count), rel=1e-9)


def test_channel_groups_isolates_an_outlier_channel():
    low = torch.full((64,), -1.0)
    high = torch.ones(64)
    high[17] = 30.0
    groups = channel_groups(low, high, 2)
    assert groups[17] == 1 and sum(groups) == 1


def test_channel_statistics_group_ranges():
    stats = ChannelStatistics()
    stats.observe(torch.tensor([[[0.0, -1.0, 2.0]], [[1.0, 3.0, -2.0]]]))
    stats.observe(torch.tensor([[[4.0, 0.0, 1.0]]]))
    lo, hi = stats.channel_range("min_max")
    assert lo.tolist() == [0.0, -1.0, -2.0] and hi.tolist() == [4.0, 3.0, 2.0]
    # group 0 (channels 0, 2): batch 1 in [-2, 2], batch 2 in [1, 4]; group 1: [-1, 3], then [0, 0]
    lo, hi = stats.group_range((0, 1, 0), "mean_min_max")
    assert lo.tolist() == [-0.5, -0.5] and hi.tolist() == [3.0, 1.5]
    lo, hi = stats.group_range((0, 1, 0), "min_max")
    assert lo.tolist() == [-2.0, -1.0] and hi.tolist() == [4.0, 3.0]


def test_bad_inputs_raise_specific_errors():
    with pytest.raises(QuantizerRangeError, match="use each group"):
        make_grouped_quantizer(torch.zeros(2), torch.ones(2), (0, 0, 0))
    with pytest.raises(QuantizerRangeError, match="one low and one high"):
        make_grouped_quantizer(torch.zeros(2), torch.ones(3), (0, 1))
    with pytest.raises(QuantizerRangeError, match="low <= high"):
        make_grouped_quantizer(torch.ones(1), torch.zeros(1), (0,))
    with pytest.raises(QuantizerRangeError, match="bits"):
        make_grouped_quantizer(torch.zeros(1), torch.ones(1), (0,), bits=1)
    q = make_grouped_quantizer(torch.zeros(1), torch.ones(1), (0, 0))
    assert isinstance(q, GroupedQuantizer)
    with pytest.raises(QuantizerRangeError, match="last axis to have 2 channels"):
        q(torch.ones(4, 3))
    with pytest.raises(ConfigError, match="num_groups"):
        channel_groups(torch.zeros(3), torch.ones(3), 0)
    with pytest.raises(CalibrationError, match="finite"):
        channel_groups(torch.tensor([0.0, float("nan")]), torch.ones(2), 2)
    with pytest.raises(CalibrationError, match="saw no values"):
        ChannelStatistics().channel_range("min_max")
    with pytest.raises(ConfigError, match="range_type"):
        _stats_one().channel_range("percentile")
    with pytest.raises(ConfigError, match="num_groups"):
        grouped_activations(quantization(), ["x"], num_groups=0)
    with pytest.raises(ConfigError, match="range_init.type"):
        grouped_activations(quantization(), ["x"], range_init=RangeInit(type="threesigma"))


def _stats_one() -> ChannelStatistics:
    stats = ChannelStatistics()
    stats.observe(torch.ones(2, 3))
    return stats


# ---------------------------------------------------------------- small BERT: placement, export


def _grouped_bert(num_groups: int = 3):
    pytest.importorskip("transformers")
    from purecomp.integrations import transformers as pct

    from models import padded_batch, small_encoder

    model = pct.use_eager_attention(small_encoder("bert"))
    batch = padded_batch()
    graph = pct.trace_transformer(model, batch)
    method = pct.transformer_quantization(
        weights=dict(mode="symmetric", per_channel=True), activations=dict(mode="asymmetric"),
        grouped_activation_scopes=pct.GROUPED_SCOPES, num_groups=num_groups)
    params = dict(model.named_parameters())
    state = method.init(graph, params, [batch, padded_batch()])
    return model, method, params, state, batch


def test_bert_linears_reading_outliers_get_grouped_input_quantizers():
    model, method, params, state, batch = _grouped_bert()
    grouped = {k for k, q in state.activations.items() if isinstance(q, GroupedQuantizer)}
    expected = {f"encoder.layer.{i}.{name}/linear#0:in0" for i in range(2)
                for name in ("attention.self.query", "attention.self.key", "attention.self.value",
                             "intermediate.dense", "output.dense")}
    assert grouped == expected
    # the tensors they read carry no per-tensor quantizer any more (the residual reads them in float),
    # but the last one, which feeds the pooler (not a grouped scope)
    assert {k for k in state.activations if "LayerNorm" in k or "gelu" in k} == {
        "encoder.layer.1.output.LayerNorm/layer_norm#0:out0"}
    assert all(q.num_groups == 3 for k, q in state.activations.items() if k in grouped)
    assert dict(state.consumers)["encoder.layer.0.intermediate.dense/linear#0:in0"] == (
        "encoder.layer.0.intermediate.dense/linear#0",)
    import purecomp as pc

    with torch.no_grad():
        out = pc.apply(model, method, params, state, **batch).last_hidden_state
        ref = model(**batch).last_hidden_state
    assert out.shape == ref.shape and not torch.equal(out, ref)


def test_grouped_bert_exports_to_integer_matmuls_that_onnxruntime_runs(tmp_path):
    pytest.importorskip("onnxruntime")
    from purecomp import export
    from purecomp.export.check import fused_op_counts
    from purecomp.integrations import transformers as pct

    model, method, params, state, batch = _grouped_bert()
    args = pct.positional_inputs(model, batch)
    path = export.to_onnx(model, method, params, state, args, tmp_path / "grouped.onnx")
    result = export.check(path, model, method, params, state, args)
    assert result.max_steps <= 1.0 + 1e-4 and result.fused_max_steps <= 1.0 + 1e-4, result
    ops = fused_op_counts(path)
    integer = sum(ops[k] for k in ("MatMulIntegerToFloat", "QLinearMatMul", "MatMulInteger"))
    from purecomp import trace
    from purecomp.export import materialize
    from purecomp.export.grouped_linear import GroupedLinear, blocks

    module = materialize(model, method, params, state, graph=trace(model, args))
    linears = {name: m for name, m in module.model.named_modules() if isinstance(m, GroupedLinear)}
    integer_blocks = sum(len(blocks([len(c) for c in q.members()])[0])
                         for q in state.activations.values() if isinstance(q, GroupedQuantizer))
    # an integer matmul per large group of every grouped linear, plus the attention-output linears
    # and the 2 attention matmuls per layer
    assert integer >= integer_blocks + 2 * 3, ops
    # each input is permuted into group order once, on axis 0 (whole rows), shared by the linears
    # that read it with the same groups (Q, K, V); then one Slice (fused into a Split) per block.
    # The FFN output linear reads GELU(intermediate) in group order: no permutation at all
    import onnx

    from purecomp.export.check import ort_session
    from purecomp.transforms.quantize.placement import source_of

    assert {name for name, m in linears.items() if m.input_in_order} == {
        f"encoder.layer.{i}.output.dense" for i in range(2)}
    ort_session(path, True, tmp_path / "optimized.onnx")
    graph = onnx.load(str(tmp_path / "optimized.onnx")).graph
    producer = {out: n for n in graph.node for out in n.output}
    permutations = [n for n in graph.node if n.op_type == "Gather" and n.input[0] in producer
                    and producer[n.input[0]].op_type == "Transpose"]
    traced = pct.trace_transformer(model, batch)
    orders = {(source_of(traced, traced.node(key.rpartition(":")[0]).inputs[0]).key,
               tuple(c for members in q.members() for c in members))
              for key, q in state.activations.items()
              if isinstance(q, GroupedQuantizer) and not linears[key.partition("/")[0]].input_in_order}
    assert len(permutations) == 2 * 2 == len(orders), [n.input for n in permutations]
    assert all(a.i == 0 for n in permutations for a in n.attribute if a.name == "axis")
    others = [n for n in graph.node if n.op_type == "Gather" and n.input[0] in producer and n not in permutations]
    assert len(others) == 1, others  # the pooler's first token; the other Gathers read the embedding tables
    dq_outputs = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    dq_readers = {n.op_type for n in graph.node if dq_outputs & set(n.input)}
    assert dq_readers <= {"MatMul", "FusedGemm", "Gather"}, dq_readers  # float blocks, pooler: none feeds an Add


def test_grouped_linear_applies_the_output_quantizer_to_the_whole_sum():
    """The linear's output quantizer (``<scope>/linear#0:out0``) moves into the ``GroupedLinear``:
    left at its site, it would quantize the first group's term only."""
    from purecomp import apply, trace
    from purecomp.export import materialize
    from purecomp.export.grouped_linear import GroupedLinear
    from purecomp.integrations import transformers as pct

    model, method, params, state, batch = _grouped_bert()
    args = pct.positional_inputs(model, batch)
    module = materialize(model, method, params, state, graph=trace(model, args))
    query = module.model.get_submodule("encoder.layer.0.attention.self.query")
    assert isinstance(query, GroupedLinear) and query.output is not None
    assert "encoder.layer.0.attention.self.query/linear#0:out0" not in module.site_keys
    with torch.no_grad():
        out = module(*args).last_hidden_state
        expected = apply(model, method, params, state, *args).last_hidden_state
    assert float((out - expected).abs().max()) <= 1e-4


def test_grouped_scopes_must_feed_linears_and_match_something():
    pytest.importorskip("transformers")
    from purecomp.integrations import transformers as pct

    from models import padded_batch, small_encoder

    model = pct.use_eager_attention(small_encoder("bert"))
    batch = padded_batch()
    graph = pct.trace_transformer(model, batch)
    params = dict(model.named_parameters())
    with pytest.raises(ScopeError, match="match no site"):
        pct.transformer_quantization(grouped_activation_scopes=["{re}nothing/here#0"]).init(graph, params, [batch])
    with pytest.raises(ConfigError, match="matmul"):  # the key tensor feeds Q K^T, not a linear
        pct.transformer_quantization(grouped_activation_scopes=[r"{re}.*attention\.self/matmul#0"]).init(
            graph, params, [batch])


def test_grouped_state_round_trips_through_save_state_and_load_state(tmp_path):
    """A state holding ``GroupedQuantizer`` s saves and loads (``purecomp.checkpoint``) to equal
    quantizers: same groups and bits, same range tensors, the same outputs."""
    from purecomp import apply
    from purecomp.checkpoint import load_state, save_state

    model, method, params, state, batch = _grouped_bert()
    loaded = load_state(save_state(tmp_path / "grouped.safetensors", state))
    grouped = {k: q for k, q in state.activations.items() if isinstance(q, GroupedQuantizer)}
    assert grouped
    for key, q in grouped.items():
        back = loaded.activations[key]
        assert isinstance(back, GroupedQuantizer) and (back.groups, back.bits) == (q.groups, q.bits)
        assert torch.equal(back.input_low, q.input_low) and torch.equal(back.input_range, q.input_range)
    with torch.no_grad():
        expected = apply(model, method, params, state, **batch).last_hidden_state
        assert torch.equal(apply(model, method, params, loaded, **batch).last_hidden_state, expected)
