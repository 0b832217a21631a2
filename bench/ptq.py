"""Cost of ``pc.quantize`` against one FP32 pass over the same calibration data.

    python bench/ptq.py [--models resnet18 mobilenet_v2] [--size 64] [--samples 300] [--repeats 3]

For each torchvision model (``weights=None``, BatchNorm statistics from a few random batches),
in one process: a warm-up, then ``repeats`` alternations of A (FP32 forward over the
``samples`` calibration images, batch 32) and B (``pc.quantize`` with defaults on the same
data); prints the medians and B / A (target: at most 3x). Peak resident memory of each step
is measured in a child process of its own: the resident high-water mark during the step above
the memory held before it (model, data and imports excluded; Linux ``/proc/self/clear_refs``). With NNCF 3.x installed the bench
also times ``nncf.quantize`` on the same model and data and prints the ratio to purecomp's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
import torchvision

import purecomp as pc


def build(name: str, size: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None, num_classes=10)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 3, size, size))
    return model.eval()


def calibration(samples: int, size: int, batch: int = 32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    sizes = [batch] * (samples // batch) + ([samples % batch] if samples % batch else [])
    return [torch.randn(n, 3, size, size, generator=g) for n in sizes]


def fp32_pass(model: torch.nn.Module, data: list[torch.Tensor]) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        for x in data:
            model(x)
    return time.perf_counter() - start


def purecomp_quantize(model: torch.nn.Module, data: list[torch.Tensor], samples: int) -> float:
    start = time.perf_counter()
    pc.quantize(model, pc.Dataset(data), subset_size=samples)
    return time.perf_counter() - start


def nncf_quantize(model: torch.nn.Module, data: list[torch.Tensor], samples: int) -> float | None:
    try:
        import nncf
    except ImportError:
        return None
    start = time.perf_counter()
    nncf.quantize(model, nncf.Dataset(data), subset_size=samples)
    return time.perf_counter() - start


STEPS = {"fp32": fp32_pass, "purecomp": purecomp_quantize, "nncf": nncf_quantize}


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def child(name: str, step: str, size: int, samples: int) -> None:
    """One step in this process; prints its time and the step's peak resident memory above what
    the process held before it (Linux: the high-water mark is reset before the step), as JSON."""
    torch.set_num_threads(2)
    model, data = build(name, size), calibration(samples, size)
    STEPS[step](model, data[:1], 8) if step != "fp32" else fp32_pass(model, data[:1])  # imports, lazy init
    before = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset VmHWM to the current RSS
    seconds = fp32_pass(model, data) if step == "fp32" else STEPS[step](model, data, samples)
    print(json.dumps({"seconds": seconds, "peak_mib": (_rss_kib("VmHWM") - before) / 1024}))


def peak(name: str, step: str, size: int, samples: int) -> float | None:
    out = subprocess.run([sys.executable, __file__, "--child", name, step, "--size", str(size),
                          "--samples", str(samples)], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return None if result["seconds"] is None else result["peak_mib"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "STEP"))
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.size, args.samples)
        return
    torch.set_num_threads(2)
    print(f"{args.samples} samples of 3x{args.size}x{args.size}, 2 threads, median of {args.repeats}")
    print(f"{'model':<14}{'FP32 pass s':>12}{'quantize s':>12}{'ratio':>8}{'+peak MiB fp32':>15}{'+peak MiB PTQ':>14}"
          f"{'nncf s':>9}{'nncf/ours':>11}")
    for name in args.models:
        model, data = build(name, args.size), calibration(args.samples, args.size)
        fp32_pass(model, data)
        purecomp_quantize(model, data[:1], 8)  # warm-up: kernels, tracing paths
        a, b, n = [], [], []
        for _ in range(args.repeats):
            a.append(fp32_pass(model, data))
            b.append(purecomp_quantize(model, data, args.samples))
            nn_time = nncf_quantize(model, data, args.samples)
            if nn_time is not None:
                n.append(nn_time)
        ta, tb = statistics.median(a), statistics.median(b)
        tn = f"{statistics.median(n):9.2f}{statistics.median(n) / tb:11.2f}" if n else f"{'-':>9}{'-':>11}"
        print(f"{name:<14}{ta:12.2f}{tb:12.2f}{tb / ta:8.2f}{peak(name, 'fp32', args.size, args.samples):15.0f}"
              f"{peak(name, 'purecomp', args.size, args.samples):14.0f}{tn}")


if __name__ == "__main__":
    main()
