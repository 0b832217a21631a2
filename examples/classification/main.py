"""Classification sample: any torchvision classifier, compressed from a config, fine-tuned, exported.

    python examples/classification/main.py --config examples/configs/resnet18_int8.json \
        [--arch mobilenet_v2] [--dataset digits|imagefolder|cifar10|cifar100 --data DIR] \
        [--input-size 224] [--weights fp32.pth] [--mode train|test|export] [--resume runs/last.pt]
    torchrun --nproc_per_node=2 examples/classification/main.py --config ...

The default data are scikit-learn's digits resized to the model's input (no download). The
architecture comes from ``--arch``, else the config's ``model``; the class count from the data
(the config's ``num_classes`` must agree). See docs/samples.md.
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
import torchvision  # noqa: E402
from torch import Tensor, nn  # noqa: E402

# isort: split
from classification.data import DATASETS, load_classification_data  # noqa: E402
from sample_runner import (  # noqa: E402
    RunResult,
    SampleError,
    SampleParts,
    add_common_args,
    command_line,
    run_sample,
)

DEFAULT_CONFIG = EXAMPLES / "configs" / "resnet18_int8.json"
DEFAULT_ARCH = "resnet18"
EFFICIENTNET_SIZES = {"b0": 224, "b1": 240, "b2": 288, "b3": 300, "b4": 380, "b5": 456, "b6": 528, "b7": 600}
MIN_INPUT = {"inception_v3": 75}
AUX_MIN_INPUT = 299  # below 299 px the auxiliary head pools a map (17x17 at 299) smaller than its 5x5 conv
AUX_WEIGHT = 0.4  # torchvision's reference recipe for Inception v3's auxiliary logits


def default_input_size(arch: str) -> int:
    """299 for inception_v3, EfficientNet's own resolution per variant, 224 otherwise."""
    if arch == "inception_v3":
        return 299
    if arch.startswith("efficientnet_") and arch.split("_")[-1] in EFFICIENTNET_SIZES:
        return EFFICIENTNET_SIZES[arch.split("_")[-1]]
    return 224


def build_model(arch: str, num_classes: int, input_size: int) -> nn.Module:
    """``torchvision.models.get_model(arch, weights=None, num_classes=...)`` (never downloads).

    Inception v3 keeps its auxiliary classifier at 299 px and above (below, the head's 5x5 conv
    does not fit the map it pools); GoogLeNet keeps its two.
    """
    known = torchvision.models.list_models(module=torchvision.models)
    if arch not in known:
        raise SampleError(f"unknown --arch {arch!r}; expected a torchvision classification model, e.g. "
                          f"resnet18, mobilenet_v2, inception_v3, efficientnet_b0 ({len(known)} in all)")
    if input_size < MIN_INPUT.get(arch, 16):
        raise SampleError(f"--input-size {input_size} is too small for {arch}; expected >= {MIN_INPUT.get(arch, 16)}")
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **aux_kwargs(arch, input_size))


def aux_kwargs(arch: str, input_size: int) -> dict[str, Any]:
    """``get_model`` keywords of the architectures with auxiliary classifiers (else none)."""
    if arch == "inception_v3":
        return {"aux_logits": input_size >= AUX_MIN_INPUT, "init_weights": True}
    if arch == "googlenet":  # its auxiliary heads pool adaptively: any input size feeds them
        return {"aux_logits": True, "init_weights": True}
    return {}


def classification_loss(outputs: Any, targets: Tensor) -> Tensor:
    """Cross entropy of the logits, plus ``AUX_WEIGHT`` x that of auxiliary logits (Inception, GoogLeNet)."""
    if isinstance(outputs, Tensor):
        return nn.functional.cross_entropy(outputs, targets)
    logits, *aux = outputs
    loss = nn.functional.cross_entropy(logits, targets)
    for extra in aux:
        if extra is not None:
            loss = loss + AUX_WEIGHT * nn.functional.cross_entropy(extra, targets)
    return loss


@torch.no_grad()
def accuracy(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]]) -> dict[str, float]:
    """Top-1 and top-5 accuracy in percent: the label is among the k largest logits."""
    top1 = top5 = total = 0
    for inputs, targets in batches:
        logits = model(inputs)
        k = min(5, logits.shape[1])
        best = logits.topk(k, dim=1).indices
        top1 += int((best[:, 0] == targets).sum())
        top5 += int((best == targets[:, None]).any(1).sum())
        total += len(targets)
    if total == 0:
        raise SampleError("the validation data yielded no sample")
    return {"top1 %": 100.0 * top1 / total, "top5 %": 100.0 * top5 / total}


def prepare(args: argparse.Namespace, config: Mapping[str, Any]) -> SampleParts:
    """Model, data and metric from the arguments (falling back on the config's ``model``, ``dataset``)."""
    arch = args.arch or config.get("model", DEFAULT_ARCH)
    size = args.input_size or default_input_size(arch)
    configured = config.get("dataset", "digits")
    configured = "imagefolder" if configured == "imagenet" else configured
    dataset = args.dataset or configured
    if dataset not in DATASETS:
        raise SampleError(f"dataset {dataset!r} (from --dataset or the config); expected one of {DATASETS} or imagenet")
    train, val, classes = load_classification_data(dataset, args.data, size)
    # the config's num_classes describes the config's data set; --dataset replacing it brings its own classes
    if dataset == configured and "num_classes" in config and int(config["num_classes"]) != classes:
        raise SampleError(f"the config's num_classes is {config['num_classes']}, the {dataset} data at "
                          f"{args.data} have {classes} classes")
    model = build_model(arch, classes, size)
    summary = {"model": arch, "dataset": dataset, "input": f"3x{size}x{size}", "classes": classes,
               "train / val samples": f"{len(train)} / {len(val)}"}
    return SampleParts(model, train, val, classification_loss, accuracy, (3, size, size), summary=summary)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, DEFAULT_CONFIG)
    ap.add_argument("--arch", default=None, help="torchvision model name; default: the config's 'model'")
    ap.add_argument("--dataset", choices=DATASETS, default=None, help="default: the config's 'dataset', else digits")
    ap.add_argument("--data", type=Path, default=None, help="data set directory (not for digits)")
    ap.add_argument("--input-size", type=int, default=None, help="square input side; default: the architecture's")
    return ap


def main(argv: list[str] | None = None) -> RunResult:
    return run_sample(parser().parse_args(argv), prepare)


if __name__ == "__main__":
    command_line(main)
