"""Segmentation metrics from a confusion matrix, void pixels excluded."""
from __future__ import annotations

import torch
from torch import Tensor


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    """C[i, j] = number of pixels of true class i predicted as j, over pixels whose label != ignore_index."""
    keep = target != ignore_index
    index = target[keep] * num_classes + pred[keep]
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_per_class(conf: Tensor) -> Tensor:
    """IoU_k = C_kk / (sum_j C_kj + sum_i C_ik - C_kk); NaN for a class absent from labels and predictions."""
    conf = conf.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))


def mean_iou(conf: Tensor) -> float:
    """mIoU = mean of IoU_k over the classes present in the labels or predictions."""
    iou = iou_per_class(conf)
    present = ~iou.isnan()
    return float(iou[present].mean()) if present.any() else float("nan")


def pixel_accuracy(conf: Tensor) -> float:
    """sum_k C_kk / sum C: the fraction of non-void pixels labelled correctly."""
    total = conf.sum()
    return float(conf.diag().sum() / total) if total > 0 else float("nan")
