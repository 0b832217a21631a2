"""One command, one table: every algorithm on the digits CNN, measured in ONNX Runtime.

    python examples/results_table.py --dataset digits|mnist [--write docs/results.md] [--quick]

Trains the FP32 digits CNN once (``common.train_baseline``), then runs each example's pipeline on
a copy of it, in process: INT8 QAT and INT8 + 50% magnitude sparsity (``digits_demo``), 30%
filter pruning (``pruning_digits``), XNOR and DoReFa binarization (``binarization_digits``), HAWQ
4/8 and AutoQ 2/4/8 mixed precision with QAT (``mixed_precision_digits``, ``autoq_digits``).
Each compressed model is exported with ``purecomp.export.to_onnx`` and measured: top-1 accuracy
in PyTorch (``pc.apply``) and in onnxruntime, the ONNX file size, the bytes of its integer
(int8/int4) and float initializers, the fraction of zeros in its weight tensors, and the ORT
latency at batch 1 (median of ``--repeats`` calls after a warm-up, the models alternated call by
call). ``--write`` replaces this dataset's section of the markdown file (between
``<!-- results:DATASET -->`` and ``<!-- /results:DATASET -->``) with the table, the command, the
settings and the wall time; otherwise the section is printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import re
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import onnx
import torch
from autoq_digits import autoq_plan
from binarization_digits import binarize
from digits_demo import int8_calibrated, int8_qat, sparse_int8_method
from mixed_precision_digits import hawq_plan, plan_qat
from pruning_digits import prune
from sparsity_digits import finetune, onnx_zero_fraction
from tqdm.auto import tqdm

import purecomp as pc
from purecomp import export

from common import Baseline, accuracy, onnx_accuracy, onnx_latencies, train_baseline


@dataclasses.dataclass(frozen=True)
class Settings:
    """Epochs and search budgets of one run (FP32 training, then each algorithm's fine-tuning)."""

    fp32_epochs: int
    qat_epochs: int
    sparse_epochs: int
    prune_epochs: int
    binarize_epochs: int
    mixed_epochs: int
    hawq_points: int
    hawq_probes: int
    autoq_episodes: int
    autoq_warmup: int
    autoq_eval_subset: float


# The examples' defaults on digits; on MNIST (6,000 images of 28x28) fewer epochs and smaller
# searches, so that the whole command stays under 30 minutes on a 2-core machine.
DEFAULTS = {
    "digits": Settings(30, 5, 12, 12, 16, 8, 256, 200, 200, 20, 1.0),
    "mnist": Settings(6, 2, 3, 3, 3, 3, 64, 30, 60, 10, 0.5),
}
QUICK = Settings(1, 1, 1, 2, 1, 1, 16, 4, 4, 2, 0.25)  # smoke test only: numbers mean nothing


@dataclasses.dataclass
class Result:
    """One compressed model: what runs it (``pc.apply``) and the label of its weight bits."""

    name: str
    model: torch.nn.Module
    method: pc.Compression
    params: dict
    state: object
    bits: str


def weight_bits(state) -> str:
    """Weight bits per quantized/binarized tensor, in graph order (``8/4/4/4``), or ``32``."""
    bits: dict[str, int] = {}
    for member in state if isinstance(state, tuple) else (state,):
        if isinstance(member, pc.transforms.quantize.method.QuantizationState):
            bits |= {w: q.bits for w, q in member.weights.items()}
        elif isinstance(member, pc.transforms.binarize.method.BinarizationState):
            bits |= dict.fromkeys(member.weights, 1)
    return "/".join(str(b) for b in bits.values()) or "32"


def _result(name: str, parts: tuple) -> Result:
    model, method, _graph, params, state = parts
    return Result(name, model, method, params, state, weight_bits(state))


def run_algorithms(base: Baseline, s: Settings, seed: int) -> list[Result]:
    """FP32 and every algorithm on copies of ``base.model``, in a fixed order."""
    fp32_params = dict(base.model.named_parameters()) | dict(base.model.named_buffers())
    results = [Result("FP32", base.model, pc.identity(), fp32_params, (), "32")]

    def int8() -> Result:
        model, method, graph, params, state = int8_calibrated(base)
        int8_qat(model, method, params, state, base.train, s.qat_epochs)
        return _result("INT8 QAT", (model, method, graph, params, state))

    def sparse() -> Result:
        import copy

        model, method = copy.deepcopy(base.model), sparse_int8_method(s.sparse_epochs)
        graph, params, state = finetune(model, method, base.train, s.sparse_epochs, 3e-4, 0.0, 0.0,
                                        "INT8 + 50% sparsity")
        return _result("INT8 + 50% sparsity", (model, method, graph, params, state))

    def hawq() -> Result:
        report = hawq_plan(base, 1.5, (4, 8), s.hawq_points, s.hawq_probes, seed)
        return _result("HAWQ 4/8 QAT", plan_qat(base, report.plan, s.mixed_epochs, seed, "HAWQ QAT"))

    def autoq() -> Result:
        report = autoq_plan(base, 0.15, (2, 4, 8), s.autoq_episodes, s.autoq_warmup, s.autoq_eval_subset, seed)
        return _result("AutoQ 2/4/8 QAT", plan_qat(base, report.plan, s.mixed_epochs, seed, "AutoQ QAT"))

    runs: list[Callable[[], Result]] = [
        int8,
        sparse,
        lambda: _result("30% filter pruning", prune(base, s.prune_epochs, 0.3)),
        lambda: _result("XNOR binarization", binarize(base, "xnor", s.binarize_epochs, seed=seed)),
        lambda: _result("DoReFa binarization", binarize(base, "dorefa", s.binarize_epochs, seed=seed)),
        hawq,
        autoq,
    ]
    for run in tqdm(runs, desc="algorithms", disable=None):
        results.append(run())
    return results


def initializer_bytes(path: Path) -> tuple[int, int]:
    """(integer, float) initializer bytes of an ONNX file; int4/uint4 count half a byte each."""
    model = onnx.load(str(path))
    integer = floating = 0
    sub_byte = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4}
    for init in model.graph.initializer:
        n = 1
        for d in init.dims:
            n *= d
        if init.data_type in sub_byte:
            integer += (n + 1) // 2
        elif init.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8):
            integer += n
        else:
            floating += n * onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
    return integer, floating


def measure(results: list[Result], base: Baseline, out_dir: Path, repeats: int) -> list[dict]:
    """Export each result and measure it (accuracy, size, zeros, latency)."""
    example = base.train_set.tensors[0][:2]
    rows, paths = [], {}
    for r in tqdm(results, desc="export + ORT accuracy", disable=None):
        r.model.eval()
        fname = re.sub(r"[^a-z0-9]+", "_", r.name.lower()).strip("_") + ".onnx"
        path = export.to_onnx(r.model, r.method, r.params, r.state, (example,), out_dir / fname)
        paths[r.name] = path
        acc = accuracy(lambda x, r=r: pc.apply(r.model, r.method, r.params, r.state, x), base.test)
        integer, floating = initializer_bytes(path)
        rows.append(dict(name=r.name, bits=r.bits, acc=acc, ort=onnx_accuracy(path, base.test),
                         kib=path.stat().st_size / 1024, integer=integer, floating=floating,
                         zeros=onnx_zero_fraction(path)))
    latency = onnx_latencies(paths, example[:1], repeats=repeats, warmup=max(10, repeats // 10))
    for row in rows:
        row["ms"] = latency[row["name"]]
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | weight bits | PyTorch acc % | ORT acc % | drop (ORT) | ONNX KiB | int initializers B | "
        "float initializers B | weight zeros % | ORT ms (b=1) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    ort_fp32 = rows[0]["ort"]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['bits']} | {r['acc']:.2f} | {r['ort']:.2f} | {ort_fp32 - r['ort']:.2f} | "
            f"{r['kib']:.1f} | {r['integer']} | {r['floating']} | {100 * r['zeros']:.1f} | {r['ms']:.3f} |"
        )
    return "\n".join(lines)


def section(dataset: str, table: str, command: str, s: Settings, base: Baseline, wall: float, cpu: float) -> str:
    settings = ", ".join(f"{k} {v}" for k, v in dataclasses.asdict(s).items())
    return (
        f"<!-- results:{dataset} -->\n"
        f"`{command}` ({len(base.train_set)} train / {len(base.test_set)} test images; run "
        f"{datetime.date.today().isoformat()}, wall time {wall / 60:.1f} min, CPU time {cpu / 60:.1f} min on "
        f"{torch.get_num_threads()} threads)\n\nSettings: {settings}.\n\n{table}\n<!-- /results:{dataset} -->"
    )


def write_section(path: Path, dataset: str, text: str) -> None:
    """Replace the ``dataset`` section of ``path`` (markers included), or append it."""
    old = path.read_text() if path.exists() else ""
    pattern = re.compile(rf"<!-- results:{dataset} -->.*?<!-- /results:{dataset} -->", re.S)
    new = pattern.sub(lambda _: text, old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text + "\n"
    path.write_text(new)


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="digits", choices=sorted(DEFAULTS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=300, help="timed ORT calls per model")
    ap.add_argument("--quick", action="store_true", help="one-epoch smoke run (meaningless numbers)")
    ap.add_argument("--write", type=Path, default=None, help="markdown file whose section to replace")
    ap.add_argument("--out", type=Path, default=None, help="ONNX directory (default: a temporary one)")
    args = ap.parse_args(argv)
    command = "python examples/results_table.py " + " ".join(argv if argv is not None else sys.argv[1:])
    started, cpu_started = time.perf_counter(), time.process_time()
    s = QUICK if args.quick else DEFAULTS[args.dataset]
    base = train_baseline(args.dataset, s.fp32_epochs, args.seed)
    results = run_algorithms(base, s, args.seed)
    out_dir = args.out or Path(tempfile.mkdtemp(prefix="purecomp-results-"))
    rows = measure(results, base, out_dir, args.repeats)
    wall = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    text = section(args.dataset, markdown(rows), command.strip(), s, base, wall, cpu)
    if args.write:
        write_section(args.write, args.dataset, text)
    print(text)
    print(f"wall time {wall:.0f} s, CPU time {cpu:.0f} s")
    return text


if __name__ == "__main__":
    main()
