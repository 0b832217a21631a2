"""W4A8 post-training quantization, round-to-nearest vs AdaRound, with ``pc.quantize``.

    python bench/adaround_w4a8.py --dataset mnist [--arch narrow_cnn] [--iterations 1000] [--seed 0]

Trains the FP32 network (``narrow_cnn``: the digits CNN with 8 / 16 / 32 channels, chosen because
nearest rounding at 4 bits loses several points on it; or ``examples/ptq_cnn.py``'s MobileNet-style
CNN, or ``examples/common.py``'s digits CNN, on which it loses less than a point) on the dataset's training split (MNIST: the first 6,000 test images; digits: the
1,437-image split), then quantizes it with ``pc.quantize`` on ``--subset-size`` calibration
samples: weights symmetric per channel in 4 bits
(``weights_quantization_params={"num_bits": 4}``), activations 8 bits, NNCF's defaults otherwise
(BatchNorm folding, fast bias correction), once with nearest rounding and once with
``adaround`` (sequential, ``--iterations`` Adam steps per layer). Prints top-1 accuracy on the
evaluation split, the points lost against FP32, the time of the ``quantize`` call, the largest
calibration activations AdaRound buffered for one layer, and the process's peak resident memory
(``ru_maxrss``; nearest runs first, so AdaRound's value includes it).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from ptq_cnn import mobilenet_style  # noqa: E402

import purecomp as pc  # noqa: E402

from common import ARCHITECTURES, accuracy, load_dataset, loader, train_epochs  # noqa: E402


def narrow_cnn(widths: tuple[int, int, int] = (8, 16, 32), num_classes: int = 10) -> nn.Module:
    """The digits CNN's layout (three conv-BN-ReLU blocks, a max pool, global average pooling, a
    linear classifier) with a quarter or half of its channels: few channels per layer, so each
    weight's rounding matters and nearest rounding at 4 bits loses several points."""

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(*block(1, widths[0]), *block(widths[0], widths[1]), nn.MaxPool2d(2),
                         *block(widths[1], widths[2]), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(widths[2], num_classes))


NETWORKS = {"narrow_cnn": narrow_cnn, "mobilenet_style": mobilenet_style, "digits_cnn": ARCHITECTURES["digits_cnn"]}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=["digits", "mnist"], default="mnist")
    parser.add_argument("--arch", choices=sorted(NETWORKS), default="narrow_cnn")
    parser.add_argument("--widths", type=int, nargs=3, default=(8, 16, 32), help="narrow_cnn's channels")
    parser.add_argument("--epochs", type=int, default=None, help="FP32 epochs (default: 30 digits, 6 MNIST)")
    parser.add_argument("--iterations", type=int, default=1000, help="AdaRound steps per layer")
    parser.add_argument("--subset-size", type=int, default=300)
    parser.add_argument("--bits", type=int, default=4, help="weight bits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train_set, test_set = load_dataset(args.dataset)
    train, test = loader(train_set, 64, True, args.seed), loader(test_set, 256, False)
    model = narrow_cnn(tuple(args.widths)) if args.arch == "narrow_cnn" else NETWORKS[args.arch]()
    train_epochs(model, model.parameters(), train, args.epochs or (30 if args.dataset == "digits" else 6), 3e-3,
                 f"FP32 {args.arch}")
    model.eval()
    fp32 = accuracy(model, test)
    calibration = pc.Dataset(loader(train_set, 32, True, args.seed + 1), lambda batch: batch[0])
    weights = {"num_bits": args.bits}
    arch = f"narrow_cnn {tuple(args.widths)}" if args.arch == "narrow_cnn" else args.arch
    print(f"{arch} on {args.dataset} ({len(train_set)} train, {len(test_set)} evaluation images), "
          f"W{args.bits}A8 per-channel weights, {args.subset_size} calibration samples, seed {args.seed}, "
          f"{args.threads} threads")
    print(f"{'variant':<10}{'top-1 %':>9}{'vs FP32':>9}{'quantize s':>12}{'buffer MiB':>12}{'peak RSS MiB':>14}")
    print(f"{'FP32':<10}{fp32:>9.2f}{'':>9}{'':>12}{'':>12}{peak_rss_mib():>14.0f}")
    pc.quantize(model, calibration, subset_size=8)  # warm-up: builds the C++ ops once, outside the timings
    for name, extra in (("nearest", {}), ("AdaRound", {"adaround": {"num_iterations": args.iterations,
                                                                    "seed": args.seed}})):
        start = time.perf_counter()
        quantized = pc.quantize(model, calibration, subset_size=args.subset_size,
                                advanced_parameters={"weights_quantization_params": weights, **extra})
        seconds = time.perf_counter() - start
        acc = accuracy(quantized, test)
        report = quantized.adaround_report
        buffer = f"{report.peak_buffer_bytes / 2**20:.1f}" if report else "-"
        print(f"{name:<10}{acc:>9.2f}{acc - fp32:>+9.2f}{seconds:>12.1f}{buffer:>12}{peak_rss_mib():>14.0f}",
              flush=True)
        if report:
            print(report.table())


if __name__ == "__main__":
    main()
