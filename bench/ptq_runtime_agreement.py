"""Where ONNX Runtime and OpenVINO part from PyTorch on a ``pc.quantize`` model, and why.

    python bench/ptq_runtime_agreement.py [--dataset mnist|digits] [--seed 0]

Trains the MobileNet-style CNN of ``examples/ptq_cnn.py`` (same data, seed and recipe), quantizes
it and its badly scaled copy with ``pc.quantize`` four times (float biases, a step per quantizer
and float32 steps, as before the three options existed; then adding ``int32_bias``,
``unify_residual_scales`` and ``activation_step_bits=16`` in turn: the last is the defaults),
exports each, and counts the test images each runtime configuration predicts differently from
PyTorch:

- ONNX Runtime without graph optimizations (the QDQ graph as written: the export's reference
  semantics), with all of them (what the examples run: integer kernels), and with all but
  ``WeightBiasQuantization``, the level-1 rewrite that replaces the float bias of a Conv / Gemm
  fed by a DequantizeLinear with ``DQ(round(b / (s_x s_w)))``, an int32 bias on the grid of the
  input scale times the weight scale (QLinearConv needs it);
- with ``int32_bias=True`` the biases are on that grid in PyTorch already, so the rewrite
  changes nothing;
- OpenVINO (CPU) with f32 for the ops it does not run in int8, with its default precision (bf16
  on a CPU with bf16 support), and with its low-precision transformations off
  (``LP_TRANSFORMS_MODE``, an internal CPU plugin property: convolutions in f32 on fake-quantized
  values), also without the dynamic quantization it then applies to the int8-weight classifier's
  input (``DYNAMIC_QUANTIZATION_GROUP_SIZE`` 0). With low-precision transformations on, OpenVINO
  fuses conv -> quantize -> add -> quantize into one convolution that skips the first quantizer's
  rounding (``Convolution::setPostOps`` in its CPU plugin); ``unify_residual_scales`` gives those
  quantizers one step, where the skipped rounding cannot change the sum. OpenVINO quantizes over a
  FakeQuantize range ``[ql s, qh s]`` rather than by ``x / s``; ``activation_step_bits=16`` makes
  that range exact in float32 (digits pixels 8/16 sit on a tie of the step fl(1/255)).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from ptq_cnn import badly_scaled, mobilenet_style  # noqa: E402

import purecomp as pc  # noqa: E402

from common import load_dataset, loader, train_epochs  # noqa: E402


def ort_logits(path: Path, x: torch.Tensor, level: ort.GraphOptimizationLevel, disabled: list[str]) -> tuple:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.graph_optimization_level = level
    with tempfile.TemporaryDirectory() as tmp:
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                                       disabled_optimizers=disabled)
        ops = Counter(node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node)
    name = session.get_inputs()[0].name
    out = np.concatenate([session.run(None, {name: x[i:i + 256].numpy()})[0] for i in range(0, len(x), 256)])
    return out, sum(n for op, n in ops.items() if op.startswith("QLinear") or op.endswith("Integer"))


def ov_logits(path: Path, x: torch.Tensor, config: dict) -> tuple:
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU", {"INFERENCE_NUM_THREADS": 1, **config})
    out = np.concatenate([compiled([x[i:i + 256].numpy()])[0] for i in range(0, len(x), 256)])
    int8 = sum(1 for op in compiled.get_runtime_model().get_ops()
               if op.get_rt_info()["layerType"].astype(str) in ("Convolution", "FullyConnected")
               and op.get_rt_info()["runtimePrecision"].astype(str) in ("u8", "i8"))
    return out, int8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=["digits", "mnist"], default="mnist")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    train_set, test_set = load_dataset(args.dataset)
    train, test = loader(train_set, 64, True, args.seed), loader(test_set, 256, False)
    model = mobilenet_style()
    train_epochs(model, model.parameters(), train, 30 if args.dataset == "digits" else 6, 3e-3, "FP32")
    model.eval()
    x = torch.cat([b[0] for b in test])
    y = torch.cat([b[1] for b in test]).numpy()
    folder = Path(tempfile.mkdtemp(prefix="ptq_runtimes_"))
    level = ort.GraphOptimizationLevel
    variants = {"before: float biases, a step per quantizer, float32 steps": (False, False, None),
                "int32_bias": (True, False, None),
                "int32_bias + unify_residual_scales": (True, True, None),
                "the defaults: int32_bias + unify_residual_scales + activation_step_bits=16": (True, True, 16)}
    for variant, net in (("plain", model), ("badly scaled", badly_scaled(model, args.seed))):
        for title, (int32_bias, unify, bits) in variants.items():
            options = dict(int32_bias=int32_bias, unify_residual_scales=unify, activation_step_bits=bits)
            quantized = pc.quantize(net, pc.Dataset(loader(train_set, 32, True, args.seed + 1), lambda b: b[0]),
                                    advanced_parameters=options)
            with torch.no_grad():
                reference = quantized(x).numpy()
            path = pc.export_quantized(quantized, (x[:1],), folder / f"{variant[0]}_{int32_bias}_{unify}_{bits}.onnx")
            print(f"\n{variant}, {title}: PyTorch {100 * (reference.argmax(1) == y).mean():.2f}%")
            runs = {"ORT, no graph optimizations": lambda p: ort_logits(p, x, level.ORT_DISABLE_ALL, []),
                    "ORT, all optimizations": lambda p: ort_logits(p, x, level.ORT_ENABLE_ALL, []),
                    "OpenVINO, f32 + int8": lambda p: ov_logits(p, x, {"INFERENCE_PRECISION_HINT": "f32"})}
            if not int32_bias:
                runs = {**runs,
                        "ORT, all but WeightBiasQuantization": lambda p: ort_logits(
                            p, x, level.ORT_ENABLE_ALL, ["WeightBiasQuantization"]),
                        "OpenVINO, default precision": lambda p: ov_logits(p, x, {}),
                        "OpenVINO, f32, LPT off": lambda p: ov_logits(
                            p, x, {"INFERENCE_PRECISION_HINT": "f32", "LP_TRANSFORMS_MODE": False}),
                        "OpenVINO, f32, LPT off, no dynamic quantization": lambda p: ov_logits(
                            p, x, {"INFERENCE_PRECISION_HINT": "f32", "LP_TRANSFORMS_MODE": False,
                                   "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0})}
            for name, run in runs.items():
                try:
                    out, integer = run(path)
                except Exception as error:  # an OpenVINO build without the internal property
                    print(f"  {name:<36} not available: {str(error).splitlines()[0][:80]}")
                    continue
                differ = int((out.argmax(1) != reference.argmax(1)).sum())
                print(f"  {name:<36} {100 * (out.argmax(1) == y).mean():6.2f}%  {differ:4d} predictions differ  "
                      f"{integer:2d} integer convs / matmuls", flush=True)


if __name__ == "__main__":
    main()
