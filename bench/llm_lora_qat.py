"""INT4 QAT with LoRA adapters on SmolLM2-135M-Instruct: perplexity after PTQ, after QAT, after
folding, and of the folded model in ONNX Runtime.

    python bench/llm_lora_qat.py [--ptq rtn|gptq] [--steps 300] [--rank 32] [--lr 5e-4] [--threads 2]

Model and texts are ``bench/llm_weights.py``'s: perplexity on the first 4096 tokens of the Python
Language Reference chapters "Execution model", "The import system" and "Objects, values and types"
(``pydoc_data.topics``), windows of 512; training text: the chapters "Compound statements",
"Sequence types" and "Special method names" (disjoint), cut into ``--seq-len`` (128) token windows,
visited in a fixed shuffled order. Steps:

1. PTQ: ``compress_weights(mode="int4_sym", group_size=128)`` with NNCF's ``adjust`` fallback,
   ratio 1, embedding / LM head in ``int8_asym``; ``--ptq gptq`` adds GPTQ on 128 calibration
   windows of the training text (the best PTQ of ``bench/llm_weights.py``), ``rtn`` is data-free.
2. The same call with ``compression_format="fq_lora"`` (``lora_adapter_rank=--rank``) starts from
   exactly that PTQ model; ``--steps`` Adam steps (``--lr``, batch of one window) on the
   distillation loss ``KL(teacher || student)`` of the logits against the float model, in a plain
   loop.
3. ``pc.strip`` folds the adapters into packed INT4; ``export_compressed`` writes the folded model
   and ONNX Runtime (CPU) scores the same windows.

Prints each perplexity, the share of the FP32-to-PTQ gap recovered, and times.
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llm_weights import CALIBRATION_TOPICS, GGUF, folder, perplexity, text  # noqa: E402

import purecomp as pc  # noqa: E402
from purecomp.distillation import kl_distillation_loss  # noqa: E402
from purecomp.transforms.weight_compression import lora_parameters  # noqa: E402

ADJUST = {"group_size_fallback_mode": "adjust"}


def onnx_forward(path: Path, threads: int):
    """``chunk [1, n] -> logits [n, vocab]`` of the exported model, called with an empty cache."""
    from purecomp.transforms.weight_compression.export_onnx import prompt_feeds, session

    sess = session(path, threads=threads)
    return lambda chunk: sess.run(["logits"], prompt_feeds(sess, chunk.numpy()))[0][0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ptq", choices=["rtn", "gptq"], default="gptq")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-onnx", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder(), gguf_file=GGUF)
    teacher = AutoModelForCausalLM.from_pretrained(folder(), gguf_file=GGUF, dtype=torch.float32).eval()
    evaluation = tokenizer(text(), return_tensors="pt").input_ids[0, :args.tokens]
    training = tokenizer(text(CALIBRATION_TOPICS), return_tensors="pt").input_ids[0]
    windows = [training[i:i + args.seq_len].unsqueeze(0) for i in range(0, len(training) - args.seq_len, args.seq_len)]
    random.Random(args.seed).shuffle(windows)
    options = dict(mode="int4_sym", group_size=128, ratio=1.0)
    if args.ptq == "gptq":
        options |= dict(dataset=windows[:128], gptq=True)
    logits_of = lambda model: (lambda chunk: model(chunk).logits[0])  # noqa: E731

    fp32 = perplexity(logits_of(teacher), evaluation, args.window)[0]
    start = time.perf_counter()
    student = pc.compress_weights(copy.deepcopy(teacher), compression_format="fq_lora",
                                  advanced_parameters=ADJUST | {"lora_adapter_rank": args.rank}, **options)
    ptq_seconds = time.perf_counter() - start
    ptq = perplexity(logits_of(student), evaluation, args.window)[0]  # B A = 0: the PTQ model itself
    print(f"FP32 {fp32:.3f}; PTQ ({args.ptq}) {ptq:.3f} ({ptq_seconds:.0f} s)", flush=True)

    optimizer = torch.optim.Adam(lora_parameters(student), lr=args.lr)
    student.train()
    start = time.perf_counter()
    losses = []
    bar = tqdm(range(args.steps), desc="LoRA QAT", unit="step")
    for step in bar:
        ids = windows[step % len(windows)]
        with torch.no_grad():
            target = teacher(ids).logits
        loss = kl_distillation_loss(student(ids).logits, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(kl=f"{np.mean(losses[-20:]):.4f}")
    train_seconds = time.perf_counter() - start
    student.eval()
    qat = perplexity(logits_of(student), evaluation, args.window)[0]
    folded_model = pc.strip(student)
    folded = perplexity(logits_of(folded_model), evaluation, args.window)[0]
    runtime = None
    if not args.no_onnx:
        from purecomp.transforms.weight_compression.export_onnx import export_compressed

        path = export_compressed(folded_model, Path(tempfile.mkdtemp(prefix="lora_qat_")) / "folded.onnx")
        runtime = perplexity(onnx_forward(path, args.threads), evaluation, args.window)[0]
    gap = ptq - fp32
    print(f"\nSmolLM2-135M-Instruct int4_sym g128 (adjust), PTQ {args.ptq}, LoRA rank {args.rank}, {args.steps} steps "
          f"of {args.seq_len} tokens, Adam {args.lr}, {args.threads} threads")
    print(f"distillation KL: first 20 steps {np.mean(losses[:20]):.4f}, last 20 steps {np.mean(losses[-20:]):.4f}")
    print("| model | perplexity | vs FP32 | share of the PTQ gap recovered |")
    print("|---|---|---|---|")
    for name, value in (("FP32", fp32), ("PTQ", ptq), ("LoRA QAT", qat), ("folded (INT4)", folded),
                        ("folded, ONNX Runtime", runtime)):
        if value is not None:
            print(f"| {name} | {value:.3f} | {100 * (value / fp32 - 1):+.2f}% | {100 * (ptq - value) / gap:.1f}% |")
    print(f"PTQ {ptq_seconds:.0f} s, QAT {train_seconds:.0f} s ({train_seconds / max(args.steps, 1):.2f} s/step)")


if __name__ == "__main__":
    main()
