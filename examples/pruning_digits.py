"""30% filter pruning + fine-tuning on the digits CNN: accuracy, parameters, FLOPs, ONNX.

    python examples/pruning_digits.py [--dataset digits|mnist] [--epochs 30] [--finetune-epochs 12] [--level 0.3]

The level ramps up with the exponential schedule over the first third of the fine-tuning,
the pruned channels freeze at half, then the pruned network is materialized (channels
removed for real) and exported to ONNX. The fine-tuning learning rate decays to zero (cosine)
by default: at a constant Adam rate the eval accuracy of this small BatchNorm network swings by
several points from epoch to epoch even without pruning, so the last epoch is a lottery.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

from sparsity_digits import finetune
from torch import nn

import purecomp as pc
from purecomp import export

from common import Baseline, accuracy, onnx_accuracy, train_baseline


def prune(
    base: Baseline,
    epochs: int,
    level: float = 0.3,
    criterion: str = "geometric_median",
    lr: float = 1e-3,
    cosine: bool = True,
    per_epoch: bool = False,
) -> tuple[nn.Module, pc.Compression, pc.ModelGraph, dict, object]:
    """Filter pruning of a copy of ``base.model`` at ``level`` with fine-tuning: the level ramps up
    (exponential schedule) over a third of ``epochs`` (at least 2), the pruned channels freeze at
    half. Returns ``(model, method, graph, params, state)``; ``per_epoch`` prints test accuracy."""
    ramp = max(2, epochs // 3)
    schedule = pc.schedules.pruning_exponential(0.0, level, num_init_steps=0, pruning_steps=ramp)
    method = pc.filter_pruning(schedule, criterion=criterion, freeze_epoch=max(ramp, epochs // 2))
    model = copy.deepcopy(base.model)

    def report(epoch, params, state):
        acc = accuracy(lambda x: pc.apply(model, method, params, state, x), base.test)
        print(
            f"epoch {epoch:3d}  level {state.level:.3f}  pruned channels {len(state.pruned_classes()):3d}  "
            f"test accuracy {acc:.2f}",
            flush=True,
        )

    graph, params, state = finetune(
        model, method, base.train, epochs, lr, 0.0, 0.0, "pruning", cosine=cosine,
        on_epoch=report if per_epoch else None,
    )
    return model, method, graph, params, state


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dataset", default="digits", choices=["digits", "mnist"])
    ap.add_argument("--epochs", type=int, default=30, help="FP32 training epochs")
    ap.add_argument("--finetune-epochs", type=int, default=12)
    ap.add_argument(
        "--level", type=float, default=0.3, help="fraction of prunable channels to remove"
    )
    ap.add_argument(
        "--criterion", default="geometric_median", choices=["L1", "L2", "geometric_median"]
    )
    ap.add_argument("--finetune-lr", type=float, default=1e-3)
    ap.add_argument("--finetune-lr-schedule", default="cosine", choices=["cosine", "constant"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--per-epoch",
        action="store_true",
        help="print the masked model's test accuracy after each epoch",
    )
    args = ap.parse_args()
    started = time.perf_counter()
    baseline = train_baseline(args.dataset, args.epochs, args.seed)
    train_set, test_set, train, test, base, fp32 = baseline.parts()

    model, method, graph, params, state = prune(
        baseline, args.finetune_epochs, args.level, args.criterion, args.finetune_lr,
        cosine=args.finetune_lr_schedule == "cosine", per_epoch=args.per_epoch,
    )
    pruned_acc = accuracy(lambda x: pc.apply(model, method, params, state, x), test)
    example = train_set.tensors[0][:2]
    small = export.materialize(model, method, params, state, graph)
    small_acc = accuracy(small, test)
    out_dir = Path(tempfile.mkdtemp(prefix="purecomp-pruning-"))
    path = export.to_onnx(model, method, params, state, (example,), out_dir / "digits_pruned.onnx")

    table = pc.statistics(graph, state)["pruning"]
    print(table)
    print()
    cost = pc.pruning_cost(
        base, small, (example[:1],)
    )  # one image: FLOPs per sample, as in the table above
    print(cost)
    print()
    print(
        f"dataset: {args.dataset} ({len(train_set)} train / {len(test_set)} test images); {args.criterion}"
    )
    print(f"{'model':<34}{'accuracy %':>11}{'drop':>7}")
    print(f"{'FP32':<34}{fp32:>11.2f}{0:>7.2f}")
    print(
        f"{f'{args.level:.0%} pruned (masked, PyTorch)':<34}{pruned_acc:>11.2f}{fp32 - pruned_acc:>7.2f}"
    )
    print(f"{'pruned, materialized (PyTorch)':<34}{small_acc:>11.2f}{fp32 - small_acc:>7.2f}")
    onnx_acc = onnx_accuracy(path, test)
    print(f"{'pruned, ONNX Runtime':<34}{onnx_acc:>11.2f}{fp32 - onnx_acc:>7.2f}")
    everything = table.rows[-1]
    print(
        f"channels removed: params {everything['params after'] / everything['params before']:.2f}x, "
        f"FLOPs {everything['FLOPs after'] / everything['FLOPs before']:.2f}x"
    )
    print(f"time {time.perf_counter() - started:.0f} s; ONNX file {path}")


if __name__ == "__main__":
    main()
