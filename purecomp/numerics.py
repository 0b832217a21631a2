"""Cheap checks that training has not turned compression state or weights into NaN / inf.

``check_finite(tree, what)`` sums every floating-point leaf into one small tensor and tests it
with a single ``isfinite`` (one device synchronization, one pass over the leaves); only when
that fails does it look for the leaf to name. The controller runs it on the trainable state
leaves (quantizer scales, RB logits: small) at every ``scheduler.step()``, and on the whole
state and every model parameter at ``scheduler.epoch_step()``.
"""

from __future__ import annotations

from collections.abc import Iterable

import optree
import torch
from torch import Tensor

from .errors import NumericalError
from .struct import NAMESPACE


def _named(tree: object, prefix: str) -> list[tuple[str, Tensor]]:
    paths, leaves, _ = optree.tree_flatten_with_path(tree, namespace=NAMESPACE)
    return [(prefix + "/".join(str(p) for p in path), leaf) for path, leaf in zip(paths, leaves)
            if isinstance(leaf, Tensor) and leaf.is_floating_point()]


def check_finite(named: Iterable[tuple[str, Tensor]], what: str) -> None:
    """``NumericalError`` naming the first tensor of ``named`` that holds NaN or inf."""
    named = [(n, t) for n, t in named if t.numel()]
    if not named:
        return
    with torch.no_grad():
        total = torch.stack([t.detach().float().sum().to(named[0][1].device) for _, t in named])
        if bool(torch.isfinite(total).all()):
            return
        for name, t in named:  # a sum may overflow where the values are finite: find a real culprit
            if not bool(torch.isfinite(t.detach()).all()):
                bad = int((~torch.isfinite(t.detach())).sum())
                raise NumericalError(f"{what}: {name} holds {bad} NaN or inf values of {t.numel()}; training "
                                     "diverged (check the learning rate, the loss and the data for NaN / inf)")


def state_leaves(state: object, trainable_only: bool) -> list[tuple[str, Tensor]]:
    """``(path, tensor)`` of the floating-point leaves of a compression state (``state/...``)."""
    return [(n, t) for n, t in _named(state, "state/") if t.requires_grad or not trainable_only]
