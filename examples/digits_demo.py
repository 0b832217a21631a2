"""The main demo: train a small CNN on digits, compress it with purecomp (INT8 QAT; INT8 QAT
stacked with 50% magnitude sparsity), export ONNX, compare.

    python examples/digits_demo.py [--dataset digits|mnist] [--epochs 30] [--qat-epochs 5] [--out DIR]

Prints the compression tables, then accuracy (PyTorch and ONNX Runtime), ONNX file size and
ONNX Runtime latency (batch 1, median, models alternated) for the FP32 and compressed models.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

from sparsity_digits import finetune
from torch import nn

import purecomp as pc
from purecomp import export

from common import (
    Baseline,
    accuracy,
    onnx_accuracy,
    onnx_latencies,
    train_baseline,
    train_epochs,
)


def int8_method(logarithm_scale: str = "none") -> pc.Compression:
    """INT8 QAT: per-channel symmetric weights, asymmetric activations, mean-min-max range init
    (``logarithm_scale``: ``"weights"``, ``"activations"`` or ``"both"`` train the logarithms of
    those ranges)."""
    return pc.quantization(
        weights=dict(mode="symmetric", bits=8, per_channel=True, logarithm_scale=logarithm_scale in ("weights", "both")),
        activations=dict(mode="asymmetric", bits=8, logarithm_scale=logarithm_scale in ("activations", "both")),
        range_init=pc.RangeInit(type="mean_min_max", num_init_samples=512),
    )


def sparse_int8_method(epochs: int, target: float = 0.5) -> pc.Compression:
    """Magnitude sparsity (polynomial ramp 0 -> ``target`` over a third of ``epochs``, masks frozen
    at half) chained before INT8 quantization."""
    level = pc.schedules.polynomial(0.0, target, max(1, epochs // 3), update_per_optimizer_step=True)
    return pc.chain(pc.magnitude_sparsity(level, freeze_epoch=max(1, epochs // 2)),
                    pc.quantization(weights=dict(mode="symmetric", bits=8, per_channel=True),
                                    activations=dict(mode="asymmetric", bits=8),
                                    range_init=pc.RangeInit(num_init_samples=512)))


def int8_calibrated(base: Baseline, logarithm_scale: str = "none"
                    ) -> tuple[nn.Module, pc.Compression, pc.ModelGraph, dict, object]:
    """A copy of the FP32 model with INT8 quantizers calibrated and BatchNorm re-estimated on
    ``base.train``: ``(model, method, graph, params, state)``, the model in eval mode."""
    model = copy.deepcopy(base.model)
    graph = pc.trace(model, (base.train_set.tensors[0][:2],))
    method = int8_method(logarithm_scale)
    params = dict(model.named_parameters()) | {k: v.clone() for k, v in model.named_buffers()}
    state = method.init(graph, params, base.train)
    params = pc.adapt_batchnorm(model, method, params, state, base.train, num_samples=512)
    model.eval()
    return model, method, graph, params, state


def int8_qat(model: nn.Module, method: pc.Compression, params: dict, state, train, epochs: int,
             lr: float = 1e-4) -> None:
    """QAT in place on ``params`` and the trainable leaves of ``state`` (Adam, cosine decay); purecomp
    never modifies the model object, the optimizer trains its parameters."""
    model.train()
    trainable = [p for p in params.values() if p.requires_grad] + pc.trainable(state)
    train_epochs(lambda x: pc.apply(model, method, params, state, x), trainable, train, epochs, lr, "INT8 QAT")
    model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dataset", default="digits", choices=["digits", "mnist"])
    ap.add_argument("--epochs", type=int, default=30, help="FP32 training epochs")
    ap.add_argument("--qat-epochs", type=int, default=5, help="INT8 fine-tuning epochs")
    ap.add_argument("--sparse-epochs", type=int, default=12, help="INT8 + 50%% sparsity fine-tuning epochs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="where to write the ONNX files (default: a temporary directory)")
    args = ap.parse_args()
    started = time.perf_counter()
    base = train_baseline(args.dataset, args.epochs, args.seed)
    train_set, test_set, train, test, model, fp32 = (
        base.train_set, base.test_set, base.train, base.test, base.model, base.accuracy)
    example = train_set.tensors[0][:2]
    out_dir = args.out or Path(tempfile.mkdtemp(prefix="purecomp-demo-"))
    fp32_params = dict(model.named_parameters()) | dict(model.named_buffers())
    fp32_path = export.to_onnx(model, pc.identity(), fp32_params, (), (example,), out_dir / "digits_fp32.onnx")

    model, method, graph, params, state = int8_calibrated(base)
    int8_init = accuracy(lambda x: pc.apply(model, method, params, state, x), test)
    sparse_model = copy.deepcopy(base.model)  # the sparse run starts from the same FP32 weights
    int8_qat(model, method, params, state, train, args.qat_epochs)
    int8 = accuracy(lambda x: pc.apply(model, method, params, state, x), test)
    int8_path = export.to_onnx(model, method, params, state, (example,), out_dir / "digits_int8.onnx")

    sparse_method = sparse_int8_method(args.sparse_epochs)
    sparse_graph, sparse_params, sparse_state = finetune(
        sparse_model, sparse_method, train, args.sparse_epochs, 3e-4, 0.0, 0.0, "INT8 + 50% sparsity")
    sparse = accuracy(lambda x: pc.apply(sparse_model, sparse_method, sparse_params, sparse_state, x), test)
    sparse_path = export.to_onnx(sparse_model, sparse_method, sparse_params, sparse_state, (example,),
                                 out_dir / "digits_int8_sparse50.onnx")
    onnx_fp32, onnx_int8, onnx_sparse = (onnx_accuracy(p, test) for p in (fp32_path, int8_path, sparse_path))
    latency = onnx_latencies({"fp32": fp32_path, "int8": int8_path, "sparse": sparse_path}, example[:1])

    print(pc.statistics(graph, state))
    print()
    print(pc.statistics(sparse_graph, sparse_state)["sparsity"])
    print()
    print(f"dataset: {args.dataset} ({len(train_set)} train / {len(test_set)} test images); ONNX files in {out_dir}")
    header = f"{'model':<24}{'PyTorch acc %':>14}{'ONNX acc %':>12}{'ONNX KiB':>10}{'ORT ms (b=1)':>14}"
    print(header)
    print("-" * len(header))
    print(f"{'FP32':<24}{fp32:>14.2f}{onnx_fp32:>12.2f}{fp32_path.stat().st_size / 1024:>10.1f}{latency['fp32']:>14.3f}")
    print(f"{'INT8 after range init':<24}{int8_init:>14.2f}{'':>12}{'':>10}{'':>14}")
    print(f"{'INT8 after QAT':<24}{int8:>14.2f}{onnx_int8:>12.2f}{int8_path.stat().st_size / 1024:>10.1f}{latency['int8']:>14.3f}")
    print(f"{'INT8 + 50% sparsity':<24}{sparse:>14.2f}{onnx_sparse:>12.2f}{sparse_path.stat().st_size / 1024:>10.1f}{latency['sparse']:>14.3f}")
    print(f"accuracy drop from FP32: INT8 {fp32 - int8:+.2f} points, INT8 + 50% sparsity {fp32 - sparse:+.2f} points "
          f"(ONNX Runtime: {onnx_fp32 - onnx_int8:+.2f}, {onnx_fp32 - onnx_sparse:+.2f}); time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
