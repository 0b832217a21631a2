"""``python -m purecomp compress-weights`` and the compressed-model folder it writes
(``save_compressed`` / ``load_compressed``), on a tiny LlamaForCausalLM saved with a word-level
tokenizer built here (no download)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from llm import tiny_llama

from purecomp.commands import main
from purecomp.errors import ConfigError, StateError
from purecomp.transforms.weight_compression import (
    CompressedEmbedding,
    CompressedLinear,
    compress_weights,
    load_compressed,
    save_compressed,
)
from purecomp.transforms.weight_compression.cli import text_dataset

pytest.importorskip("transformers")

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches "
         "and every small model learns to compress its weights into four bits").split()
TEXT = " ".join(WORDS[(7 * i) % len(WORDS)] for i in range(3000))


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{w: i + 1 for i, w in enumerate(dict.fromkeys(WORDS))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama(tie_word_embeddings=True, vocab=64).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    (folder / "calibration.txt").write_text(TEXT, encoding="utf-8")
    return folder


def run_cli(*args: str) -> None:
    assert main(["compress-weights", *args]) == 0


def test_cli_writes_a_folder_that_loads_to_the_same_compressed_model(model_folder, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    run_cli("--model", str(model_folder), "--mode", "int4_sym", "--group-size", "64", "--ratio", "0.5",
            "--awq", "--scale-estimation", "--dataset", str(model_folder / "calibration.txt"), "--subset-size", "8",
            "--seq-len", "16",
            "--out", str(out))
    printed = capsys.readouterr().out
    assert "| int4_sym" in printed and "| int8_asym" in printed and "MiB ->" in printed
    loaded = load_compressed(out)
    assert any(isinstance(m, CompressedLinear) and m.mode == "int4_sym" for m in loaded.modules())
    assert any(isinstance(m, CompressedLinear) and m.input_scale is not None for m in loaded.modules())  # AWQ
    assert any(isinstance(m, CompressedEmbedding) for m in loaded.modules())

    # the same call in process gives the same model, bit for bit
    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    reference = AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float32).eval()
    dataset = text_dataset(tokenizer, model_folder / "calibration.txt", 16, 8)
    compress_weights(reference, mode="int4_sym", group_size=64, ratio=0.5, dataset=dataset, subset_size=8, awq=True,
                     scale_estimation=True)
    ids = dataset[0]["input_ids"]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, reference(ids).logits)
    assert AutoTokenizer.from_pretrained(out)("quick fox").input_ids == tokenizer("quick fox").input_ids


def test_cli_onnx_writes_a_model_that_onnxruntime_runs_as_the_saved_one(model_folder, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    import onnx

    from purecomp.transforms.weight_compression.export_onnx import generate_greedy, session

    out = tmp_path / "out"
    run_cli("--model", str(model_folder), "--mode", "int4_sym", "--group-size", "32", "--out", str(out), "--onnx")
    assert "ONNX: " in capsys.readouterr().out
    ops = {node.op_type for node in onnx.load(str(out / "model.onnx")).graph.node}
    assert "MatMulNBits" in ops
    loaded = load_compressed(out)
    loaded.generation_config.eos_token_id = None
    ids = torch.tensor([[3, 7, 1, 9, 4]])
    with torch.no_grad():
        expected = loaded.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                   do_sample=False)[0, ids.shape[1]:].numpy()
    assert (generate_greedy(session(out / "model.onnx", threads=1), ids, 8)[0] == expected).all()


def test_save_and_load_keep_tied_weights_shared_and_exact(tmp_path):
    model = compress_weights(tiny_llama(tie_word_embeddings=True), mode="int8_asym")
    path = save_compressed(model, tmp_path)
    loaded = load_compressed(tmp_path)
    original, again = model.state_dict(), loaded.state_dict()
    assert original.keys() == again.keys()
    for key, value in original.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, again[key]), key
    assert loaded.lm_head.packed_weight is loaded.model.embed_tokens.packed_weight
    assert path.stat().st_size < 0.4 * sum(p.numel() * 4 for p in tiny_llama().parameters())


def test_load_refuses_a_folder_without_the_weights_file(tmp_path):
    with pytest.raises(StateError, match="purecomp_weights.safetensors"):
        load_compressed(tmp_path)


def test_cli_errors_name_the_option(model_folder, tmp_path):
    with pytest.raises(ConfigError, match="--dataset"):
        run_cli("--model", str(model_folder), "--mode", "int4_sym", "--gptq", "--out", str(tmp_path))
    with pytest.raises(ConfigError, match="--model"):
        run_cli("--model", str(tmp_path / "missing"), "--out", str(tmp_path))
    with pytest.raises(ConfigError, match="--onnx"):
        run_cli("--model", str(model_folder), "--mode", "nf4", "--onnx", "--out", str(tmp_path))
    short = tmp_path / "short.txt"
    short.write_text("the fox", encoding="utf-8")
    with pytest.raises(ConfigError, match="at least --seq-len"):
        run_cli("--model", str(model_folder), "--mode", "int4_sym", "--group-size", "64", "--dataset", str(short),
                "--out", str(tmp_path))


def test_python_dash_m_lists_the_command():
    out = subprocess.run([sys.executable, "-m", "purecomp", "compress-weights", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "--group-size" in out and "--scale-estimation" in out
