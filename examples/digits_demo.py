"""The main demo: train a small CNN on digits, INT8 QAT it with purecomp, compare accuracy.

    python examples/digits_demo.py [--dataset digits|mnist] [--epochs 30] [--qat-epochs 5]
"""

from __future__ import annotations

import argparse
import time

import torch

import purecomp as pc

from common import accuracy, digits_cnn, load_dataset, loader, train_epochs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dataset", default="digits", choices=["digits", "mnist"])
    ap.add_argument("--epochs", type=int, default=30, help="FP32 training epochs")
    ap.add_argument("--qat-epochs", type=int, default=5, help="INT8 fine-tuning epochs")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    started = time.perf_counter()

    train_set, test_set = load_dataset(args.dataset)
    train, test = loader(train_set, 64, True, args.seed), loader(test_set, 256, False)
    model = digits_cnn()
    train_epochs(model, model.parameters(), train, args.epochs, 3e-3, "FP32 training")
    model.eval()
    fp32 = accuracy(model, test)

    # INT8 QAT, functional: the model object is never modified by purecomp
    example = train_set.tensors[0][:2]
    graph = pc.trace(model, (example,))
    method = pc.quantization(
        weights=dict(mode="symmetric", bits=8, per_channel=True),
        activations=dict(mode="asymmetric", bits=8),
        range_init=pc.RangeInit(type="mean_min_max", num_init_samples=512),
    )
    params = dict(model.named_parameters()) | {k: v.clone() for k, v in model.named_buffers()}
    state = method.init(graph, params, train)
    params = pc.adapt_batchnorm(model, method, params, state, train, num_samples=512)
    model.eval()
    int8_init = accuracy(lambda x: pc.apply(model, method, params, state, x), test)

    model.train()
    trainable = [p for p in params.values() if p.requires_grad] + pc.trainable(state)
    train_epochs(lambda x: pc.apply(model, method, params, state, x), trainable, train,
                 args.qat_epochs, 1e-4, "INT8 QAT")
    model.eval()
    int8 = accuracy(lambda x: pc.apply(model, method, params, state, x), test)

    print(pc.statistics(graph, state))
    print()
    print(f"dataset: {args.dataset} ({len(train_set)} train / {len(test_set)} test images)")
    print(f"{'model':<28}{'top-1 accuracy (%)':>20}")
    print(f"{'FP32':<28}{fp32:>20.2f}")
    print(f"{'INT8 after range init':<28}{int8_init:>20.2f}")
    print(f"{'INT8 after QAT':<28}{int8:>20.2f}")
    print(f"accuracy drop FP32 -> INT8 QAT: {fp32 - int8:+.2f} points; time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
