"""Benchmark of the fake-quantize kernels (not a test; prints ratios measured in one run).

For 256K and 4M float32 elements shaped like a conv activation (N, 64, 32, 32), 8 bits,
per-tensor symmetric and per-channel (axis 1) asymmetric, times forward and forward+backward
of: purecomp's C++ kernels (through the public router), the reference composite in eager and
under ``torch.compile``, torch's learnable fake quantizers, ``x.clone()`` as the memory
bandwidth yardstick, and ``torch.relu`` as the cheapest elementwise op with autograd (its
forward+backward through ``torch.autograd.grad`` is the floor of any op timed the same way).
Candidates alternate within each round; each figure is the median over rounds after a warm-up.

The C++ forward+backward must move 2.5 clones' worth of bytes (forward reads x and writes out:
one clone; backward reads grad and x and writes grad_x: 1.5 clones), so ``C++ / (2.5 clone)``
says how close to the bandwidth bound it runs; ``relu / (2.5 clone)`` is the same ratio for
relu, whose kernels do almost nothing (the rest is autograd and Python per-call cost).
"C++ kernels only" calls the forward and backward ops directly (no autograd graph, no
``torch.autograd.grad``): the kernels' own cost against the same bound. The target is
``C++ fwd+bwd / (2.5 x clone) <= 2.5``.

``clone`` copies one tensor again and again, so at 256K (1 MB) its source and destination stay
in the per-core L2 cache, while a forward+backward touches x, out, grad and grad_x (4-5 MB) and
cannot. ``clone (cold)`` copies a tensor of the same size taken in turn from a pool of
distinct tensors (at least 64 MB in all), so its source comes from the shared cache or memory:
the bandwidth the op's own working set gets. Both yardsticks are printed; at 4M they agree.

Run: ``python bench/ops.py [--rounds 15] [--threads 2] [--sizes 256K 4M] [--device cpu|cuda]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from purecomp.ops import build, fake_quantize_asymmetric, fake_quantize_symmetric, record_paths
from purecomp.ops.reference import (
    fake_quantize_asymmetric_reference,
    fake_quantize_symmetric_reference,
)

BITS = 8
CHANNELS = 64
SIZES = {"256K": (4, CHANNELS, 32, 32), "4M": (64, CHANNELS, 32, 32)}


DEVICE = torch.device("cpu")  # set by --device


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def _time(fn: Callable[[], object], repeat: int) -> float:
    _sync()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    _sync()
    return (time.perf_counter() - start) / repeat


def _fwd_bwd(
    forward: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...], grad: torch.Tensor
) -> Callable[[], object]:
    def run() -> object:
        out = forward(*inputs)
        return torch.autograd.grad(out, inputs, grad)

    return run


def _cold_clone(x: torch.Tensor) -> Callable[[], object]:
    """``clone()`` of a same-sized tensor from a rotating pool of >= 64 MB (512 MB on a GPU):
    the source is not in the (L2) cache."""
    pool_bytes = (512 if x.is_cuda else 64) << 20
    pool = [x.clone() for _ in range(max(4, pool_bytes // (x.numel() * x.element_size())))]
    position = iter(range(1 << 62))

    def run() -> torch.Tensor:
        return pool[next(position) % len(pool)].clone()

    return run


def _candidates(
    case: str, shape: tuple[int, ...]
) -> dict[str, tuple[Callable[[], object], Callable[[], object]]]:
    """name -> (forward, forward+backward) closures for one case."""
    torch.manual_seed(0)
    x = torch.randn(shape, device=DEVICE)
    grad = torch.randn(shape, device=DEVICE)
    xg = x.clone().requires_grad_()
    if case == "sym per-tensor":
        scale = torch.tensor([3.0], device=DEVICE)
        sg = scale.clone().requires_grad_()

        def cpp(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
            return fake_quantize_symmetric(x, s, bits=BITS, signed=True, narrow_range=False)

        def ref(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
            return fake_quantize_symmetric_reference(
                x, s, bits=BITS, signed=True, narrow_range=False
            )

        zero_point = torch.zeros(1, device=DEVICE)
        step = scale / 127

        def learnable(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
            return torch._fake_quantize_learnable_per_tensor_affine(
                x, s, zero_point, -128, 127, 1.0
            )

        params, params_g, learn_params = (scale,), (sg,), (step.clone().requires_grad_(),)
        learn_fwd = (step,)

        def kernel_fwd() -> torch.Tensor:
            return torch.ops.purecomp.fake_quantize_symmetric(x, scale, -128, 127)

        def kernel_bwd() -> object:
            return torch.ops.purecomp.fake_quantize_symmetric_backward(grad, x, scale, -128, 127)
    else:
        low = torch.full((CHANNELS,), -2.0, device=DEVICE)
        rng = torch.full((CHANNELS,), 5.0, device=DEVICE)
        lg, rg = low.clone().requires_grad_(), rng.clone().requires_grad_()

        def cpp(x: torch.Tensor, lo: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
            return fake_quantize_asymmetric(x, lo, r, bits=BITS, axis=1)

        def ref(x: torch.Tensor, lo: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
            return fake_quantize_asymmetric_reference(x, lo, r, bits=BITS, axis=1)

        step = rng / 255
        zero_point = torch.round(-low / step)

        def learnable(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
            return torch._fake_quantize_learnable_per_channel_affine(
                x, s, zero_point, 1, 0, 255, 1.0
            )

        params, params_g, learn_params = (low, rng), (lg, rg), (step.clone().requires_grad_(),)
        learn_fwd = (step,)

        def kernel_fwd() -> torch.Tensor:
            return torch.ops.purecomp.fake_quantize_asymmetric(x, low, rng, 256, 1)

        def kernel_bwd() -> object:
            return torch.ops.purecomp.fake_quantize_asymmetric_backward(grad, x, low, rng, 256, 1)
    compiled = torch.compile(ref)
    cold = _cold_clone(x)
    return {
        "clone": (lambda: x.clone(), lambda: x.clone()),
        "clone (cold)": (cold, cold),
        "torch relu": (lambda: torch.relu(x), _fwd_bwd(torch.relu, (xg,), grad)),
        "purecomp C++": (lambda: cpp(x, *params), _fwd_bwd(cpp, (xg, *params_g), grad)),
        "C++ kernels only": (kernel_fwd, lambda: (kernel_fwd(), kernel_bwd())),
        "reference eager": (lambda: ref(x, *params), _fwd_bwd(ref, (xg, *params_g), grad)),
        "reference compiled": (
            lambda: compiled(x, *params),
            _fwd_bwd(compiled, (xg, *params_g), grad),
        ),
        "torch learnable": (
            lambda: learnable(x, *learn_fwd),
            _fwd_bwd(learnable, (xg, *learn_params), grad),
        ),
    }


def measure(case: str, shape: tuple[int, ...], rounds: int) -> dict[str, tuple[float, float]]:
    """Median (forward, forward+backward) seconds per candidate, candidates alternated per round."""
    candidates = _candidates(case, shape)
    numel = torch.Size(shape).numel()
    repeat = max(3, (1 << 24) // numel)  # ~16M elements per measurement
    for fwd, both in candidates.values():  # warm-up (compiles, builds, caches)
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
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for the CUDA kernels")
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    torch.set_num_threads(args.threads)
    if not build.cpp_available():
        raise SystemExit(f"purecomp C++ ops unavailable: {build.build_error()}")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, device {DEVICE}"
        f"{' (' + torch.cuda.get_device_name(DEVICE) + ')' if DEVICE.type == 'cuda' else ''}, "
        f"median of {args.rounds} rounds\n"
    )
    header = f"{'case':<16} {'size':<5} {'candidate':<19} {'fwd us':>9} {'fwd+bwd us':>11}"
    for case in ("sym per-tensor", "asym per-channel"):
        for size in args.sizes:
            shape = SIZES[size]
            with record_paths() as paths:
                times = measure(case, shape, args.rounds)
            kernel = "cuda" if DEVICE.type == "cuda" else "cpp"
            assert kernel in paths, f"the {kernel} kernels did not run"
            print(header)
            for name, (fwd, both) in times.items():
                print(f"{case:<16} {size:<5} {name:<19} {fwd * 1e6:>9.1f} {both * 1e6:>11.1f}")
            cpp_f, cpp_b = times["purecomp C++"]
            clone, cold = times["clone"][0], times["clone (cold)"][0]
            kernels, relu = times["C++ kernels only"][1], times["torch relu"][1]
            print(f"  C++ fwd / clone                      {cpp_f / clone:6.2f}")
            for label, yardstick in (("clone", clone), ("cold clone", cold)):
                bound = 2.5 * yardstick
                print(f"  vs 2.5 x {label:<10}  C++ fwd+bwd {cpp_b / bound:5.2f} (target <= 2.5), "
                      f"kernels only {kernels / bound:5.2f}, relu fwd+bwd {relu / bound:5.2f}")
            print(
                f"  torch learnable / C++  fwd, fwd+bwd {times['torch learnable'][0] / cpp_f:6.2f}x "
                f"{times['torch learnable'][1] / cpp_b:6.2f}x  (target >= 5x)"
            )
            print(
                f"  compiled ref / C++     fwd, fwd+bwd {times['reference compiled'][0] / cpp_f:6.2f}x "
                f"{times['reference compiled'][1] / cpp_b:6.2f}x  (target >= 1x)"
            )
            print(
                f"  eager ref / C++        fwd, fwd+bwd {times['reference eager'][0] / cpp_f:6.2f}x "
                f"{times['reference eager'][1] / cpp_b:6.2f}x\n"
            )


if __name__ == "__main__":
    main()
