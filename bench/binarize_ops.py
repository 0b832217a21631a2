"""Benchmark of the activation binarization kernels (not a test; prints ratios measured in one run).

For 256K and 4M float32 elements shaped like a conv activation (N, 64, 32, 32), thresholds per
channel (axis 1), times forward and forward+backward of: purecomp's C++ kernels (through the
public router ``activation_binarize``), the C++ ops called directly (no autograd), the reference
composite in eager and under ``torch.compile``, and ``x.clone()`` as the memory bandwidth
yardstick (forward+backward moves 2.5 clones' worth of bytes). Candidates alternate within each
round; each figure is the median over rounds after a warm-up.

Run: ``python bench/binarize_ops.py [--rounds 15] [--threads 2]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from purecomp.ops import build, record_paths
from purecomp.ops.binarize import activation_binarize
from purecomp.ops.binarize_reference import activation_binarize_reference

CHANNELS = 64
SIZES = {"256K": (4, CHANNELS, 32, 32), "4M": (64, CHANNELS, 32, 32)}


def _time(fn: Callable[[], object], repeat: int) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def _fwd_bwd(
    forward: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...], grad: torch.Tensor
) -> Callable[[], object]:
    def run() -> object:
        return torch.autograd.grad(forward(*inputs, 1), inputs, grad)

    return run


def _candidates(shape: tuple[int, ...]) -> dict[str, tuple[Callable[[], object], Callable[[], object]]]:
    """name -> (forward, forward+backward) closures."""
    torch.manual_seed(0)
    x = torch.randn(shape)
    grad = torch.randn(shape)
    scale, threshold = torch.tensor(1.5), torch.rand(CHANNELS) * 0.8
    leaves = (x.clone().requires_grad_(), scale.clone().requires_grad_(), threshold.clone().requires_grad_())
    ops = torch.ops.purecomp
    compiled = torch.compile(activation_binarize_reference)
    return {
        "clone": (lambda: x.clone(), lambda: x.clone()),
        "purecomp C++": (
            lambda: activation_binarize(x, scale, threshold, 1),
            _fwd_bwd(activation_binarize, leaves, grad),
        ),
        "C++ kernels only": (
            lambda: ops.activation_binarize(x, scale, threshold, 1),
            lambda: (
                ops.activation_binarize(x, scale, threshold, 1),
                ops.activation_binarize_backward(grad, x, scale, threshold, 1),
            ),
        ),
        "reference eager": (
            lambda: activation_binarize_reference(x, scale, threshold, 1),
            _fwd_bwd(activation_binarize_reference, leaves, grad),
        ),
        "reference compiled": (lambda: compiled(x, scale, threshold, 1), _fwd_bwd(compiled, leaves, grad)),
    }


def measure(shape: tuple[int, ...], rounds: int) -> dict[str, tuple[float, float]]:
    """Median (forward, forward+backward) seconds per candidate, candidates alternated per round."""
    candidates = _candidates(shape)
    numel = torch.Size(shape).numel()
    repeat = max(3, (1 << 24) // numel)  # ~16M elements per measurement
    for fwd, both in candidates.values():  # warm-up (compiles, caches)
        for _ in range(3):
            fwd()
            both()
    samples: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in candidates}
    for _ in range(rounds):
        for name, (fwd, both) in candidates.items():
            samples[name][0].append(_time(fwd, repeat))
            samples[name][1].append(_time(both, repeat))
    return {name: (statistics.median(f), statistics.median(b)) for name, (f, b) in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not build.cpp_available():
        raise SystemExit(f"purecomp C++ ops unavailable: {build.build_error()}")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, median of {args.rounds} rounds\n"
    )
    for size, shape in SIZES.items():
        with record_paths() as paths:
            times = measure(shape, args.rounds)
        assert "cpp" in paths, "the C++ kernels did not run"
        print(f"{'size':<5} {'candidate':<19} {'fwd us':>9} {'fwd+bwd us':>11}")
        for name, (fwd, both) in times.items():
            print(f"{size:<5} {name:<19} {fwd * 1e6:>9.1f} {both * 1e6:>11.1f}")
        cpp_f, cpp_b = times["purecomp C++"]
        clone = times["clone"][0]
        compiled_f, compiled_b = times["reference compiled"]
        eager_f, eager_b = times["reference eager"]
        print(f"  C++ fwd / clone                     {cpp_f / clone:6.2f}   (bound: 1.0)")
        print(f"  C++ fwd+bwd / (2.5 x clone)         {cpp_b / (2.5 * clone):6.2f}   (bound: 1.0)")
        print(f"  compiled ref / C++  fwd, fwd+bwd    {compiled_f / cpp_f:6.2f}x {compiled_b / cpp_b:6.2f}x")
        print(f"  eager ref / C++     fwd, fwd+bwd    {eager_f / cpp_f:6.2f}x {eager_b / cpp_b:6.2f}x\n")


if __name__ == "__main__":
    main()
