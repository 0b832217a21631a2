"""Object detection sample: SSD300 (VGG16-BN) on Pascal VOC, compressed from a config, mAP@0.5.

    python examples/object_detection/main.py --config examples/configs/ssd300_voc_int8.json \\
        --data ~/data/VOCdevkit --backbone-weights vgg16_bn.pth --epochs 10

``--data`` is a VOCdevkit directory (``VOC2007/``, ``VOC2012/`` inside); ``--train-sets`` and
``--test-set`` pick the image lists. The exported ONNX file holds the network up to its raw
outputs ``(locations [N, 8732, 4], confidences [N, 8732, C])``; decoding and NMS
(``boxes.detect``) run in Python, as in this sample's evaluation. See docs/samples.md.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from purecomp.checkpoint import load_torch

EXAMPLES = Path(__file__).resolve().parents[1]
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

import sample_runner as sr  # noqa: E402

from object_detection.boxes import detect  # noqa: E402
from object_detection.loss import MultiBoxLoss  # noqa: E402
from object_detection.model import INPUT_SIZE, SSD300, default_boxes  # noqa: E402
from object_detection.voc import VOCDetection, collate, read_classes  # noqa: E402
from object_detection.voc_map import ImageTruth, VOCEvaluator  # noqa: E402

DEFAULT_CONFIG = EXAMPLES / "configs" / "ssd300_voc_int8.json"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sr.add_common_args(parser, DEFAULT_CONFIG)
    parser.add_argument("--data", type=Path, required=True, help="VOCdevkit directory holding VOC2007/, VOC2012/")
    parser.add_argument("--train-sets", default="2007:trainval,2012:trainval", help="YEAR:SET,... to train on")
    parser.add_argument("--test-set", default="2007:test", help="YEAR:SET,... to evaluate on")
    parser.add_argument("--classes", default=None,
                        help="class names: a file (one per line) or 'a,b,c'; default: the 20 VOC classes")
    parser.add_argument("--backbone-weights", type=Path, default=None,
                        help="torchvision vgg16_bn state_dict (ImageNet) for the backbone; never downloaded")
    parser.add_argument("--width", type=float, default=1.0,
                        help="channel multiplier; 1.0 is SSD300 (smaller only for smoke tests: same boxes and layout)")
    parser.add_argument("--score-threshold", type=float, default=0.01, help="detections kept for mAP above this score")
    parser.add_argument("--nms-threshold", type=float, default=0.45)
    parser.add_argument("--top-k", type=int, default=200, help="detections kept per image")
    return parser.parse_args(argv)


def make_evaluate(priors: torch.Tensor, classes: Sequence[str], args: argparse.Namespace) -> sr.Evaluate:
    """``evaluate(model, batches) -> {"mAP@0.5": ..., "AP <class>": ...}`` (VOC2010+ all-point AP)."""

    def evaluate(model: nn.Module, batches: Iterable[Any]) -> sr.Metrics:
        evaluator = VOCEvaluator(len(classes))
        for images, targets in batches:
            loc, conf = model(images)
            for target, (boxes, scores, labels) in zip(
                targets, detect(loc, conf, priors, args.score_threshold, args.nms_threshold, args.top_k)
            ):
                truth = ImageTruth(target[:, :4], target[:, 4].long(), target[:, 5].bool())
                evaluator.add(truth, boxes, scores, labels)
        mean, per_class = evaluator.compute()
        return {"mAP@0.5": mean, **{f"AP {name}": ap for name, ap in zip(classes, per_class)}}

    return evaluate


def prepare(args: argparse.Namespace, config: Mapping[str, Any]) -> sr.SampleParts:
    """SSD300 over the class list, VOC train / test sets, MultiBox loss, VOC mAP."""
    classes = read_classes(args.classes)
    model = SSD300(len(classes) + 1, width=args.width)
    if args.backbone_weights is not None:
        if not args.backbone_weights.is_file():
            raise sr.WeightsError(f"--backbone-weights {args.backbone_weights} does not exist")
        model.load_backbone(load_torch(args.backbone_weights))
    priors = default_boxes()
    train_set = VOCDetection(args.data, args.train_sets, classes, INPUT_SIZE, train=True)
    test_set = VOCDetection(args.data, args.test_set, classes, INPUT_SIZE, train=False)
    return sr.SampleParts(
        model=model, train_set=train_set, val_set=test_set, criterion=MultiBoxLoss(priors),
        evaluate=make_evaluate(priors, classes, args), input_shape=(3, INPUT_SIZE, INPUT_SIZE),
        collate_fn=collate, agreement=(1, 2), drop_last=True,  # the 1x1 map's BatchNorm needs 2 images
        summary={"model": f"SSD300 VGG16-BN (width {args.width:g})" if args.width != 1 else "SSD300 VGG16-BN",
                 "classes": len(classes), "train images": len(train_set), "test images": len(test_set)},
    )


def main(argv: Sequence[str] | None = None) -> sr.RunResult:
    return sr.run_sample(parse_args(argv), prepare)


if __name__ == "__main__":
    main()
