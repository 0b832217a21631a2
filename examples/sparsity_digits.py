"""INT8 + 50% sparsity (magnitude and RB) on the digits CNN, stacked with QAT in one fine-tuning.

    python examples/sparsity_digits.py [--dataset digits|mnist] [--epochs 30] [--finetune-epochs 12]

Prints FP32, INT8 + 50% magnitude sparsity and INT8 + 50% RB sparsity accuracy, the sparsity
reached, and whether the exported ONNX weights contain the zeros.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import onnx
import torch
from torch import nn
from tqdm.auto import tqdm

import purecomp as pc
from purecomp import export

from common import accuracy, onnx_accuracy, train_baseline


def finetune(
    model, method, train, epochs, lr, logits_lr, loss_weight, desc, cosine=False, on_epoch=None
):
    """Fine-tune ``model`` with ``method``: weights and quantizer ranges with Adam at ``lr``
    (constant, or decayed to zero over the run with ``cosine``); RB
    logits with SGD (momentum 0.9) at ``logits_lr``. SGD keeps the density loss's per-logit
    weighting (Adam would move every logit at the same pace). The RB loss is a mean over all
    gated weights, so it needs a weight in the thousands for a model of ~24k weights. The
    state steps after every optimizer step (the schedule reads the fractional epoch).
    ``on_epoch(epoch, params, state)`` runs after each epoch, with the model in eval mode."""
    example = next(iter(train))[0][:2]
    graph = pc.trace(model, (example,))
    params = dict(model.named_parameters()) | {k: v.clone() for k, v in model.named_buffers()}
    state = method.init(graph, params, train)
    params = pc.adapt_batchnorm(model, method, params, state, train, num_samples=512)
    members = state if isinstance(state, tuple) else (state,)  # a chain's state is a tuple
    logits = [
        t
        for s in members
        if isinstance(s, pc.transforms.sparsity.RBSparsityState)
        for t in s.logits.values()
    ]
    others = [t for t in pc.trainable(state) if all(t is not g for g in logits)]
    groups = [{"params": [p for p in params.values() if p.requires_grad] + others, "lr": lr}]
    if logits:
        groups.append({"params": logits, "lr": logits_lr})
    optimizers = [torch.optim.Adam(groups[:1])]
    if logits:
        optimizers.append(torch.optim.SGD(groups[1:], momentum=0.9))
    decay = (
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizers[0], T_max=max(1, epochs * len(train)))
        if cosine
        else None
    )
    loss_fn = nn.CrossEntropyLoss()
    step = 0
    for epoch in tqdm(range(epochs), desc=desc, leave=False, disable=None):
        model.train()
        for x, y in train:
            loss = loss_fn(
                pc.apply(model, method, params, state, x), y
            ) + loss_weight * method.loss(params, state)
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            for opt in optimizers:
                opt.step()
            if decay is not None:
                decay.step()
            step += 1
            state = method.step(
                state, pc.Progress(step=step, epoch=epoch, steps_per_epoch=len(train)), params
            )
        state = method.step(
            state, pc.Progress(step=step, epoch=epoch + 1, steps_per_epoch=len(train)), params
        )
        if on_epoch is not None:
            model.eval()
            on_epoch(epoch + 1, params, state)
    model.eval()
    return graph, params, state


def onnx_zero_fraction(path: Path) -> float:
    weights = [
        onnx.numpy_helper.to_array(i)
        for i in onnx.load(str(path)).graph.initializer
        if len(i.dims) >= 2
    ]
    total = sum(w.size for w in weights)
    return sum(int((w == 0).sum()) for w in weights) / max(1, total)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dataset", default="digits", choices=["digits", "mnist"])
    ap.add_argument("--epochs", type=int, default=30, help="FP32 training epochs")
    ap.add_argument("--finetune-epochs", type=int, default=24)
    ap.add_argument("--target", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    started = time.perf_counter()
    baseline = train_baseline(args.dataset, args.epochs, args.seed)
    train_set, test_set, train, test, base, fp32 = baseline.parts()

    target_epoch = max(
        1, args.finetune_epochs // 3
    )  # level ramps up for a third, masks freeze at half
    freeze_epoch = max(target_epoch, args.finetune_epochs // 2)
    quant = dict(
        weights=dict(mode="symmetric", per_channel=True),
        activations=dict(mode="asymmetric"),
        range_init=pc.RangeInit(num_init_samples=512),
    )
    schedule = pc.schedules.polynomial(
        0.0, args.target, target_epoch, power=3, update_per_optimizer_step=True
    )
    runs = {
        f"INT8 + {args.target:.0%} magnitude": (
            pc.magnitude_sparsity(schedule, freeze_epoch=freeze_epoch),
            0.0,
            0.0,
        ),
        f"INT8 + {args.target:.0%} RB": (
            pc.rb_sparsity(schedule, seed=args.seed, freeze_epoch=freeze_epoch),
            1.0,
            5e3,
        ),
    }
    out_dir = Path(tempfile.mkdtemp(prefix="purecomp-sparsity-"))
    rows = [("FP32", fp32, 0.0, float("nan"), float("nan"))]
    for name, (sparsity, logits_lr, loss_weight) in runs.items():
        model = copy.deepcopy(base)
        method = pc.chain(sparsity, pc.quantization(**quant))
        graph, params, state = finetune(
            model, method, train, args.finetune_epochs, 3e-4, logits_lr, loss_weight, name
        )
        acc = accuracy(
            lambda x, m=model, me=method, p=params, s=state: pc.apply(m, me, p, s, x), test
        )
        level = pc.statistics(graph, state)["sparsity"].rows[-1]["sparsity"]
        path = export.to_onnx(
            model,
            method,
            params,
            state,
            (train_set.tensors[0][:2],),
            out_dir / f"{name.split()[-1]}.onnx",
        )
        rows.append((name, acc, level, onnx_accuracy(path, test), onnx_zero_fraction(path)))

    print(f"dataset: {args.dataset} ({len(train_set)} train / {len(test_set)} test images)")
    header = f"{'model':<28}{'accuracy %':>11}{'drop':>7}{'sparsity':>10}{'ONNX acc %':>12}{'ONNX zeros':>12}"
    print(header)
    print("-" * len(header))
    for name, acc, level, onnx_acc, zeros in rows:
        print(
            f"{name:<28}{acc:>11.2f}{fp32 - acc:>7.2f}{level:>10.3f}{onnx_acc:>12.2f}{zeros:>12.3f}".replace(
                "nan", "  -"
            )
        )
    print(f"time {time.perf_counter() - started:.0f} s; ONNX files in {out_dir}")


if __name__ == "__main__":
    main()
