"""Export form of a quantized ``nn.Embedding``: gather the integer rows, then dequantize only those.

With integer table ``Q``, scale ``s`` and zero point ``z`` (one value, or one per row / column),
``E[ids] = (Q[ids] - z[ids]) * s[ids]`` (per row) or ``(Q[ids] - z) * s`` (per tensor / column): the
same values as looking up the dequantized table, without dequantizing the whole table on every call.
ONNX: ``Gather`` on the int8 initializer, then ``DequantizeLinear`` (per tensor / column) or, per
row, ``Gather`` of the row scales and zero points and ``(Cast(q) - z) * s`` (DequantizeLinear takes
1-D per-axis parameters only, and a row's parameters vary along the lookup's leading axes).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

from purecomp.errors import StateError

from .modules import Dequantize


class QuantizedEmbedding(nn.Module):
    """``dq(Q[ids])``: an eval-mode ``nn.Embedding`` lookup over an integer table."""

    def __init__(self, ints: Tensor, scale: Tensor, zero_point: Tensor, axis: int) -> None:
        super().__init__()
        if ints.dim() != 2:
            raise StateError(f"an embedding table is 2-D, got shape {tuple(ints.shape)}")
        if axis not in (0, 1):
            raise StateError(f"an embedding table is quantized per row (0) or per column (1), got axis {axis}")
        self.per_row = axis == 0 and scale.dim() > 0
        self.register_buffer("ints", ints.detach())
        # per row: (rows, 1) tables, looked up like the integer table
        self.register_buffer("scale", scale.detach().float().reshape(-1, 1) if self.per_row else scale.detach().float())
        self.register_buffer("zero_point", zero_point.detach().reshape(-1, 1) if self.per_row else zero_point.detach())

    def forward(self, ids: Tensor) -> Tensor:
        rows = F.embedding(ids, self.ints)
        if not self.per_row:
            return torch.ops.purecomp.dq(rows, self.scale, self.zero_point, rows.dim() - 1)
        zero_point = F.embedding(ids, self.zero_point).to(torch.float32)
        return (rows.to(torch.float32) - zero_point) * F.embedding(ids, self.scale)

    def extra_repr(self) -> str:
        kind = "per row" if self.per_row else ("per column" if self.scale.dim() else "per tensor")
        return f"{self.ints.shape[0]}, {self.ints.shape[1]}, {self.ints.dtype}, {kind}"


def quantized_embedding(module: nn.Module) -> QuantizedEmbedding | None:
    """The export form of ``module`` when it is a plain ``nn.Embedding`` whose weight is stored as
    integers behind a ``Dequantize`` parametrization (and has no ``max_norm``, which rewrites rows
    of the float table); ``None`` otherwise."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    if parametrize.type_before_parametrizations(module) is not nn.Embedding or module.max_norm is not None:
        return None
    chain = module.parametrizations.weight
    if len(chain) != 1 or not isinstance(chain[0], Dequantize):
        return None
    dq = chain[0]
    return QuantizedEmbedding(chain.original, dq.scale, dq.zero_point, dq.axis)


def replace_quantized_embeddings(model: nn.Module, keep: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """Swap every quantized plain ``nn.Embedding`` of ``model`` (in place) for a
    ``QuantizedEmbedding``, except the module names in ``keep``; returns the swapped names."""
    swapped = []
    for name, module in list(model.named_modules()):
        if not name or name in keep:
            continue
        export_form = quantized_embedding(module)
        if export_form is None:
            continue
        path, _, attr = name.rpartition(".")
        setattr(model.get_submodule(path) if path else model, attr, export_form)
        swapped.append(name)
    return swapped
