"""Filter pruning on resnet18 (3x224x224): parameters, FLOPs and ONNX Runtime latency of the
pruned (materialized) model against the unpruned one.

    python bench/prune_speed.py [--levels 0.3 0.5] [--batches 1 8] [--repeats 20] [--threads 2]

Every file comes from ``purecomp.export.to_onnx`` (the unpruned one with ``purecomp.identity()``).
Runs alternate the unpruned and pruned sessions call by call after a warm-up; medians and
speed-ups are printed. Weights are random (``weights=None``): latency does not depend on them.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision

import purecomp as pc
from purecomp import export


def alternate(runners: dict, repeats: int, warmup: int = 3) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in runners}
    for i in range(warmup + repeats):
        for k, run in runners.items():
            start = time.perf_counter()
            run()
            if i >= warmup:
                times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--levels", type=float, nargs="+", default=[0.3, 0.5])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    graph = pc.trace(model, (x,))
    params = dict(model.named_parameters())
    with tempfile.TemporaryDirectory() as tmp:
        files = {"unpruned": export.to_onnx(model, pc.identity(), params, (), (x,), Path(tmp) / "resnet18.onnx")}
        print(f"{'model':<10}{'params':>12}{'GFLOPs':>9}{'ratio p':>9}{'ratio f':>9}")
        base = pc.model_cost(model, x)
        print(f"{'unpruned':<10}{base['params']:>12}{base['flops'] / 1e9:>9.2f}{1:>9.2f}{1:>9.2f}")
        for level in args.levels:
            method = pc.filter_pruning(level, criterion="geometric_median")
            state = method.init(graph, params)
            small = export.materialize(model, method, params, state, graph=graph)
            cost = pc.model_cost(small, x)
            name = f"{level:.0%}"
            print(f"{name:<10}{cost['params']:>12}{cost['flops'] / 1e9:>9.2f}"
                  f"{cost['params'] / base['params']:>9.2f}{cost['flops'] / base['flops']:>9.2f}")
            files[name] = export.to_onnx(model, method, params, state, (x,), Path(tmp) / f"resnet18_{level}.onnx")
        print(f"\n{'batch':>6}{'pruned':>8}{'unpruned ms':>13}{'pruned ms':>11}{'speed-up':>10}")
        for batch in args.batches:
            feed = np.random.default_rng(0).standard_normal((batch, 3, 224, 224), dtype=np.float32)
            for name in list(files)[1:]:
                sessions = {k: session(files[k], args.threads) for k in ("unpruned", name)}
                runners = {k: (lambda s=s, f=feed: s.run(None, {s.get_inputs()[0].name: f})) for k, s in sessions.items()}
                med = alternate(runners, args.repeats)
                print(f"{batch:>6}{name:>8}{med['unpruned']:>13.1f}{med[name]:>11.1f}{med['unpruned'] / med[name]:>10.2f}")


if __name__ == "__main__":
    main()
