"""Hutchinson Hessian traces of resnet18's weights: purecomp (vmap over a probe chunk of the
vjp of grad) vs a plain ``torch.autograd.grad`` double-backward loop, alternated in one process.

    python bench/hawq.py [--repeats 3] [--probes 10] [--points 32] [--batch 16] [--size 64] [--threads 2]
                         [--device cpu|cuda] [--mode reverse|forward] [--keep-graph]

Both compute the same estimate from the same Rademacher probes on the same data: ``--points``
samples taken from a loader of batch ``--batch`` and regrouped into one batch (for both). The
loop is the usual implementation (NNCF's): for each probe, forward, ``grad(create_graph=True)``,
then ``grad(g . v)``. ``--keep-graph`` also times a loop that builds the first-order graph once
per batch and reuses it for every probe (``retain_graph=True``). Prints medians and ratios
(target: purecomp at least 3x faster than the loop). ``--device cuda`` runs all of them on the
GPU (the probes are drawn there too, from a generator with the same seed for every method).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from purecomp.transforms.mixed_precision import (
    autograd_traces,
    collect_batches,
    hutchinson_traces,
    rademacher,
)
from purecomp.transforms.mixed_precision.traces import eval_mode


def kept_graph_traces(model, params, names, batches, criterion, probes):
    """The loop with the first-order graph built once per batch and reused for every probe."""
    count = len(next(iter(probes.values())))
    sums = dict.fromkeys(names, 0.0)
    with eval_mode(model):
        for b in batches:
            weights = {k: params[k].detach().requires_grad_(True) for k in names}
            frozen = {k: v.detach() for k, v in params.items() if k not in names}
            out = functional_call(model, {**frozen, **weights}, b.args, b.kwargs)
            grads = torch.autograd.grad(criterion(out, b.target), list(weights.values()), create_graph=True)
            for i in range(count):
                hv = torch.autograd.grad(grads, list(weights.values()), [probes[k][i] for k in names],
                                         retain_graph=i < count - 1)
                for k, h in zip(names, hv):
                    sums[k] += float((h * probes[k][i]).sum()) / len(batches)
    return {k: s / count for k, s in sums.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="untimed alternated rounds first")
    ap.add_argument("--probes", type=int, default=10)
    ap.add_argument("--points", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mode", default="reverse", choices=["reverse", "forward"])
    ap.add_argument("--keep-graph", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tf32", action="store_true", help="allow TF32 convolutions and matmuls on a GPU (default: off, "
                    "so that every method computes in float32 and the estimates agree to float tolerance)")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.allow_tf32 = args.tf32
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval().to(device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.points, 3, args.size, args.size, generator=g)
    y = torch.randint(0, 10, (args.points,), generator=g)
    loader = DataLoader(TensorDataset(x.to(device), y.to(device)), batch_size=args.batch)
    batches = collect_batches(loader, args.points)
    params = dict(model.named_parameters())
    names = [n for n, p in params.items() if p.dim() > 1]  # the 21 conv/linear weights
    criterion = nn.functional.cross_entropy
    seed = 0

    def ours():
        return hutchinson_traces(model, params, names, batches, criterion, iter_number=args.probes,
                                 chunk=args.probes, tolerance=0.0, seed=seed, mode=args.mode).traces

    def probes():
        return rademacher({n: params[n].shape for n in names}, args.probes,
                          torch.Generator(device=device).manual_seed(seed))

    runs = {"purecomp": ours, "autograd loop": lambda: autograd_traces(model, params, names, batches, criterion, probes())}
    if args.keep_graph:
        runs["loop, graph kept"] = lambda: kept_graph_traces(model, params, names, batches, criterion, probes())
    times: dict[str, list[float]] = {k: [] for k in runs}
    results = {}
    for round_ in range(args.warmup + args.repeats):
        for name, fn in runs.items():
            _sync(device)
            start = time.perf_counter()
            results[name] = fn()
            _sync(device)
            elapsed = time.perf_counter() - start
            if round_ >= args.warmup:
                times[name].append(elapsed)
            print(f"  {name}: {elapsed:.2f} s" + (" (warm-up)" if round_ < args.warmup else ""), flush=True)
    reference = results["purecomp"]
    for name, r in results.items():
        worst = max(abs(r[n] - reference[n]) / max(abs(reference[n]), 1e-12) for n in names)
        print(f"{name}: largest relative difference of a trace from purecomp's: {worst:.2e}")
    print(f"resnet18 {args.size}x{args.size}, {args.points} data points (loader batch {args.batch}, one batch of "
          f"{args.points} for both), {args.probes} probes, {len(names)} weights, {args.threads} threads, "
          f"device {device}{' (' + torch.cuda.get_device_name(device) + ', TF32 ' + ('on' if args.tf32 else 'off') + ')' if device.type == 'cuda' else ''}, "
          f"hvp mode {args.mode}, {args.repeats} alternated runs after {args.warmup} warm-up round(s)")
    base = statistics.median(times["purecomp"])
    for name, t in times.items():
        print(f"{name:<18} median {statistics.median(t):8.3f} s   (runs: {', '.join(f'{v:.3f}' for v in t)})"
              + ("" if name == "purecomp" else f"   {statistics.median(t) / base:.2f}x purecomp's time"))


if __name__ == "__main__":
    main()
