"""ONNX Runtime and OpenVINO latency: FP32 export vs purecomp INT8 export of resnet18 (3x224x224).

    python bench/export_speed.py [--batches 1 16] [--repeats 20] [--threads 2]

Both files come from ``purecomp.export.to_onnx`` (the FP32 one with ``purecomp.identity()``).
Runs alternate FP32 and INT8 call by call after a warm-up; medians and FP32/INT8 speed-ups
are printed. OpenVINO compiles the FP32 file with the f32 inference precision hint.
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


def build(tmp: Path) -> tuple[Path, Path]:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(2, 3, 224, 224)
    params = dict(model.named_parameters())
    graph = pc.trace(model, (x,))
    method = pc.quantization(weights=dict(per_channel=True), activations=dict(mode="asymmetric"))
    state = method.init(graph, params, [torch.randn(8, 3, 224, 224) for _ in range(2)])
    fp32 = export.to_onnx(model, pc.identity(), params, (), (x,), tmp / "resnet18_fp32.onnx")
    int8 = export.to_onnx(model, method, params, state, (x,), tmp / "resnet18_int8.onnx")
    return fp32, int8


def alternate(runners: dict[str, callable], repeats: int, warmup: int = 3) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in runners}
    for i in range(warmup + repeats):
        for k, run in runners.items():
            start = time.perf_counter()
            run()
            if i >= warmup:
                times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def ort_runner(path: Path, x: np.ndarray, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x}
    return lambda: session.run(None, feed)


def openvino_runner(path: Path, x: np.ndarray, threads: int, f32: bool):
    import openvino as ov

    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": threads}
    if f32:
        config["INFERENCE_PRECISION_HINT"] = "f32"
    compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
    request = compiled.create_infer_request()
    return lambda: request.infer([x])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        fp32, int8 = build(Path(tmp))
        print(f"files: FP32 {fp32.stat().st_size / 2**20:.1f} MiB, INT8 {int8.stat().st_size / 2**20:.1f} MiB; "
              f"onnxruntime fused ops: {dict(export.fused_op_counts(int8))}")
        print(f"{'runtime':<12}{'batch':>6}{'FP32 ms':>10}{'INT8 ms':>10}{'speed-up':>10}")
        for batch in args.batches:
            x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224), dtype=np.float32)
            rows = {"onnxruntime": (ort_runner(fp32, x, args.threads), ort_runner(int8, x, args.threads))}
            try:
                rows["openvino"] = (openvino_runner(fp32, x, args.threads, True), openvino_runner(int8, x, args.threads, False))
            except ImportError:
                print("openvino is not installed: skipping it (pip install purecomp[openvino])")
            for name, (a, b) in rows.items():
                med = alternate({"fp32": a, "int8": b}, args.repeats)
                print(f"{name:<12}{batch:>6}{med['fp32']:>10.1f}{med['int8']:>10.1f}{med['fp32'] / med['int8']:>10.2f}")


if __name__ == "__main__":
    main()
