"""HAWQ mixed precision (INT4/INT8) on the digits CNN, then quantization-aware fine-tuning.

    python examples/mixed_precision_digits.py [--dataset digits|mnist] [--epochs 30] [--finetune-epochs 8]
        [--ratio 1.5] [--bits 4 8] [--points 256] [--probes 200] [--plot PNG] [--plan JSON]

Trains the FP32 baseline, estimates the Hessian trace of every weight on ``--points`` training
samples, picks the bits with HAWQ at compression ratio ``--ratio`` (bit complexity of all-INT8
over that of the plan), fine-tunes with the plan (and, for reference, with uniform INT8), and
prints accuracy, drop against FP32 and the ratio. ``--plot`` writes the traces/bits figure,
``--plan`` the plan as JSON.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from sparsity_digits import finetune
from torch import nn

import purecomp as pc
from purecomp.transforms.mixed_precision import hawq_precision

from common import Baseline, accuracy, train_baseline

WEIGHTS = dict(mode="symmetric", per_channel=True)
ACTIVATIONS = dict(mode="asymmetric")


def evaluate(model, method, params, state, test) -> float:
    return accuracy(lambda x: pc.apply(model, method, params, state, x), test)


def hawq_plan(base: Baseline, ratio: float, bits=(4, 8), points: int = 256, probes: int = 200, seed: int = 0):
    """HAWQ on the FP32 model: Hutchinson Hessian traces on ``points`` training samples (at most
    ``probes`` probes), the plan of ``bits`` at bit-complexity ratio ``ratio``; the report."""
    params = dict(base.model.named_parameters()) | {k: v.clone() for k, v in base.model.named_buffers()}
    graph = pc.trace(base.model, (base.train_set.tensors[0][:2],))
    return hawq_precision(graph, params, base.train, nn.functional.cross_entropy, weights=WEIGHTS,
                          bits=list(bits), compression_ratio=ratio, num_data_points=points,
                          iter_number=probes, seed=seed)


def plan_qat(base: Baseline, plan: dict[str, int] | None, epochs: int, seed: int = 0, desc: str = "QAT"):
    """QAT of a copy of ``base.model`` with the precision ``plan`` (``None``: INT8), Adam 3e-4 with
    cosine decay: ``(model, method, graph, params, state)``."""
    model = copy.deepcopy(base.model)
    method = pc.quantization(weights=WEIGHTS, activations=ACTIVATIONS, precision=plan,
                             range_init=pc.RangeInit(num_init_samples=512))
    torch.manual_seed(seed)
    graph, params, state = finetune(model, method, base.train, epochs, 3e-4, 0.0, 0.0, desc, cosine=True)
    return model, method, graph, params, state


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dataset", default="digits", choices=["digits", "mnist"])
    ap.add_argument("--epochs", type=int, default=30, help="FP32 training epochs")
    ap.add_argument("--finetune-epochs", type=int, default=8)
    ap.add_argument("--ratio", type=float, default=1.5, help="target compression ratio")
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--points", type=int, default=256, help="samples for the Hessian traces")
    ap.add_argument("--probes", type=int, default=200, help="Hutchinson probes at most (iter_number)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", type=Path, default=None, help="write the traces / bits figure here (PNG)")
    ap.add_argument("--plan", type=Path, default=None, help="write the precision report here (JSON)")
    args = ap.parse_args()
    started = time.perf_counter()
    base = train_baseline(args.dataset, args.epochs, args.seed)

    t0 = time.perf_counter()
    report = hawq_plan(base, args.ratio, args.bits, args.points, args.probes, args.seed)
    hawq_time = time.perf_counter() - t0
    if args.plot:
        report.plot(args.plot, title=f"HAWQ on the digits CNN ({args.dataset})")
    if args.plan:
        report.save(args.plan)

    rows = [("FP32", "32", 0.0, base.accuracy)]
    runs = {
        "INT8 QAT": (None, 1.0),
        f"HAWQ {'/'.join(map(str, args.bits))} QAT": (report.plan, report.ratio),
    }
    for name, (plan, ratio) in runs.items():
        model, method, _, params_q, state = plan_qat(base, plan, args.finetune_epochs, args.seed, name)
        bits = "/".join(str(state.weights[w].bits) for w in state.weights)
        rows.append((name, bits, ratio, evaluate(model, method, params_q, state, base.test)))

    print(f"dataset: {args.dataset} ({len(base.train_set)} train / {len(base.test_set)} test images)")
    print(f"HAWQ: {report.probes} probes on {report.num_data_points} samples in {hawq_time:.1f} s; "
          f"average Hessian traces: " + ", ".join(f"{k} {v:.3g}" for k, v in report.traces.items()))
    header = f"{'model':<18}{'weight bits':>14}{'ratio':>8}{'accuracy %':>12}{'drop':>7}"
    print(header)
    print("-" * len(header))
    for name, bits, ratio, acc in rows:
        shown = "-" if name == "FP32" else f"{ratio:.3f}"
        print(f"{name:<18}{bits:>14}{shown:>8}{acc:>12.2f}{base.accuracy - acc:>7.2f}")
    print(f"time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
