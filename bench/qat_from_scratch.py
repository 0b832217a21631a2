"""QAT from random initialisation: FP32 vs INT8 QAT on torchvision models, same weights and batches.

    python bench/qat_from_scratch.py [--steps 50] [--batch 16] [--lr 0.01]
        [--models mobilenet_v2,efficientnet_b0,mobilenet_v3_small] [--calibration-modes eval,train]

For each model (torchvision, ``weights=None``, ``num_classes=10``), built once from a fixed seed,
copies train for ``--steps`` SGD steps (lr 0.01, momentum 0.9, batch 16) on the same batches of the
digits data (scikit-learn's 8x8 digits, bilinearly upsampled to 3x32x32): one in FP32, one under
``pc.quantization()`` with its defaults per calibration mode (functional API: ``trace``, ``init`` on 256 calibration
samples, ``apply``; the quantizer ranges train with the weights). Printed per model and run:

- **loss first / last**: mean training loss of the first 5 and the last 5 steps;
- **max grad**: the largest ``|grad|`` of any model parameter over all steps;
- **ratio**: QAT's max grad over FP32's.

``--calibration-modes`` lists how range init runs the model (``purecomp.calibration``): ``train``
(BatchNorm normalizes with each batch's statistics, as in training; what the library's default
``auto`` picks for these freshly built, train-mode models), ``eval`` (running statistics: the only
behaviour before the fix) or ``default`` (no argument). The graph is traced with the model in
train mode, as a freshly built model is. A benchmark: it
prints, it asserts nothing.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import math
import time

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import purecomp as pc

MODELS = ("mobilenet_v2", "efficientnet_b0", "mobilenet_v3_small")
# --logarithm-scale: the arguments of pc.quantization for each choice
LOGARITHM_SCALE = {
    "default": {},
    "off": {"weights": {"logarithm_scale": False}, "activations": {"logarithm_scale": False}},
    "weights": {"weights": {"logarithm_scale": True}, "activations": {"logarithm_scale": False}},
    "both": {"weights": {"logarithm_scale": True}, "activations": {"logarithm_scale": True}},
}


def digits_batches(steps: int, batch: int, seed: int, size: int = 32) -> tuple[list, list]:
    """``steps`` training batches (shuffled with ``seed``) and 8 calibration batches, 3 x size x size."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = ((x - 0.5) / 0.5).repeat(1, 3, 1, 1)
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(len(y), generator=g) for _ in range(math.ceil(steps * batch / len(y)) + 1)])
    train = [(x[order[i * batch:(i + 1) * batch]], y[order[i * batch:(i + 1) * batch]]) for i in range(steps)]
    calib = [(x[order[-(i + 1) * batch:len(order) - i * batch]], y[0]) for i in range(8)]
    return train, calib


def train(forward, params: list, model_params: list, batches: list, lr: float) -> tuple[list[float], float]:
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    losses, max_grad = [], 0.0
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(forward(x), y)
        loss.backward()
        max_grad = max([max_grad] + [float(p.grad.abs().max()) for p in model_params if p.grad is not None])
        opt.step()
        losses.append(loss.item())
    return losses, max_grad


def qat(base: nn.Module, batches: list, calib: list, lr: float, seed: int, mode: str | None,
        logarithm_scale: str = "default") -> dict:
    """QAT of a copy of ``base``; the graph traced in train mode. When eval-mode calibration cannot
    initialize it (sites that only train mode runs, e.g. stochastic depth, see no values), the
    error is noted and the graph is traced in eval mode instead."""
    note = ""
    for trace_mode in ("train", "eval"):
        model = copy.deepcopy(base).train(trace_mode == "train")
        t0 = time.perf_counter()
        graph = pc.trace(model, (batches[0][0][:2],))
        method = pc.quantization(**LOGARITHM_SCALE[logarithm_scale])
        params = dict(model.named_parameters()) | dict(model.named_buffers())
        try:
            if mode is None:
                state = method.init(graph, params, calib)
            else:
                state = method.init(graph, params, calib, calibration_mode=mode)
            break
        except pc.errors.PurecompError as e:
            note = f"traced in train mode, init failed ({type(e).__name__}: {e}); traced in eval mode"
    model.train()
    torch.manual_seed(seed + 1)
    losses, grad = train(lambda x: pc.apply(model, method, params, state, x),
                         list(model.parameters()) + pc.trainable(state), list(model.parameters()), batches, lr)
    return {"losses": losses, "grad": grad, "s": time.perf_counter() - t0, "note": note}


def run_model(name: str, steps: int, batch: int, lr: float, seed: int, modes: list,
              logarithm_scale: str = "default") -> dict:
    torch.manual_seed(seed)
    base = getattr(torchvision.models, name)(weights=None, num_classes=10)
    batches, calib = digits_batches(steps, batch, seed)
    fp32 = copy.deepcopy(base).train()
    t0 = time.perf_counter()
    torch.manual_seed(seed + 1)  # dropout / stochastic depth draw the same masks in every run
    losses, grad = train(fp32, list(fp32.parameters()), list(fp32.parameters()), batches, lr)
    out = {"fp32": {"losses": losses, "grad": grad, "s": time.perf_counter() - t0, "note": ""}}
    for mode in modes:
        out[mode] = qat(base, batches, calib, lr, seed, mode, logarithm_scale)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--calibration-modes", default="eval,train",
                    help="comma-separated InitContext.calibration_mode values to run QAT with "
                         "('default': the library's default, for a purecomp without the option)")
    ap.add_argument("--logarithm-scale", choices=sorted(LOGARITHM_SCALE), default="default",
                    help="which quantizers train log(scale) / log(input_range) (NNCF's logarithm_scale) instead "
                         "of the range: 'default' passes nothing (the library decides), 'off' / 'weights' / "
                         "'both' set it explicitly")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    modes = [None if m == "default" else m for m in args.calibration_modes.split(",")]
    if any(modes) and "calibration_mode" not in inspect.signature(pc.Compression.init).parameters:
        ap.error("this purecomp has no calibration_mode (range init always calibrates in eval mode); use 'default'")
    print(f"{args.steps} SGD steps (lr {args.lr}, momentum 0.9), batch {args.batch}, digits 3x32x32, "
          f"torch threads {torch.get_num_threads()}, logarithm_scale {args.logarithm_scale}")
    print("| model | run | loss first / last | max grad | ratio to FP32 | s |")
    print("|---|---|---|---|---|---|")
    notes = []
    for name in args.models.split(","):
        r = run_model(name, args.steps, args.batch, args.lr, args.seed, modes, args.logarithm_scale)
        fp32_grad = r["fp32"]["grad"]
        for key, label in [("fp32", "FP32")] + [(m, f"INT8 QAT, calibrated in {m or 'default'} mode") for m in modes]:
            x = r[key]
            ls = x["losses"]
            print(f"| {name} | {label} | {sum(ls[:5]) / 5:.3f} / {sum(ls[-5:]) / 5:.3f} | {x['grad']:.3g} | "
                  f"{x['grad'] / fp32_grad:.3g} | {x['s']:.0f} |", flush=True)
            if x["note"]:
                notes.append(f"{name}, {label}: {x['note']}")
    for n in notes:
        print("note:", n)


if __name__ == "__main__":
    main()
