"""One training step (forward, backward, SGD) FP32 vs purecomp INT8 QAT, alternated in one process.

    python bench/qat_step.py [--models resnet18 mobilenet_v2] [--repeats 15] [--threads 2] [--device cpu|cuda]

Prints the median step time of each and the ratio QAT / FP32 (target <= 1.3).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision
from torch import nn

import purecomp as pc
import purecomp.ops as ops


def fp32_step(model, x, y):
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def qat_step(model, x, y):
    graph = pc.trace(model, (x,))
    method = pc.quantization(weights=dict(per_channel=True), activations=dict(mode="symmetric"))
    params = dict(model.named_parameters())
    state = method.init(graph, params, [x])
    opt = torch.optim.SGD(list(params.values()) + pc.trainable(state), lr=1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(pc.apply(model, method, params, state, x), y).backward()
        opt.step()

    return step, state


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name: str, repeats: int, batch: int, device: torch.device) -> tuple[float, float, str]:
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 64, 64, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    model_a = getattr(torchvision.models, name)(weights=None, num_classes=10).train().to(device)
    model_b = getattr(torchvision.models, name)(weights=None, num_classes=10).train().to(device)
    model_b.load_state_dict(model_a.state_dict())
    a = fp32_step(model_a, x, y)
    b, state = qat_step(model_b, x, y)
    with ops.record_paths() as paths:
        b()
    path = ",".join(sorted(set(paths)))
    for _ in range(3):  # warm-up
        a()
        b()
    times_a, times_b = [], []
    for _ in range(repeats):
        for fn, sink in ((a, times_a), (b, times_b)):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            sink.append(time.perf_counter() - start)
    return statistics.median(times_a), statistics.median(times_b), path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, device {device}, batch {args.batch}x3x64x64, "
          f"median of {args.repeats}")
    print(f"{'model':<16}{'FP32 ms':>10}{'QAT ms':>10}{'QAT/FP32':>10}  op path")
    for name in args.models:
        fp32, qat, path = measure(name, args.repeats, args.batch, device)
        print(f"{name:<16}{fp32 * 1e3:>10.1f}{qat * 1e3:>10.1f}{qat / fp32:>10.2f}  {path}")


if __name__ == "__main__":
    main()
