"""What sparsity methods share: which weights they mask, and masks as a pure weight transform."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from purecomp.compression import Compression
from purecomp.graph import ModelGraph
from purecomp.op_kinds import EMBEDDING_OPS
from purecomp.scopes import Scope, select_sites
from purecomp.transforms.quantize.placement import weight_targets


def sparsified_weights(
    graph: ModelGraph, ignored_scopes: Sequence[str], target_scopes: Sequence[str] | None, origin: str,
    scope: Scope | None = None,
) -> list[str]:
    """Weight parameters of the selected conv, conv-transpose, linear and matmul ops (not embeddings);
    ``scope`` (``InitContext.scope``) restricts the sites further."""
    allowed = select_sites(graph, ignored_scopes, target_scopes, origin, scope)
    return [t.param for t in weight_targets(graph, allowed) if t.op not in EMBEDDING_OPS]


def masking_method(init: Callable[[Any], Any], step: Callable[..., Any], name: str) -> Compression:
    """A method whose weight transform is ``w * mask`` for ``state.masks``, with no site and no loss."""
    return Compression(
        init=init,
        params=lambda params, state: apply_masks(params, state.masks),
        sites=lambda state: {},
        loss=lambda params, state: torch.zeros(()),
        step=step,
        name=name,
    )


def apply_masks(params: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``w * mask`` for every masked weight."""
    out = dict(params)
    for name, mask in masks.items():
        out[name] = out[name] * mask
    return out


def sparsity_table(method: str, rows: list[dict]) -> dict[str, list[dict]]:
    """The ``sparsity`` table of the statistics report: ``rows`` tagged with the method's name."""
    return {"sparsity": [{"method": method, **row} for row in rows]}


def zero_fraction(mask: Tensor) -> float:
    return float((mask == 0).sum()) / max(1, mask.numel())


def level_rows(masks: Mapping[str, Tensor], target: float) -> list[dict]:
    """Per-layer rows (and a global row) of actual sparsity against the target level."""
    rows = [
        {"weight": name, "shape": tuple(mask.shape), "sparsity": zero_fraction(mask), "target": target}
        for name, mask in masks.items()
    ]
    total = sum(m.numel() for m in masks.values())
    zeros = sum(int((m == 0).sum()) for m in masks.values())
    rows.append({"weight": "(all)", "shape": (total,), "sparsity": zeros / max(1, total), "target": target})
    return rows


def keep_largest(scores: Tensor, level: float) -> Tensor:
    """A 0/1 mask of ``scores``'s shape zeroing exactly ``round(level * numel)`` smallest entries
    (ties broken by position, so the level is met exactly)."""
    flat = scores.reshape(-1)
    drop = int(round(level * flat.numel()))
    mask = torch.ones_like(flat)
    if drop > 0:
        idx = torch.topk(flat, drop, largest=False, sorted=False).indices
        mask[idx] = 0.0
    return mask.reshape(scores.shape)
