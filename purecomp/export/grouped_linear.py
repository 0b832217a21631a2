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

from collections.abc import Collection
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

from purecomp.errors import StateError
from purecomp.graph import ModelGraph
from purecomp.intercept import split_site

from .channel_order import permutable_producer, permute_output_rows
from .modules import Dequantize, QuantizeDequantize, integer_grid

MIN_INTEGER_CHANNELS = 32
"""Groups with fewer channels (but the largest) are computed together in one float matmul."""


class ChannelQuantizeDequantize(nn.Module):
    """``purecomp::qdq`` over the last axis with one scale and zero point per channel
    (``(clamp(round(x / s_c) + z_c, qmin, qmax) - z_c) * s_c``).

    Only for the float block, whose weights are stored dequantized: onnxruntime 1.31 fuses a
    per-channel activation DequantizeLinear -> MatMul <- DequantizeLinear (weights) into
    ``MatMulIntegerToFloat`` and then refuses to run it ("Per-Channel is not supported yet");
    with float weights it leaves the MatMul in float.
    """

    def __init__(self, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> None:
        super().__init__()
        self.register_buffer("scale", scale.reshape(-1).float())
        self.register_buffer("zero_point", zero_point.reshape(-1))
        self.qmin, self.qmax = qmin, qmax

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.purecomp.qdq(x, self.scale, self.zero_point, self.qmin, self.qmax, x.dim() - 1)


def blocks(sizes: list[int], min_integer_channels: int = MIN_INTEGER_CHANNELS) -> tuple[list[int], list[int]]:
    """``(integer, merged)`` group indices: the largest group and every group of at least
    ``min_integer_channels`` channels get an integer matmul each; the others share one float matmul.

    An integer matmul costs about as much for 2 input channels as for 300 (its cost is in writing
    the output, and the Add after it), so tiny outlier groups are cheaper in one float matmul.
    """
    largest = max(range(len(sizes)), key=lambda k: sizes[k])
    integer = [k for k, n in enumerate(sizes) if k == largest or n >= min_integer_channels]
    return integer, [k for k in range(len(sizes)) if k not in integer]


class GroupedLinear(nn.Module):
    """``out(sum_b parts[b](qdq[b](x_P[..., slice_b])) + bias)``; ``x_P`` is ``x`` in block order.

    Block ``b`` is one group quantized per tensor (an integer matmul in onnxruntime), or, last, the
    merged small groups quantized per channel (each channel with its group's scale and zero point:
    the same values), whose matmul runs in float.
    """

    def __init__(self, linear: nn.Linear, quantizer: Any, output: nn.Module | None = None,
                 min_integer_channels: int = MIN_INTEGER_CHANNELS) -> None:
        super().__init__()
        scale, zero_point, qmin, qmax = integer_grid(quantizer)
        members = quantizer.members()
        integer, merged = blocks([len(c) for c in members], min_integer_channels)
        order = [c for k in integer + merged for c in members[k]]
        self.register_buffer("order", _index(order))
        self.sizes = [len(members[k]) for k in integer] + ([sum(len(members[k]) for k in merged)] if merged else [])
        self.qdq = nn.ModuleList(QuantizeDequantize(scale[k], zero_point[k], qmin, qmax) for k in integer)
        if merged:
            group = _index([k for k in merged for _ in members[k]])
            self.qdq.append(ChannelQuantizeDequantize(scale[group], zero_point[group], qmin, qmax))
        self.parts = nn.ModuleList()
        quantized = parametrize.is_parametrized(linear, "weight")
        if quantized:
            dq = linear.parametrizations.weight[0]
            if not isinstance(dq, Dequantize) or (dq.scale.dim() and dq.axis != 0):
                raise StateError("a grouped linear needs its weight quantized per tensor or per output channel")
            columns = linear.parametrizations.weight.original[:, self.order]
        else:
            columns = linear.weight.detach()[:, self.order]
        for b, part_columns in enumerate(columns.split(self.sizes, dim=1)):
            part = nn.Linear(part_columns.shape[1], linear.out_features, bias=False)
            if quantized and b == len(integer):  # the float block: store its weights dequantized (same values)
                part.weight = nn.Parameter(Dequantize(dq.scale, dq.zero_point, 0)(part_columns), requires_grad=False)
            elif quantized:
                parametrize.register_parametrization(part, "weight", Dequantize(dq.scale, dq.zero_point, 0), unsafe=True)
                part.parametrizations.weight.original = nn.Parameter(part_columns.contiguous(), requires_grad=False)
            else:
                part.weight = nn.Parameter(part_columns.contiguous(), requires_grad=False)
            self.parts.append(part)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.output = output
        self.input_in_order = False  # True once the producer emits its channels in ``order``

    def row_parts(self) -> list[nn.Linear] | None:
        """The linears whose rows make up the output (``channel_order``); ``None`` with an output
        quantizer, which a row permutation would have to follow."""
        return None if self.output is not None else list(self.parts)

    def forward(self, x: Tensor) -> Tensor:
        permuted = x if self.input_in_order else x.movedim(-1, 0).index_select(0, self.order).movedim(0, -1)
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


def split_grouped_linear(model: nn.Module, key: str, quantizer: Any, graph: ModelGraph | None = None,
                         output: nn.Module | None = None, sites: Collection[str] = ()) -> None:
    """Replace the ``nn.Linear`` whose input quantizer is ``key`` (``<scope>/linear#0:in0``) by a
    ``GroupedLinear`` (in place) that applies ``output`` (the quantizer at ``output_key(key)``) to the
    whole sum. Raises ``StateError`` for any other kind of site, or when ``graph`` shows the module
    called more than once. With ``graph``, when the input is ``f(L1(x))`` (``channel_order``), the
    permutation moves into ``L1``'s rows; ``sites``: the keys of all activation transforms."""
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
    grouped = GroupedLinear(linear, quantizer, output)
    setattr(parent, attr, grouped)
    producer = permutable_producer(graph, site, sites) if graph is not None else None
    if producer is not None and permute_output_rows(model, producer, grouped.order):
        grouped.input_in_order = True
