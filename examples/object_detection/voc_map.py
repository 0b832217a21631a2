"""Pascal VOC mAP at IoU 0.5, all-point interpolated average precision (the VOC2010+ rule).

Per class, detections of all images are sorted by score and matched greedily: a detection is
a true positive when its best-overlapping ground truth of that class in the same image has
IoU >= 0.5 and was not matched before; a repeated hit or an IoU below 0.5 is a false positive.
A best match that is a ``difficult`` object counts as neither, and difficult objects are not
in the recall's denominator. ``AP = sum_i (r_i - r_{i-1}) * p_interp(r_i)`` with
``p_interp(r) = max_{r' >= r} p(r')``. Classes without a non-difficult ground-truth object
have no AP (NaN) and are left out of the mean.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from .boxes import iou


@dataclass
class ImageTruth:
    """Ground truth of one image: corner boxes [K, 4] (any unit, same as the detections), labels, difficult."""

    boxes: Tensor
    labels: Tensor
    difficult: Tensor


@dataclass
class VOCEvaluator:
    """Collects detections and ground truth image by image; ``compute()`` gives per-class AP and mAP."""

    num_classes: int
    iou_threshold: float = 0.5
    truths: list[ImageTruth] = field(default_factory=list)
    detections: list[tuple[Tensor, Tensor, Tensor]] = field(default_factory=list)

    def add(self, truth: ImageTruth, boxes: Tensor, scores: Tensor, labels: Tensor) -> None:
        """One image: its ground truth and its detections (boxes [D, 4], scores [D], labels [D])."""
        self.truths.append(truth)
        self.detections.append((boxes.detach().cpu().float(), scores.detach().cpu().float(), labels.detach().cpu()))

    def class_ap(self, cls: int) -> float:
        records: list[tuple[float, int, int]] = []  # (score, image, detection index)
        for image, (_, scores, labels) in enumerate(self.detections):
            for d in (labels == cls).nonzero().flatten().tolist():
                records.append((float(scores[d]), image, d))
        records.sort(key=lambda r: -r[0])
        num_positive = sum(int(((t.labels == cls) & ~t.difficult.bool()).sum()) for t in self.truths)
        if num_positive == 0:
            return float("nan")
        used = [torch.zeros(int((t.labels == cls).sum()), dtype=torch.bool) for t in self.truths]
        tp = np.zeros(len(records))
        fp = np.zeros(len(records))
        for k, (_, image, d) in enumerate(records):
            truth = self.truths[image]
            mine = truth.labels == cls
            gt = truth.boxes[mine].float()
            if gt.numel() == 0:
                fp[k] = 1
                continue
            overlaps = iou(self.detections[image][0][d : d + 1], gt)[0]
            best = int(overlaps.argmax())
            if overlaps[best] < self.iou_threshold:
                fp[k] = 1
            elif bool(truth.difficult[mine][best]):
                continue
            elif used[image][best]:
                fp[k] = 1
            else:
                used[image][best] = True
                tp[k] = 1
        return average_precision(np.cumsum(tp) / num_positive, np.cumsum(tp) / np.maximum(np.cumsum(tp + fp), 1e-12))

    def compute(self) -> tuple[float, list[float]]:
        """(mAP over classes that have ground truth, per-class AP with NaN for absent classes)."""
        aps = [self.class_ap(c) for c in range(self.num_classes)]
        present = [a for a in aps if not np.isnan(a)]
        return (float(np.mean(present)) if present else float("nan")), aps


def average_precision(recall: np.ndarray, precision: np.ndarray) -> float:
    """All-point interpolated AP: area under the precision envelope ``max_{r' >= r} p(r')``."""
    r = np.concatenate([[0.0], recall, [1.0]])
    p = np.concatenate([[0.0], precision, [0.0]])
    p = np.maximum.accumulate(p[::-1])[::-1]
    steps = np.nonzero(r[1:] != r[:-1])[0]
    return float(np.sum((r[steps + 1] - r[steps]) * p[steps + 1]))
