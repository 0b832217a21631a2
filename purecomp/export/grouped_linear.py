"""Export form of a linear whose input has a ``GroupedQuantizer``: one INT8 matmul per group.

With ``C_k`` the channels of group ``k`` and ``P = C_0 ++ C_1 ++ ...`` (group order),
``y = sum_k Q_k(x_P[..., o_k : o_k + |C_k|]) W[:, P][:, o_k : o_k + |C_k|]^T + b`` with ``o_k`` the
offset of group ``k`` in ``P``: the input's channels are permuted ONCE into group order, each group is
a contiguous Slice of that, and the weight columns are permuted to match when exporting. The
permutation is Transpose (channels first) -> Gather on axis 0 -> Transpose back: onnxruntime copies
whole rows on axis 0, about 4x faster than a Gather on the last axis, which copies one element at a
time. Linears reading the same tensor with the same groups (Q, K, V) export identical nodes, which
onnxruntime's common-subexpression elimination merges into one permutation. Each term is
QuantizeLinear/DequantizeLinear (group ``k``'s per-tensor scale and zero point) -> MatMul with the
integer weight columns behind DequantizeLinear (per-output-channel scales do not depend on the
column), which onnxruntime fuses into an integer matmul; then Add of the terms and the bias, and the
linear's output quantizer (if any) on the sum.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

from purecomp.errors import StateError
from purecomp.graph import ModelGraph
from purecomp.intercept import split_site
from purecomp.transforms.quantize.grouped import GroupedQuantizer


class GroupedLinear(nn.Module):
    """``out(sum_k parts[k](qdq[k](x_P[..., slice_k])) + bias)``; ``x_P`` is ``x`` in group order."""

    def __init__(self, linear: nn.Linear, quantizer: GroupedQuantizer, output: nn.Module | None = None) -> None:
        from .materialize import Dequantize, QuantizeDequantize, integer_grid

        super().__init__()
        scale, zero_point, qmin, qmax = integer_grid(quantizer)
        members = quantizer.members()
        self.register_buffer("order", _index([c for channels in members for c in channels]))
        self.sizes = [len(channels) for channels in members]
        self.qdq = nn.ModuleList(QuantizeDequantize(scale[k], zero_point[k], qmin, qmax) for k in range(len(members)))
        self.parts = nn.ModuleList()
        quantized = parametrize.is_parametrized(linear, "weight")
        if quantized:
            dq = linear.parametrizations.weight[0]
            if not isinstance(dq, Dequantize) or (dq.scale.dim() and dq.axis != 0):
                raise StateError("a grouped linear needs its weight quantized per tensor or per output channel")
            columns = linear.parametrizations.weight.original[:, self.order]
        else:
            columns = linear.weight.detach()[:, self.order]
        for part_columns in columns.split(self.sizes, dim=1):
            part = nn.Linear(part_columns.shape[1], linear.out_features, bias=False)
            if quantized:
                parametrize.register_parametrization(part, "weight", Dequantize(dq.scale, dq.zero_point, 0), unsafe=True)
                part.parametrizations.weight.original = nn.Parameter(part_columns.contiguous(), requires_grad=False)
            else:
                part.weight = nn.Parameter(part_columns.contiguous(), requires_grad=False)
            self.parts.append(part)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.output = output

    def forward(self, x: Tensor) -> Tensor:
        permuted = x.movedim(-1, 0).index_select(0, self.order).movedim(0, -1)
        out, offset = None, 0
        for size, qdq, part in zip(self.sizes, self.qdq, self.parts):
            term = F.linear(qdq(permuted.narrow(-1, offset, size)), part.weight)
            out = term if out is None else out + term
            offset += size
        if self.bias is not None:
            out = out + self.bias
        return out if self.output is None else self.output(out)


def _index(channels: list[int]) -> Tensor:
    return torch.tensor(channels, dtype=torch.long)


def output_key(key: str) -> str:
    """The output site of the linear whose grouped input quantizer is ``key``: ``<scope>/linear#0:out0``."""
    return f"{key.rpartition(':')[0]}:out0"


def split_grouped_linear(model: nn.Module, key: str, quantizer: GroupedQuantizer, graph: ModelGraph | None = None,
                         output: nn.Module | None = None) -> None:
    """Replace the ``nn.Linear`` whose input quantizer is ``key`` (``<scope>/linear#0:in0``) by a
    ``GroupedLinear`` (in place) that applies ``output`` (the quantizer at ``output_key(key)``) to the
    whole sum. Raises ``StateError`` for any other kind of site, or when ``graph`` shows the module
    called more than once."""
    site, _, port = key.rpartition(":")
    scope, kind, index = split_site(site) if site else ("", "", -1)
    if port != "in0" or kind != "linear" or index != 0 or not scope:
        raise StateError(f"cannot export the grouped quantizer {key!r}: expected the input of a module's first "
                         "linear call, '<module>/linear#0:in0'")
    path, _, attr = scope.rpartition(".")
    parent = model.get_submodule(path) if path else model
    linear = getattr(parent, attr, None)
    if not isinstance(linear, nn.Linear) or linear.in_features != len(quantizer.groups):
        raise StateError(f"cannot export the grouped quantizer {key!r}: {scope} is not an nn.Linear with "
                         f"{len(quantizer.groups)} input features")
    if graph is not None and graph.has_site(f"{scope}/linear#1"):
        raise StateError(f"cannot export the grouped quantizer {key!r}: {scope} is called more than once")
    setattr(parent, attr, GroupedLinear(linear, quantizer, output))
