"""ONNX export of weight-compressed causal LMs (``export_compressed``): the ``MatMulNBits`` layout
dequantizes to purecomp's weights bit for bit (in a NumPy-free torch transcription of ONNX
Runtime's documented layout and in ONNX Runtime itself), the materialized model equals the
compressed one, and a tiny ``LlamaForCausalLM`` exported with its KV cache runs in ONNX Runtime
with PyTorch's logits and greedy tokens."""

from __future__ import annotations

import copy
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import purecomp as pc
from purecomp.export import ExportError
from purecomp.transforms.weight_compression import (
    CompressedEmbedding,
    CompressedLinear,
    PackedWeight,
    onnx_ops,
    quantize,
)
from purecomp.transforms.weight_compression.export_onnx import (
    CausalLMWithCache,
    NBitsEmbedding,
    NBitsLinear,
    export_compressed,
    file_bytes,
    generate_greedy,
    materialize_nbits,
    matmul_nbits_to_dequantize_linear,
    nbits_block_size,
    session,
    to_nbits,
)

ort = pytest.importorskip("onnxruntime")

INTEGER_MODES = ["int4_sym", "int4_asym", "int8_sym", "int8_asym"]
# accuracy level 4 quantizes each block of activations to int8 inside ONNX Runtime: the largest logit
# error, relative to the largest logit, measured 0.04 - 0.054 on these tiny models
ACC4_TOLERANCE = 0.1


def packed_weight(mode: str, group_size: int, shape: tuple[int, int] = (24, 192), seed: int = 0) -> PackedWeight:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g) * torch.rand(shape[0], 1, generator=g)  # rows of different ranges
    w[0] = w[0].abs() + 0.1  # an all-positive row: its zero point / signed scale at the edge
    return PackedWeight.pack(quantize(w, mode, group_size), mode)


def nbits_model(weight, accuracy_level: int = 0) -> onnx.ModelProto:
    """One ``MatMulNBits`` node ``Y = A W^T`` over ``weight``'s initializers."""
    inits = [numpy_helper.from_array(weight.b.numpy(), "B"), numpy_helper.from_array(weight.scales.numpy(), "scales")]
    inputs = ["A", "B", "scales"]
    if weight.zero_points is not None:
        inits.append(numpy_helper.from_array(weight.zero_points.numpy(), "zero_points"))
        inputs.append("zero_points")
    node = helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", name="mm", K=weight.k, N=weight.n,
                            bits=weight.bits, block_size=weight.block_size, accuracy_level=accuracy_level)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", weight.k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", weight.n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])


def run_identity(model: onnx.ModelProto, k: int, **config: str) -> np.ndarray:
    """``W`` as ONNX Runtime dequantizes it: the node's output for the identity input, transposed."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    level = config.pop("_level", None)
    if level is not None:
        so.graph_optimization_level = level
    for key, value in config.items():
        so.add_session_config_entry(key, value)
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"A": np.eye(k, dtype=np.float32)})[0].T


# -- the layout --

@pytest.mark.parametrize(("group_size", "expected"), [(576, 64), (1536, 128), (128, 128), (32, 32), (16, 16),
                                                      (24, None), (8, None), (96, 32)])
def test_block_size_is_the_largest_power_of_two_dividing_the_group(group_size: int, expected: int | None) -> None:
    assert nbits_block_size(group_size) == expected


@pytest.mark.parametrize("mode", INTEGER_MODES)
@pytest.mark.parametrize(("group_size", "block_size"), [(32, 32), (64, 16), (192, 64), (96, 32)])
def test_layout_dequantizes_to_the_stored_weight_bit_for_bit(mode: str, group_size: int, block_size: int) -> None:
    packed = packed_weight(mode, group_size)
    weight = to_nbits(packed, block_size)
    n, k = packed.shape
    assert weight.b.dtype == torch.uint8 and tuple(weight.b.shape) == (n, k // block_size, block_size * weight.bits // 8)
    assert weight.scales.dtype == torch.float32 and tuple(weight.scales.shape) == (n, k // block_size)
    assert (weight.zero_points is None) == mode.endswith("_sym")
    assert torch.equal(weight.dequantize(), packed.dequantize())


def test_4bit_bytes_are_purecomps_own_bytes() -> None:
    packed = packed_weight("int4_asym", 64)
    weight = to_nbits(packed, 64)
    assert torch.equal(weight.b.reshape(packed.data.shape), packed.data)  # no re-packing, only a reshape
    assert torch.equal(weight.zero_points, packed.zero_point)


def test_nf4_has_no_matmul_nbits_layout() -> None:
    with pytest.raises(ExportError, match="codebook"):
        to_nbits(packed_weight("nf4", 64), 64)


@pytest.mark.parametrize("mode", INTEGER_MODES)
@pytest.mark.parametrize(("group_size", "block_size"), [(64, 64), (192, 64), (32, 16)])
def test_onnxruntime_matmul_nbits_dequantizes_bit_for_bit(mode: str, group_size: int, block_size: int) -> None:
    packed = packed_weight(mode, group_size)
    weight = to_nbits(packed, block_size)
    np.testing.assert_array_equal(run_identity(nbits_model(weight), weight.k), packed.dequantize().numpy())


@pytest.mark.parametrize("mode", INTEGER_MODES)
def test_onnxruntime_dequantize_linear_form_dequantizes_bit_for_bit(mode: str) -> None:
    packed = packed_weight(mode, 64)
    model = nbits_model(to_nbits(packed, 64))
    assert matmul_nbits_to_dequantize_linear(model) == 1
    ops = [node.op_type for node in model.graph.node]
    assert ops == ["DequantizeLinear", "MatMul"]
    q = next(init for init in model.graph.initializer if init.name.endswith("_dq_q"))
    expected = {"int4_sym": TensorProto.INT4, "int4_asym": TensorProto.UINT4, "int8_sym": TensorProto.INT8,
                "int8_asym": TensorProto.UINT8}[mode]
    assert q.data_type == expected and list(q.dims) == [192, 24]
    onnx.checker.check_model(model, full_check=True)
    reference = packed.dequantize().numpy()
    # unfused: DequantizeLinear and MatMul as written
    np.testing.assert_array_equal(run_identity(model, 192, _level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL),
                                  reference)
    # ONNX Runtime fuses DequantizeLinear + MatMul into MatMulNBits; accuracy level 0 computes in float
    np.testing.assert_array_equal(run_identity(model, 192, **{"session.qdq_matmulnbits_accuracy_level": "0"}),
                                  reference)


# -- the materialized model --

def tiny_llama(tie: bool = True, seed: int = 0) -> torch.nn.Module:
    """hidden 64, 2 layers, vocabulary 128; weights drawn wider than HF's default (std 0.02) so that
    greedy decoding does not repeat one token."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=tie, initializer_range=0.25)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None  # always 20 new tokens
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="module")
def int4_llama() -> torch.nn.Module:
    """int4_sym, groups of 32; embedding and (tied) LM head int8_asym per channel (the backup)."""
    return pc.compress_weights(tiny_llama(), mode="int4_sym", group_size=32)


def test_materialized_model_computes_the_compressed_models_logits_exactly(int4_llama) -> None:
    module = materialize_nbits(int4_llama)
    kinds = Counter(type(m).__name__ for m in module.modules())
    assert kinds["NBitsLinear"] == 15 and kinds["NBitsEmbedding"] == 1
    assert not any(isinstance(m, (CompressedLinear, CompressedEmbedding, torch.nn.Linear)) for m in module.modules())
    head, embed = module.lm_head, module.model.embed_tokens
    assert head.b is embed.b and head.scales is embed.scales  # the tied table stays one table
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(module(ids).logits, int4_llama(ids).logits)
    assert isinstance(int4_llama.lm_head, CompressedLinear)  # the compressed model is untouched


def test_nf4_refuses_export_or_falls_back_to_float_weights() -> None:
    model = pc.compress_weights(tiny_llama(), mode="nf4", group_size=32)
    with pytest.raises(ExportError, match="nf4"):
        materialize_nbits(model)
    module = materialize_nbits(model, fallback="float")
    kinds = Counter(type(m).__name__ for m in module.modules())
    assert kinds["Linear"] == 14 and kinds["NBitsLinear"] == 1  # nf4 linears in float, the int8_asym LM head not
    assert isinstance(module.model.embed_tokens, NBitsEmbedding)
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(module(ids).logits, model(ids).logits)


def test_option_errors() -> None:
    model = tiny_llama()
    with pytest.raises(pc.errors.ConfigError, match="weight_format"):
        materialize_nbits(model, weight_format="qdq")
    with pytest.raises(pc.errors.ConfigError, match="accuracy_level"):
        materialize_nbits(model, accuracy_level=7)
    with pytest.raises(pc.errors.ConfigError, match="model"):
        CausalLMWithCache(torch.nn.Linear(2, 2))


# -- ONNX files --

def ort_outputs(path, wrapper: CausalLMWithCache, args) -> list[np.ndarray]:
    sess = session(path, threads=1)
    return sess.run(None, {name: a.numpy() for name, a in zip(wrapper.input_names(), args)})


def greedy_agreement(model: torch.nn.Module, path, prompts: list[torch.Tensor], new_tokens: int) -> float:
    sess = session(path, threads=1)
    equal = total = 0
    for ids in prompts:
        with torch.no_grad():
            expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                      do_sample=False)[0, ids.shape[1]:].numpy()
        got = generate_greedy(sess, ids, new_tokens)[0]
        assert len(expected) == len(got) == new_tokens
        equal += int((expected == got).sum())
        total += new_tokens
    return equal / total


@pytest.fixture(scope="module")
def int4_exported(int4_llama, tmp_path_factory):
    return export_compressed(int4_llama, tmp_path_factory.mktemp("onnx") / "int4.onnx")


def test_export_writes_matmul_nbits_and_integer_initializers(int4_llama, int4_exported) -> None:
    proto = onnx.load(str(int4_exported))
    nodes = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == 14 and all(n.domain == "com.microsoft" for n in nodes)  # the 4-bit linears
    assert all({a.name: a.i for a in n.attribute}["accuracy_level"] == 0 for n in nodes)
    inits = {init.name: init for init in proto.graph.initializer}
    big_floats = [i.name for i in inits.values() if i.data_type == TensorProto.FLOAT and np.prod(i.dims) >= 64 * 32]
    assert big_floats == []  # every weight is stored as integers
    # the embedding and the (int8, folded) LM head read the one packed table
    table = [name for name, i in inits.items() if i.data_type == TensorProto.UINT8 and list(i.dims) == [128, 1, 64]]
    assert len(table) == 1
    readers = Counter(n.op_type for n in proto.graph.node if table[0] in n.input)
    assert readers["Gather"] == 1 and sum(readers.values()) == 2 and "MatMulNBits" not in readers
    assert [i.name for i in proto.graph.input][:3] == ["input_ids", "attention_mask", "position_ids"]
    assert [o.name for o in proto.graph.output][:3] == ["logits", "present.0.key", "present.0.value"]
    float_bytes = 4 * sum(p.numel() for p in tiny_llama().parameters())
    assert file_bytes(int4_exported) < 0.6 * float_bytes


def test_exported_model_matches_pytorch_within_float_rounding(int4_llama, int4_exported) -> None:
    wrapper = CausalLMWithCache(int4_llama)
    for batch, past in ((1, 0), (2, 6)):  # the prompt call (empty cache) and a call with a cache
        args = wrapper.example_inputs(batch=batch, sequence=5, past=past)
        with torch.no_grad():
            expected = [t.numpy() for t in wrapper(*args)]
        got = ort_outputs(int4_exported, wrapper, args)
        assert got[1].shape == (batch, 2, past + 5, 16)
        for g, e in zip(got, expected):
            np.testing.assert_allclose(g, e, rtol=0, atol=2e-5 * max(1.0, np.abs(e).max()))


def test_greedy_tokens_of_the_exported_model_agree_with_pytorch(int4_llama, int4_exported) -> None:
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 128, (1, int(torch.randint(3, 12, (1,), generator=g))), generator=g)
               for _ in range(20)]
    with torch.no_grad():
        sample = int4_llama.generate(prompts[0], max_new_tokens=20, do_sample=False)[0, -20:]
    assert len(set(sample.tolist())) >= 4  # the model does not just repeat one token
    assert greedy_agreement(int4_llama, int4_exported, prompts, 20) >= 0.95


def test_accuracy_level_4_runs_every_linear_in_matmul_nbits(int4_llama, tmp_path) -> None:
    path = export_compressed(int4_llama, tmp_path / "int4_acc4.onnx", accuracy_level=4)
    proto = onnx.load(str(path))
    attributes = [{a.name: a.i for a in n.attribute} for n in proto.graph.node if n.op_type == "MatMulNBits"]
    assert Counter(a["bits"] for a in attributes) == Counter({4: 14, 8: 1})
    assert all(a["accuracy_level"] == 4 for a in attributes)
    wrapper = CausalLMWithCache(int4_llama)
    args = wrapper.example_inputs(batch=1, sequence=6, past=3)
    with torch.no_grad():
        expected = wrapper(*args)[0].numpy()
    got = ort_outputs(path, wrapper, args)[0]
    # ONNX Runtime quantizes each block of activations to int8: close, not float rounding
    error = np.abs(got - expected).max() / np.abs(expected).max()
    assert 1e-4 < error < ACC4_TOLERANCE


def export_module(module: torch.nn.Module, args: tuple, path) -> None:
    program = torch.onnx.export(module, args, dynamo=True, opset_version=21,
                                custom_translation_table=onnx_ops.translation_table(), verbose=False)
    program.save(str(path))


@pytest.mark.parametrize("mode", INTEGER_MODES)
def test_folded_linear_and_embedding_dequantize_bit_for_bit_in_onnxruntime(mode: str, tmp_path) -> None:
    packed = packed_weight(mode, 64)
    weight = to_nbits(packed, 64)
    reference = packed.dequantize().numpy()
    n, k = packed.shape
    export_module(NBitsLinear(weight, None, fold=True).eval(), (torch.eye(k),), tmp_path / "linear.onnx")
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "linear_optimized.onnx")
    sess = ort.InferenceSession(str(tmp_path / "linear.onnx"), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    np.testing.assert_array_equal(sess.run(None, {name: np.eye(k, dtype=np.float32)})[0].T, reference)
    optimized = onnx.load(str(tmp_path / "linear_optimized.onnx"))
    assert {node.op_type for node in optimized.graph.node} <= {"MatMul", "Gemm", "FusedMatMul"}  # folded at load
    export_module(NBitsEmbedding(weight).eval(), (torch.arange(n).reshape(2, n // 2),), tmp_path / "embedding.onnx")
    sess = ort.InferenceSession(str(tmp_path / "embedding.onnx"), providers=["CPUExecutionProvider"])
    rows = sess.run(None, {sess.get_inputs()[0].name: np.arange(n).reshape(2, n // 2)})[0]
    np.testing.assert_array_equal(rows.reshape(n, k), reference)


def test_dequantize_linear_export_of_mixed_precision_with_4bit_embedding(tmp_path) -> None:
    model = pc.compress_weights(tiny_llama(tie=False, seed=1), mode="int4_asym", group_size=32, ratio=0.6,
                                all_layers=True, backup_mode="int8_sym")
    modes = Counter(m.mode for m in model.modules() if isinstance(m, (CompressedLinear, CompressedEmbedding)))
    assert modes["int4_asym"] and modes["int8_sym"]
    assert isinstance(model.model.embed_tokens, CompressedEmbedding)
    path = export_compressed(model, tmp_path / "mixed_dq.onnx", weight_format="dequantize_linear", accuracy_level=0)
    proto = onnx.load(str(path))
    ops = Counter(n.op_type for n in proto.graph.node)
    assert ops["MatMulNBits"] == 0 and ops["DequantizeLinear"] == 15
    types = {i.data_type for i in proto.graph.initializer if i.name.endswith("_dq_q")}
    assert types == {TensorProto.UINT4, TensorProto.INT8}
    wrapper = CausalLMWithCache(model)
    args = wrapper.example_inputs(batch=1, sequence=7, past=3)
    with torch.no_grad():
        expected = wrapper(*args)[0].numpy()
    for level in ("0", "4"):  # ONNX Runtime's fused MatMulNBits at accuracy level 0 (float) and 4 (its default)
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", level)
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        got = sess.run(None, {name: a.numpy() for name, a in zip(wrapper.input_names(), args)})[0]
        tolerance = 2e-5 if level == "0" else ACC4_TOLERANCE
        assert np.abs(got - expected).max() < tolerance * np.abs(expected).max()


def test_float_model_exports_with_the_same_layout(tmp_path) -> None:
    model = tiny_llama()
    path = export_compressed(copy.deepcopy(model), tmp_path / "fp32.onnx")
    proto = onnx.load(str(path))
    assert not any(n.op_type == "MatMulNBits" for n in proto.graph.node)
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(6))
    got = generate_greedy(session(path, threads=1), ids, 8)[0]
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    np.testing.assert_array_equal(got, expected[0, 6:].numpy())


def test_awq_input_scales_are_exported(tmp_path) -> None:
    """A model compressed with AWQ holds per-input-channel scales (``W' = W_q diag(input_scale)``):
    the export multiplies the input by them before ``MatMulNBits``."""
    g = torch.Generator().manual_seed(11)
    data = [torch.randint(0, 128, (1, 16), generator=g) for _ in range(8)]
    model = pc.compress_weights(tiny_llama(), mode="int4_sym", group_size=32, dataset=data, awq=True)
    scaled = [m for m in model.modules() if isinstance(m, CompressedLinear) and m.input_scale is not None]
    assert scaled and any(not torch.all(m.input_scale == 1) for m in scaled)
    path = export_compressed(model, tmp_path / "awq.onnx")
    wrapper = CausalLMWithCache(model)
    args = wrapper.example_inputs(batch=1, sequence=7, past=0)
    with torch.no_grad():
        expected = wrapper(*args)[0].numpy()
    got = ort_outputs(path, wrapper, args)[0]
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-5 * max(1.0, np.abs(expected).max()))
    # without the input scales the logits would differ by far more than float rounding
    stripped = copy.deepcopy(model)
    for m in stripped.modules():
        if isinstance(m, CompressedLinear) and m.input_scale is not None:
            m.input_scale = None
    with torch.no_grad():
        assert np.abs(CausalLMWithCache(stripped)(*args)[0].numpy() - expected).max() > 1e-2 * np.abs(expected).max()
