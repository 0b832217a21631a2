"""Export form of a linear whose input has a ``GroupedQuantizer``: one INT8 matmul per group.

With ``C_k`` the channels of group ``k``, ``y = sum_k Q_k(x[..., C_k]) W[:, C_k]^T + b``. Each term
is Gather(x, C_k) -> QuantizeLinear/DequantizeLinear (per-tensor, group ``k``'s scale and zero
point) -> MatMul with the integer weight columns ``C_k`` behind DequantizeLinear (the per-output-
channel weight scales do not depend on the column, so slicing columns keeps them), then Add.
onnxruntime fuses each DQ -> MatMul <- DQ into an integer matmul, as for any QDQ linear.
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
    """``sum_k parts[k](qdq[k](x.index_select(-1, index_k))) + bias``."""

    def __init__(self, linear: nn.Linear, quantizer: GroupedQuantizer) -> None:
        from .materialize import Dequantize, QuantizeDequantize, integer_grid

        super().__init__()
        scale, zero_point, qmin, qmax = integer_grid(quantizer)
        self.qdq = nn.ModuleList()
        self.parts = nn.ModuleList()
        quantized = parametrize.is_parametrized(linear, "weight")
        for k, channels in enumerate(quantizer.members()):
            self.register_buffer(f"index{k}", _index(channels))
            self.qdq.append(QuantizeDequantize(scale[k], zero_point[k], qmin, qmax))
            part = nn.Linear(len(channels), linear.out_features, bias=False)
            if quantized:
                dq = linear.parametrizations.weight[0]
                if not isinstance(dq, Dequantize) or (dq.scale.dim() and dq.axis != 0):
                    raise StateError("a grouped linear needs its weight quantized per tensor or per output channel")
                ints = linear.parametrizations.weight.original[:, getattr(self, f"index{k}")]
                parametrize.register_parametrization(part, "weight", Dequantize(dq.scale, dq.zero_point, 0), unsafe=True)
                part.parametrizations.weight.original = nn.Parameter(ints.contiguous(), requires_grad=False)
            else:
                part.weight = nn.Parameter(linear.weight.detach()[:, getattr(self, f"index{k}")].clone(), requires_grad=False)
            self.parts.append(part)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        out = None
        for k, (qdq, part) in enumerate(zip(self.qdq, self.parts)):
            term = F.linear(qdq(x.index_select(-1, getattr(self, f"index{k}"))), part.weight)
            out = term if out is None else out + term
        return out if self.bias is None else out + self.bias


def _index(channels: list[int]) -> Tensor:
    return torch.tensor(channels, dtype=torch.long)


def split_grouped_linear(model: nn.Module, key: str, quantizer: GroupedQuantizer, graph: ModelGraph | None = None) -> None:
    """Replace the ``nn.Linear`` whose input quantizer is ``key`` (``<scope>/linear#0:in0``) by a
    ``GroupedLinear`` (in place). Raises ``StateError`` for any other kind of site, or when
    ``graph`` shows the module called more than once."""
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
    setattr(parent, attr, GroupedLinear(linear, quantizer))
