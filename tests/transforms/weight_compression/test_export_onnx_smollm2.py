"""The real SmolLM2-135M-Instruct compressed to int4_sym g128 (NNCF's ``adjust`` fallback: 64 for
the 576-input layers) and exported with ``export_compressed``: ONNX Runtime's greedy tokens agree
with PyTorch's (``generate``) on 20 prompts x 20 new tokens, its logits stay close to PyTorch's, and
the file is at most 0.35 of the float32 weights. PyTorch's tokens come from a float twin holding the
compressed model's dequantized weights (equal logits, checked), which generates much faster."""

from __future__ import annotations

import copy
from collections import Counter

import numpy as np
import onnx
import pytest
import torch

import purecomp as pc
from purecomp.transforms.weight_compression import dequantized_weights
from purecomp.transforms.weight_compression.export_onnx import (
    CausalLMWithCache,
    export_compressed,
    file_bytes,
    generate_greedy,
    session,
)
from tests.llm import load_smollm2

pytestmark = pytest.mark.slow
ort = pytest.importorskip("onnxruntime")

PROMPTS = [
    "The capital of France is",
    "Water boils at a temperature of",
    "The three primary colors are",
    "In the morning, I like to",
    "The largest planet in our solar system is",
    "To make a cup of tea, you first",
    "The author of the novel was born in",
    "A computer program is a list of",
    "The train left the station and",
    "My favourite book is about",
    "The recipe calls for two cups of",
    "Photosynthesis is the process by which plants",
    "The meeting was postponed because",
    "Once upon a time, in a small village,",
    "The best way to learn a new language is",
    "The river flows from the mountains to",
    "She opened the door and saw",
    "The history of the Roman Empire",
    "A good night's sleep helps",
    "The price of the house was",
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model, tokenizer = load_smollm2()
    float_bytes = 4 * sum(p.numel() for p in model.parameters())
    twin = copy.deepcopy(model)
    pc.compress_weights(model, mode="int4_sym", group_size=128,
                        advanced_parameters={"group_size_fallback_mode": "adjust"})
    model.generation_config.eos_token_id = None  # always 20 new tokens, in PyTorch as in the ONNX loop
    path = export_compressed(model, tmp_path_factory.mktemp("smollm2") / "smollm2_int4.onnx")
    # a float model holding the compressed model's W': the same logits bit for bit (checked below), but
    # without dequantizing every weight on every call, so generate() takes seconds instead of minutes
    with torch.no_grad():
        for name, weight in dequantized_weights(model).items():
            twin.get_parameter(name).copy_(weight)
    twin.generation_config.eos_token_id = None
    return model, tokenizer, path, float_bytes, twin


def test_float_twin_computes_the_compressed_models_logits(exported) -> None:
    model, tokenizer, _, _, twin = exported
    ids = tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(twin(ids).logits, model(ids).logits)


def test_file_holds_4bit_weights(exported) -> None:
    model, _, path, float_bytes, _ = exported
    proto = onnx.load(str(path), load_external_data=False)
    ops = Counter(n.op_type for n in proto.graph.node)
    assert ops["MatMulNBits"] == 30 * 7  # the 4-bit linears; the int8 LM head is folded to float at load
    assert file_bytes(path) <= 0.35 * float_bytes


def test_greedy_tokens_agree_with_pytorch(exported) -> None:
    _, tokenizer, path, _, twin = exported
    sess = session(path, threads=2)
    equal = total = 0
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            expected = twin.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20,
                                     do_sample=False)[0, ids.shape[1]:].numpy()
        got = generate_greedy(sess, ids, 20)[0]
        assert len(expected) == len(got) == 20
        equal += int((expected == got).sum())
        total += 20
    assert equal / total >= 0.95, f"{equal} of {total} tokens agree"


def test_logits_close_to_pytorch(exported) -> None:
    model, tokenizer, path, _, _ = exported
    wrapper = CausalLMWithCache(model)
    ids = tokenizer(" ".join(PROMPTS[:4]), return_tensors="pt").input_ids
    args = (ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None],
            *[torch.zeros(1, wrapper.num_kv_heads, 0, wrapper.head_dim)] * (2 * wrapper.num_layers))
    with torch.no_grad():
        expected = wrapper(*args)[0].numpy()
    got = session(path, threads=2).run(["logits"], {n: a.numpy() for n, a in zip(wrapper.input_names(), args)})[0]
    # accuracy level 0: PyTorch's weights, float arithmetic in another order
    assert np.abs(got - expected).max() < 1e-4 * np.abs(expected).max()
    assert (got.argmax(-1) == expected.argmax(-1)).mean() >= 0.99
