"""Constant sparsity: keep the zeros a model already has while fine-tuning it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from purecomp.compression import Compression
from purecomp.init_context import InitContext
from purecomp.struct import struct

from .common import level_rows, masking_method, sparsified_weights, sparsity_table, zero_fraction


@struct
class ConstSparsityState:
    """``masks[name] = [w != 0]`` taken at init."""

    masks: dict[str, Tensor]

    def rows(self) -> list[dict]:
        total = sum(m.numel() for m in self.masks.values())
        zeros = sum(zero_fraction(m) * m.numel() for m in self.masks.values())
        return level_rows(self.masks, zeros / max(1, total))

    def statistics(self, graph: Any = None) -> dict[str, list[dict]]:
        return sparsity_table("ConstSparsity", self.rows())


def const_sparsity(
    *, ignored_scopes: Sequence[str] = (), target_scopes: Sequence[str] | None = None, origin: str = ""
) -> Compression:
    """Masks from the zeros of the weights at init; training cannot make them non-zero."""

    def init(context: InitContext) -> ConstSparsityState:
        names = sparsified_weights(context.graph, ignored_scopes, target_scopes, origin, context.scope)
        params = context.params
        return ConstSparsityState({n: (params[n].detach() != 0).to(params[n].dtype) for n in names})

    return masking_method(init, lambda state, progress, params=None: state, "const_sparsity")
