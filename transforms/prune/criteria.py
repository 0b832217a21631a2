"""Filter importance: per producer layer, then per channel class.

For the filters ``F_1..F_n`` of one layer (rows of the weight along its output axis, flattened):

- ``L1``: ``|F_i|_1``; ``L2``: ``|F_i|_2``;
- ``geometric_median`` (FPGM): ``sum_j |F_i - F_j|_2``; the filter closest to the layer's
  geometric median has the smallest sum and is the least important (most replaceable).

A class's importance (``unweighted_ranking``) averages the normalized importances
``imp_i / mean_j imp_j`` of its producer filters, so layers of any scale rank together.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from .groups import ChannelClass

CRITERIA = ("L1", "L2", "geometric_median")


def filter_rows(weight: Tensor, axis: int) -> Tensor:
    """``(n_filters, fan)`` matrix of the filters of ``weight`` along ``axis``."""
    w = weight.detach().float().movedim(axis, 0)
    return w.reshape(w.shape[0], -1)


def filter_importance(weight: Tensor, axis: int, criterion: str) -> Tensor:
    """Importance of each filter of ``weight`` (filters along ``axis``); see the module docstring."""
    rows = filter_rows(weight, axis)
    if criterion == "L1":
        return rows.abs().sum(dim=1)
    if criterion == "L2":
        return rows.norm(dim=1)
    if criterion == "geometric_median":
        return torch.cdist(rows[None], rows[None])[0].sum(dim=1)
    raise ValueError(f"unknown criterion {criterion!r}; expected one of {list(CRITERIA)}")


def class_importance(
    params: Mapping[str, Tensor], classes: Sequence[ChannelClass], criterion: str
) -> Tensor:
    """Importance of each class: the mean of its filters' layer-normalized importances."""
    layers = {(s.param, s.axis) for c in classes for s in c.filters}
    normalized = {}
    for name, axis in layers:
        imp = filter_importance(params[name], axis, criterion)
        normalized[name] = imp / imp.mean().clamp(min=1e-12)
    scores = [
        torch.stack([normalized[s.param][s.start] for s in c.filters]).mean() for c in classes
    ]
    return torch.stack(scores) if scores else torch.zeros(0)
