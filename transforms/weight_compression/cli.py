"""``python -m purecomp compress-weights``: weight-only compression of a HuggingFace causal LM.

    python -m purecomp compress-weights --model DIR [--gguf-file F] --mode int4_sym --group-size 128
        [--group-size-fallback error|ignore|adjust] [--ratio R] [--awq] [--scale-estimation] [--gptq] [--dataset TEXT_FILE] --out DIR
        [--onnx [--onnx-accuracy-level 0|4]]

Loads the model (and its tokenizer) from a local folder (never from the network), compresses it
with ``compress_weights``, writes it with ``save_compressed`` (reload with
``purecomp.transforms.weight_compression.load_compressed(DIR)``) and the tokenizer beside it, with
``--onnx`` also ``DIR/model.onnx`` (``export_compressed``: ``MatMulNBits`` weights, a KV cache), and
prints a summary: layers and weights per precision, size before and after, time.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from purecomp.errors import ConfigError

from .api import compress_weights, state_from_model
from .grid import MODES
from .saving import save_compressed


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=Path, help="local folder of a HuggingFace causal LM")
    p.add_argument("--gguf-file", help="a GGUF file inside --model to load (transformers dequantizes it to float)")
    p.add_argument("--mode", default="int8_asym", choices=sorted(MODES), help="weight format (default int8_asym)")
    p.add_argument("--group-size", type=int, help="input channels per scale (default: 128 for 4-bit modes, "
                   "per output channel for 8-bit)")
    p.add_argument("--group-size-fallback", default="error", choices=["error", "ignore", "adjust"],
                   help="layers whose input size --group-size does not divide: refuse (default), leave them in the "
                        "backup mode, or use the largest group size that divides")
    p.add_argument("--ratio", type=float, help="share of the weights in --mode, the rest in the backup mode")
    p.add_argument("--backup-mode", choices=["int8_asym", "int8_sym", "none"])
    p.add_argument("--all-layers", action="store_true", help="compress embeddings and the LM head in --mode too")
    p.add_argument("--awq", action="store_true", help="activation-aware scaling (needs --dataset)")
    p.add_argument("--scale-estimation", action="store_true", help="refine group scales (needs --dataset)")
    p.add_argument("--gptq", action="store_true", help="GPTQ error compensation (needs --dataset)")
    p.add_argument("--dataset", type=Path, help="a UTF-8 text file for calibration")
    p.add_argument("--subset-size", type=int, default=128, help="calibration sequences (default 128)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per calibration sequence (default 128)")
    p.add_argument("--out", required=True, type=Path, help="folder to write the compressed model to")
    p.add_argument("--onnx", action="store_true",
                   help="also write OUT/model.onnx for ONNX Runtime (MatMulNBits weights, KV cache)")
    p.add_argument("--onnx-accuracy-level", type=int, default=0, choices=[0, 4],
                   help="MatMulNBits accuracy level: 0 computes as PyTorch (default), 4 quantizes activations "
                        "to int8 inside ONNX Runtime (faster, not PyTorch's arithmetic)")


def text_dataset(tokenizer: Any, path: Path, seq_len: int, count: int) -> list[dict[str, torch.Tensor]]:
    """``count`` consecutive, non-overlapping ``seq_len``-token windows of the text file, each
    ``{"input_ids": [1, seq_len]}``; ``ConfigError`` when the text is shorter than one window."""
    if seq_len < 1 or count < 1:
        raise ConfigError("--seq-len / --subset-size", f"expected positive integers, got {seq_len} and {count}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("--dataset", f"cannot read {str(path)!r} as UTF-8 text: {exc}") from None
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    windows = min(count, len(ids) // seq_len)
    if windows == 0:
        raise ConfigError("--dataset", f"{str(path)!r} has {len(ids)} tokens; expected at least --seq-len "
                          f"({seq_len})")
    return [{"input_ids": ids[i * seq_len:(i + 1) * seq_len].unsqueeze(0)} for i in range(windows)]


def model_bytes(model: nn.Module) -> int:
    """Bytes of the distinct tensors of ``model.state_dict()`` (tied weights counted once)."""
    seen, total = set(), 0
    for value in model.state_dict().values():
        if isinstance(value, torch.Tensor):
            key = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
            if key not in seen:
                seen.add(key)
                total += value.numel() * value.element_size()
    return total


def summary(model: nn.Module, before: int, after: int, seconds: float) -> str:
    """Markdown: layers and weights per precision, size before and after, time."""
    state = state_from_model(model)
    layers: Counter[str] = Counter()
    weights: Counter[str] = Counter()
    for packed in state.weights.values():
        layers[packed.label] += 1
        weights[packed.label] += packed.shape[0] * packed.shape[1]
    for numel in state.float_weights.values():
        layers["float"] += 1
        weights["float"] += numel
    total = sum(weights.values()) or 1
    lines = ["| precision | layers | weights | share of weights |", "|---|---|---|---|"]
    lines += [f"| {label} | {layers[label]} | {weights[label]:,} | {100 * weights[label] / total:.1f}% |"
              for label in sorted(layers)]
    lines += ["", f"size: {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB ({after / before:.3f}x); "
              f"compression time {seconds:.1f} s"]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not args.model.is_dir():
        raise ConfigError("--model", f"{str(args.model)!r} is not a folder; expected a local HuggingFace model folder")
    if (args.awq or args.scale_estimation or args.gptq) and args.dataset is None:
        raise ConfigError("--dataset", "--awq, --scale-estimation and --gptq need calibration text; expected --dataset")
    if args.onnx and args.mode == "nf4":
        raise ConfigError("--onnx", "nf4 weights index a codebook that MatMulNBits cannot hold; expected an "
                          "int4 or int8 --mode with --onnx")
    load = {"gguf_file": args.gguf_file} if args.gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True, **load)
    model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True, dtype=torch.float32,
                                                 **load).eval()
    before = model_bytes(model)
    dataset = None if args.dataset is None else text_dataset(tokenizer, args.dataset, args.seq_len, args.subset_size)
    options = {"awq": args.awq, "scale_estimation": args.scale_estimation, "gptq": args.gptq}
    t0 = time.perf_counter()
    compress_weights(model, mode=args.mode, ratio=args.ratio, group_size=args.group_size,
                     all_layers=args.all_layers or None, dataset=dataset, subset_size=args.subset_size,
                     backup_mode=args.backup_mode,
                     advanced_parameters={"group_size_fallback_mode": args.group_size_fallback},
                     **{k: True for k, v in options.items() if v})
    seconds = time.perf_counter() - t0
    save_compressed(model, args.out)
    tokenizer.save_pretrained(args.out)
    print(summary(model, before, model_bytes(model), seconds))
    if args.onnx:
        from .export_onnx import export_compressed, file_bytes

        path = export_compressed(model, args.out / "model.onnx", accuracy_level=args.onnx_accuracy_level)
        print(f"ONNX: {path} ({file_bytes(path) / 2**20:.1f} MiB)")
    print(f"written to {args.out}")
    return 0
