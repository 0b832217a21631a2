"""AutoQ mixed precision (bits 2/4/8 at a model-size ratio) on the digits CNN, against HAWQ at a
comparable size, then quantization-aware fine-tuning of both plans.

    python examples/autoq_digits.py [--dataset digits|mnist] [--epochs 30] [--finetune-epochs 8]
        [--ratio 0.15] [--bits 2 4 8] [--episodes 200] [--warmup 20] [--eval-subset 1.0]
        [--plot PNG] [--plan JSON]

Trains the FP32 baseline; AutoQ scores each policy by the top-1 accuracy of the quantized (not yet
fine-tuned) model on the last 20% of the training images (never the test set) and keeps the best
plan whose weights take at most ``--ratio`` of their FP32 size. HAWQ (same bits) is run at bit-
complexity targets 1.5, 2, 2.5, ... until its plan is no larger than ``--ratio`` too. Each plan,
and uniform INT8, is fine-tuned with QAT; the table gives size ratio, HAWQ's complexity ratio
and test accuracy before and after fine-tuning.
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
from pathlib import Path

import torch
from sparsity_digits import finetune
from torch import nn
from torch.utils.data import TensorDataset

import purecomp as pc
from purecomp.scopes import select_sites
from purecomp.transforms.mixed_precision import CostModel, autoq_precision, hawq_precision
from purecomp.transforms.quantize.placement import activation_targets, weight_targets

from common import Baseline, accuracy, loader, train_baseline

WEIGHTS = dict(mode="symmetric", per_channel=True)
ACTIVATIONS = dict(mode="asymmetric")
RANGE = pc.RangeInit(num_init_samples=512)


def evaluate(model, method, params, state, test) -> float:
    return accuracy(lambda x: pc.apply(model, method, params, state, x), test)


def ratios(graph: pc.ModelGraph, params: dict, plan: dict[str, int] | None) -> tuple[float, float]:
    """(size ratio against FP32, bit-complexity ratio against INT8) of ``plan`` (``None``: INT8)."""
    allowed = select_sites(graph, (), None, "")
    w_t = weight_targets(graph, allowed)
    a_t = activation_targets(graph, allowed, quantize_inputs=True, quantize_outputs=False)
    plan = plan or {**{t.param: 8 for t in w_t}, **{t.key: 8 for t in a_t}}
    sizes = {t.param: params[t.param].numel() for t in w_t}
    size = sum(n * plan[w] for w, n in sizes.items()) / (32 * sum(sizes.values()))
    cost = CostModel.build(graph, w_t, a_t)
    complexity = cost.complexity({w: plan[w] for w in sizes}, {k: plan[k] for k in cost.activation_consumers})
    return size, cost.reference() / complexity


def autoq_plan(base: Baseline, ratio: float = 0.15, bits=(2, 4, 8), episodes: int = 200, warmup: int = 20,
               eval_subset: float = 1.0, seed: int = 0):
    """AutoQ on the FP32 model: each policy scored by the top-1 accuracy of the quantized model on the
    last 20% of the training images, the best plan with weights at most ``ratio`` of their FP32
    size; the report."""
    x, y = base.train_set.tensors
    held = len(y) // 5
    search_data = loader(TensorDataset(x[-held:], y[-held:]), 256, False)
    params = dict(base.model.named_parameters()) | {k: v.clone() for k, v in base.model.named_buffers()}
    graph = pc.trace(base.model, (x[:2],))
    base.train.generator.manual_seed(seed)
    return autoq_precision(graph, params, base.train, accuracy, search_data, weights=WEIGHTS,
                           activations=ACTIVATIONS, range_init=RANGE, bits=list(bits),
                           compression_ratio=ratio, iter_number=episodes,
                           warmup_iter_number=warmup, eval_subset_ratio=eval_subset, seed=seed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dataset", default="digits", choices=["digits", "mnist"])
    ap.add_argument("--epochs", type=int, default=30, help="FP32 training epochs")
    ap.add_argument("--finetune-epochs", type=int, default=8)
    ap.add_argument("--ratio", type=float, default=0.15, help="target weight size relative to FP32")
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--episodes", type=int, default=200, help="AutoQ iter_number")
    ap.add_argument("--warmup", type=int, default=20, help="AutoQ warmup_iter_number")
    ap.add_argument("--eval-subset", type=float, default=1.0, help="AutoQ eval_subset_ratio")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", type=Path, default=None, help="write the AutoQ reward/ratio figure here (PNG)")
    ap.add_argument("--plan", type=Path, default=None, help="write the AutoQ report here (JSON)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    started = time.perf_counter()
    base = train_baseline(args.dataset, args.epochs, args.seed)
    x, y = base.train_set.tensors
    held = len(y) // 5
    params = dict(base.model.named_parameters()) | {k: v.clone() for k, v in base.model.named_buffers()}
    graph = pc.trace(base.model, (x[:2],))
    t0 = time.perf_counter()
    report = autoq_plan(base, args.ratio, args.bits, args.episodes, args.warmup, args.eval_subset, args.seed)
    autoq_time = time.perf_counter() - t0
    if args.plot:
        report.plot(args.plot, title=f"AutoQ on the digits CNN ({args.dataset})")
    if args.plan:
        report.save(args.plan)

    t0 = time.perf_counter()
    for target in (1.5, 2.0, 2.5, 3.0, 3.5, 4.0):
        base.train.generator.manual_seed(args.seed)
        hawq = hawq_precision(graph, params, base.train, nn.functional.cross_entropy, weights=WEIGHTS,
                              bits=args.bits, compression_ratio=target, num_data_points=256, seed=args.seed)
        if ratios(graph, params, hawq.plan)[0] <= args.ratio + 1e-9:
            break
    hawq_time = time.perf_counter() - t0

    runs = {"INT8 QAT": None, "AutoQ QAT": report.plan, f"HAWQ@{target:g} QAT": hawq.plan}
    rows = []
    for name, plan in runs.items():
        model = copy.deepcopy(base.model)
        base.train.generator.manual_seed(args.seed)  # same calibration and batches for every plan
        method = pc.quantization(weights=WEIGHTS, activations=ACTIVATIONS, precision=plan, range_init=RANGE)
        state0 = method.init(graph, params, base.train)
        before = evaluate(base.model, method, params, state0, base.test)
        torch.manual_seed(args.seed)
        _, params_q, state = finetune(model, method, base.train, args.finetune_epochs, 3e-4, 0.0, 0.0, name,
                                      cosine=True)
        after = evaluate(model, method, params_q, state, base.test)
        bits = "/".join(str(state.weights[w].bits) for w in state.weights)
        rows.append((name, bits, *ratios(graph, params, plan), before, after))

    print(f"dataset: {args.dataset} ({len(base.train_set)} train / {len(base.test_set)} test images); "
          f"AutoQ scores on {held} training images")
    print(f"AutoQ: {args.episodes} episodes in {autoq_time:.0f} s, INT8 score {report.baseline:.2f}, best "
          f"{report.score:.2f} at episode {report.best_episode}; HAWQ searches {hawq_time:.0f} s")
    header = f"{'model':<16}{'weight bits':>13}{'size':>8}{'BitOps':>8}{'PTQ %':>8}{'QAT %':>8}{'drop':>7}"
    print(header)
    print("-" * len(header))
    print(f"{'FP32':<16}{'32':>13}{1.0:>8.3f}{'-':>8}{'-':>8}{base.accuracy:>8.2f}{0.0:>7.2f}")
    for name, bits, size, bitops, before, after in rows:
        print(f"{name:<16}{bits:>13}{size:>8.4f}{bitops:>8.3f}{before:>8.2f}{after:>8.2f}{base.accuracy - after:>7.2f}")
    print(f"time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
