"""Binarization with the staged recipe: FP32 vs XNOR vs DoReFa on the digits CNN or a ResNet-18-style net.

    python examples/binarization_digits.py [--dataset digits|mnist] [--arch digits_cnn|resnet18]
        [--epochs 30] [--finetune-epochs 16] [--modes xnor dorefa] [--no-kd]

The FP32 network is trained first (stage 1 of the paper). Fine-tuning then follows the staged
schedule, scaled to ``--finetune-epochs`` E: activations binarized from epoch 0, weights from
E/4, learning rate dropped polynomially to zero from E/2, weight decay off from E/2 (Adam,
NNCF's base_lr 1e-3 and base_wd 1e-5). The first conv, the linear classifier and the downsample
convs stay in float. With ``--kd`` (default) the FP32 network is the teacher, as in NNCF's
staged sample. Each binarized network is exported to ONNX and evaluated in onnxruntime.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

import purecomp as pc
from purecomp import export

from common import Baseline, accuracy, onnx_accuracy, train_baseline

IGNORED = {
    "digits_cnn": ["0"],
    "resnet18": ["conv1", "layer2.0.downsample", "layer3.0.downsample", "layer4.0.downsample"],
}


def kd_loss(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """Cross-entropy against the teacher's softened distribution, scaled by ``T^2``."""
    t = temperature
    soft = nn.functional.softmax(teacher / t, dim=1)
    return -(nn.functional.log_softmax(student / t, dim=1) * soft).sum(1).mean() * t * t


def staged_finetune(model, teacher, method, schedule, train, epochs, use_kd):
    """Fine-tune with ``method``; ``schedule`` sets the optimizer's lr / weight decay every step."""
    example = next(iter(train))[0][:2]
    graph = pc.trace(model, (example,))
    params = dict(model.named_parameters()) | {k: v.clone() for k, v in model.named_buffers()}
    state = method.init(graph, params, train)
    trainable = [p for p in params.values() if p.requires_grad] + pc.trainable(state)
    opt = torch.optim.Adam(trainable, lr=schedule.base_lr, weight_decay=schedule.base_wd)
    loss_fn = nn.CrossEntropyLoss()
    step = 0
    for epoch in tqdm(range(epochs), desc=f"binarization ({method.name})", leave=False, disable=None):
        model.train()
        for x, y in train:
            progress = pc.Progress(step=step, epoch=epoch, steps_per_epoch=len(train))
            state = method.step(state, progress, params)
            pc.apply_to_optimizer(opt, schedule.stage(progress.fractional_epoch))
            logits = pc.apply(model, method, params, state, x)
            loss = loss_fn(logits, y)
            if use_kd:
                with torch.no_grad():
                    target = teacher(x)
                loss = loss + kd_loss(logits, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    model.eval()
    return graph, params, state


def staged_schedule(epochs: int) -> pc.StagedSchedule:
    """The staged recipe scaled to ``epochs`` E: binary activations from 0, weights from E/4, lr
    dropped polynomially to zero from E/2, weight decay off from E/2."""
    e = epochs
    return pc.StagedSchedule(
        activations_quant_start_epoch=0, weights_quant_start_epoch=e // 4, lr_poly_drop_start_epoch=e // 2,
        lr_poly_drop_duration_epochs=e - e // 2, disable_wd_start_epoch=e // 2,
    )


def binarize(
    baseline: Baseline, mode: str, epochs: int, use_kd: bool = True, arch: str = "digits_cnn", seed: int = 0
) -> tuple[nn.Module, pc.Compression, pc.ModelGraph, dict, object]:
    """Binarize a copy of ``baseline.model`` (``mode`` xnor|dorefa, ``IGNORED[arch]`` kept float)
    with the staged fine-tuning, the FP32 model as teacher when ``use_kd``:
    ``(model, method, graph, params, state)``."""
    schedule = staged_schedule(epochs)
    torch.manual_seed(seed)
    model = copy.deepcopy(baseline.model)
    method = pc.binarization(mode, schedule=schedule, ignored_scopes=IGNORED[arch])
    graph, params, state = staged_finetune(model, baseline.model.eval(), method, schedule, baseline.train, epochs, use_kd)
    return model, method, graph, params, state


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dataset", default="digits", choices=["digits", "mnist"])
    ap.add_argument("--arch", default="digits_cnn", choices=sorted(IGNORED))
    ap.add_argument("--epochs", type=int, default=30, help="FP32 training epochs")
    ap.add_argument("--finetune-epochs", type=int, default=16)
    ap.add_argument("--modes", nargs="+", default=["xnor", "dorefa"], choices=["xnor", "dorefa"])
    ap.add_argument("--kd", action=argparse.BooleanOptionalAction, default=True, help="distil from the FP32 net")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    started = time.perf_counter()
    baseline = train_baseline(args.dataset, args.epochs, args.seed, args.arch)
    e = args.finetune_epochs
    example = baseline.train_set.tensors[0][:2]
    out_dir = Path(tempfile.mkdtemp(prefix="purecomp-binarization-"))
    rows = []
    for mode in args.modes:
        model, method, graph, params, state = binarize(baseline, mode, e, args.kd, args.arch, args.seed)
        acc = accuracy(lambda x, m=method, p=params, s=state, mod=model: pc.apply(mod, m, p, s, x), baseline.test)
        path = export.to_onnx(model, method, params, state, (example,), out_dir / f"{args.arch}_{mode}.onnx")
        rows.append((mode, acc, onnx_accuracy(path, baseline.test), path.stat().st_size / 1024))
        if mode == args.modes[0]:
            print(pc.statistics(graph, state)["binarization"])
            print()
    print(f"dataset: {args.dataset} ({len(baseline.train_set)} train / {len(baseline.test_set)} test images); "
          f"arch {args.arch}; FP32 {args.epochs} epochs, staged fine-tuning {e} epochs; kd={args.kd}")
    print(f"{'model':<22}{'PyTorch %':>10}{'ORT %':>8}{'drop':>7}{'ONNX KiB':>10}")
    print(f"{'FP32':<22}{baseline.accuracy:>10.2f}{'':>8}{0:>7.2f}{'':>10}")
    for mode, acc, ort_acc, kib in rows:
        label = f"{mode.upper()} + binary act."
        print(f"{label:<22}{acc:>10.2f}{ort_acc:>8.2f}{baseline.accuracy - acc:>7.2f}{kib:>10.1f}")
    print(f"time {time.perf_counter() - started:.0f} s; ONNX files in {out_dir}")


if __name__ == "__main__":
    main()
