"""Box geometry for SSD: IoU, the SSD offset coding, prior matching and NMS post-processing.

Boxes are ``(x0, y0, x1, y1)`` corner boxes in continuous coordinates (a pixel column ``i``
spans ``[i, i + 1)``), normalized to ``[0, 1]`` by the image size inside the model's world.
Default boxes (priors) are ``(cx, cy, w, h)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

VARIANCES = (0.1, 0.2)


def corners(boxes: Tensor) -> Tensor:
    """``(cx, cy, w, h) -> (cx - w/2, cy - h/2, cx + w/2, cy + h/2)``."""
    half = boxes[..., 2:] / 2
    return torch.cat([boxes[..., :2] - half, boxes[..., :2] + half], dim=-1)


def centers(boxes: Tensor) -> Tensor:
    """``(x0, y0, x1, y1) -> ((x0 + x1)/2, (y0 + y1)/2, x1 - x0, y1 - y0)``."""
    return torch.cat([(boxes[..., :2] + boxes[..., 2:]) / 2, boxes[..., 2:] - boxes[..., :2]], dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """``(x1 - x0) * (y1 - y0)``, 0 for empty boxes."""
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def iou(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise intersection over union ``|A n B| / (|A| + |B| - |A n B|)`` of [N, 4] and [M, 4] -> [N, M]."""
    top_left = torch.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=-1)
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return inter / union.clamp(min=1e-12)


def encode(matched: Tensor, priors: Tensor, variances: tuple[float, float] = VARIANCES) -> Tensor:
    """SSD offsets of corner boxes ``g`` against priors ``d = (cx, cy, w, h)``:

    ``t_xy = (g_cxy - d_cxy) / (v0 * d_wh)``, ``t_wh = log(g_wh / d_wh) / v1``.
    """
    g = centers(matched)
    t_xy = (g[..., :2] - priors[..., :2]) / (variances[0] * priors[..., 2:])
    t_wh = torch.log(g[..., 2:].clamp(min=1e-8) / priors[..., 2:]) / variances[1]
    return torch.cat([t_xy, t_wh], dim=-1)


def decode(offsets: Tensor, priors: Tensor, variances: tuple[float, float] = VARIANCES) -> Tensor:
    """Inverse of ``encode``: ``cxy = d_cxy + v0 t_xy d_wh``, ``wh = d_wh exp(v1 t_wh)``, as corners."""
    cxy = priors[..., :2] + variances[0] * offsets[..., :2] * priors[..., 2:]
    wh = priors[..., 2:] * torch.exp(variances[1] * offsets[..., 2:])
    return corners(torch.cat([cxy, wh], dim=-1))


def match(
    truths: Tensor, labels: Tensor, priors: Tensor, threshold: float = 0.5
) -> tuple[Tensor, Tensor]:
    """Assign each prior a ground-truth box (SSD matching) -> (encoded offsets [P, 4], labels [P]).

    Every prior takes the ground truth it overlaps most; priors whose best IoU is below
    ``threshold`` are background (label 0, object classes are ``labels + 1``). Each ground
    truth also claims its best prior whatever the IoU, so no object goes unmatched.
    """
    num_priors = priors.shape[0]
    if truths.numel() == 0:
        return (torch.zeros(num_priors, 4, dtype=priors.dtype, device=priors.device),
                torch.zeros(num_priors, dtype=torch.long, device=priors.device))
    overlaps = iou(truths, corners(priors))  # [G, P]
    best_truth_overlap, best_truth = overlaps.max(dim=0)
    best_prior = overlaps.argmax(dim=1)
    best_truth_overlap[best_prior] = 2.0
    best_truth[best_prior] = torch.arange(truths.shape[0], device=truths.device)
    conf = labels[best_truth] + 1
    conf[best_truth_overlap < threshold] = 0
    return encode(truths[best_truth], priors), conf


def detect(
    locations: Tensor,
    confidences: Tensor,
    priors: Tensor,
    score_threshold: float = 0.01,
    nms_threshold: float = 0.45,
    top_k: int = 200,
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Post-processing of one batch of raw outputs -> per image ``(boxes [K, 4], scores [K], labels [K])``.

    Softmax over classes, decode, drop background and scores below ``score_threshold``, per-class
    NMS at IoU ``nms_threshold``, keep the ``top_k`` best. Labels are 0-based object classes.
    """
    from torchvision.ops import batched_nms

    scores_all = torch.softmax(confidences.float(), dim=-1)
    results = []
    for loc, scores in zip(locations.float(), scores_all):
        boxes = decode(loc, priors).clamp(0, 1)
        object_scores = scores[:, 1:]
        keep = object_scores > score_threshold
        prior_idx, cls = keep.nonzero(as_tuple=True)
        cand_scores = object_scores[prior_idx, cls]
        if cand_scores.numel() > 20 * top_k:
            order = cand_scores.topk(20 * top_k).indices
            prior_idx, cls, cand_scores = prior_idx[order], cls[order], cand_scores[order]
        cand_boxes = boxes[prior_idx]
        kept = batched_nms(cand_boxes, cand_scores, cls, nms_threshold)[:top_k]
        results.append((cand_boxes[kept], cand_scores[kept], cls[kept]))
    return results
