"""INT8 QAT of a trained model with linear vs logarithmic range parameters (NNCF's ``logarithm_scale``).

    python bench/logarithm_scale_qat.py [--datasets digits,mnist] [--seeds 0,1]

Per dataset and seed: trains the FP32 digits CNN (``examples/common.train_baseline``, the epochs of
``examples/results_table.py``), then runs the examples' INT8 QAT recipe (``digits_demo.int8_calibrated``
+ ``int8_qat``: per-channel symmetric weights, asymmetric activations, mean-min-max init, BatchNorm
adaptation, Adam 1e-4 with cosine decay) twice on copies of it, once training the scales and ranges
themselves and once their logarithms (``--log-of``: weights, activations or both), and prints the test accuracy (PyTorch, %) of each. A benchmark:
it prints, it asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from digits_demo import int8_calibrated, int8_qat  # noqa: E402
from results_table import DEFAULTS  # noqa: E402

import purecomp as pc  # noqa: E402

from common import accuracy, train_baseline  # noqa: E402


def qat_accuracy(base, epochs: int, logarithm_scale: str, seed: int) -> float:
    torch.manual_seed(seed)
    model, method, _graph, params, state = int8_calibrated(base, logarithm_scale)
    int8_qat(model, method, params, state, base.train, epochs)
    return accuracy(lambda x: pc.apply(model, method, params, state, x), base.test)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="digits,mnist")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--log-of", default="both", choices=["weights", "activations", "both"],
                    help="which quantizers train log(range) in the second run")
    args = ap.parse_args()
    print(f"| data | seed | FP32 | INT8 QAT, scale | INT8 QAT, log(scale) of {args.log_of} | difference (points) | s |")
    print("|---|---|---|---|---|---|---|")
    for dataset in args.datasets.split(","):
        s = DEFAULTS[dataset]
        for seed in (int(x) for x in args.seeds.split(",")):
            t0 = time.perf_counter()
            base = train_baseline(dataset, s.fp32_epochs, seed)
            linear = qat_accuracy(base, s.qat_epochs, "none", seed)
            logarithmic = qat_accuracy(base, s.qat_epochs, args.log_of, seed)
            print(f"| {dataset} | {seed} | {base.accuracy:.2f} | {linear:.2f} | {logarithmic:.2f} | "
                  f"{logarithmic - linear:+.2f} | {time.perf_counter() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
