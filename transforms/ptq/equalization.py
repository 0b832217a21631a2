"""Cross-layer equalization (CLE) and high-bias absorption for conv -> activation -> conv pairs.

For ``y = W2 f(W1 x + b1) + b2`` with ``f`` positively homogeneous per channel (ReLU, identity),
scaling output channel ``c`` of the first layer by ``1 / s_c`` and input channel ``c`` of the
second by ``s_c`` computes the same function. With ``r1_c = max|W1[c]|`` and ``r2_c =
max|W2[:, c]|`` (``max|W2[c]|`` for a depthwise second layer), ``s_c = sqrt(r1_c / r2_c)``
makes both ranges ``sqrt(r1_c r2_c)``: per-tensor weight quantizers then lose less on the
channels that had small ranges (Nagel et al., 2019). ReLU6 is not homogeneous: its upper
clip moves with the channel, so the pair's ReLU6 module becomes a ``ChannelClip`` with bound
``6 / s_c`` (the same function). Passes repeat so chains of pairs converge.

High-bias absorption: when the first layer's pre-activation ``z_c`` stays above ``a_c >= 0``
on the calibration data, ``relu(z) = relu(z - a) + a`` there, so ``b1_c -= a_c`` and the second
layer's bias takes ``sum_k W2[o, c, k] a_c``. Only into a second layer without padding: a
zero-padded border would see ``0`` where the moved constant ``a_c`` should be, so the result
would differ there (on 32x32 inputs a resnet's deep layers are mostly border).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from purecomp.calibration import run_observers
from purecomp.graph import ModelGraph, OpNode, TensorRef

HOMOGENEOUS_OPS = frozenset({"relu", "identity"})
CLIPPED_OPS = frozenset({"hardtanh"})
EPS = 1e-12


class ChannelClip(nn.Module):
    """``clamp(x, 0, upper[c])`` along axis 1: a ReLU6 whose channels were rescaled."""

    def __init__(self, upper: Tensor) -> None:
        super().__init__()
        self.register_buffer("upper", upper.detach().clone().float())

    def forward(self, x: Tensor) -> Tensor:
        shape = [1, -1] + [1] * (x.dim() - 2)
        return torch.minimum(torch.relu(x), self.upper.reshape(shape).to(x.dtype))


@dataclasses.dataclass(frozen=True)
class EqualizationPair:
    """Two layers (module scopes) with one channel-wise activation between them (``None``: none)."""

    first: str
    second: str
    activation: str | None
    activation_op: str


def _single_reader(graph: ModelGraph, node: OpNode) -> OpNode | None:
    ref = TensorRef("node", node.site, 0)
    readers = graph.consumers(ref)
    if len(readers) != 1 or readers[0][1] != 0 or ref in graph.outputs:
        return None
    return readers[0][0]


def _conv(model: nn.Module, node: OpNode | None) -> nn.Conv2d | None:
    if node is None or node.op != "conv2d" or not node.scope or node.index != 0:
        return None
    module = model.get_submodule(node.scope)
    return module if type(module) is nn.Conv2d and module.padding_mode == "zeros" else None


def _relu6(module: nn.Module) -> bool:
    return isinstance(module, nn.ReLU6) or (type(module) is nn.Hardtanh and module.min_val == 0.0) \
        or isinstance(module, ChannelClip)


def equalization_pairs(model: nn.Module, graph: ModelGraph) -> list[EqualizationPair]:
    """The conv2d -> (ReLU / ReLU6 module / nothing) -> conv2d pairs of ``graph`` where each
    tensor in between has exactly one reader, the first conv is plain or depthwise, and the
    second reads all of the first one's channels (plain) or one each (depthwise)."""
    pairs = []
    for node in graph:
        first = _conv(model, node)
        if first is None:
            continue
        after = _single_reader(graph, node)
        activation, op = None, "identity"
        clip = model.get_submodule(after.scope) if after is not None and after.scope else None
        if isinstance(clip, ChannelClip) and after.op == "relu":  # relu then minimum, inside the module
            activation, op = after.scope, "hardtanh"
            after = _single_reader(graph, after)
            after = _single_reader(graph, after) if after is not None and after.op == "minimum" else None
        elif after is not None and after.op in HOMOGENEOUS_OPS | CLIPPED_OPS:
            if after.op in CLIPPED_OPS and not (after.scope and _relu6(model.get_submodule(after.scope))):
                continue
            activation, op = after.scope or None, after.op
            after = _single_reader(graph, after)
        second = _conv(model, after)
        if second is None or second.in_channels != first.out_channels:
            continue
        if second.groups not in (1, second.in_channels):
            continue
        pairs.append(EqualizationPair(node.scope, after.scope, activation, op))
    return pairs


def _second_ranges(second: nn.Conv2d) -> Tensor:
    w = second.weight.detach()
    if second.groups == 1:
        return w.abs().amax(dim=(0, 2, 3))
    return w.abs().amax(dim=(1, 2, 3))


def _scale_second(second: nn.Conv2d, s: Tensor) -> None:
    if second.groups == 1:
        second.weight.mul_(s.reshape(1, -1, 1, 1))
    else:  # depthwise: channel c in is channel c out, and the output is scaled back by s_c
        second.weight.mul_(s.reshape(-1, 1, 1, 1))


def equalize_pair(model: nn.Module, pair: EqualizationPair) -> Tensor:
    """Equalize one pair in place; returns the scales ``s`` (channel ``c`` of the first layer / ``s_c``)."""
    first = model.get_submodule(pair.first)
    second = model.get_submodule(pair.second)
    with torch.no_grad():
        r1 = first.weight.detach().abs().amax(dim=(1, 2, 3))
        r2 = _second_ranges(second)
        s = torch.where((r1 > EPS) & (r2 > EPS), (r1 / r2.clamp(min=EPS)).sqrt(), torch.ones_like(r1))
        first.weight.div_(s.reshape(-1, 1, 1, 1))
        if first.bias is not None:
            first.bias.div_(s)
        _scale_second(second, s)
        if pair.activation is not None and pair.activation_op in CLIPPED_OPS:
            clip = model.get_submodule(pair.activation)
            upper = clip.upper if isinstance(clip, ChannelClip) else torch.full_like(s, float(clip.max_val))
            _replace(model, pair.activation, ChannelClip(upper / s))
    return s


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    path, _, attr = name.rpartition(".")
    setattr(model.get_submodule(path) if path else model, attr, module)


def cross_layer_equalization(model: nn.Module, graph: ModelGraph, passes: int = 4) -> list[EqualizationPair]:
    """Equalize every pair of ``equalization_pairs`` in place, ``passes`` times over (a chain
    of pairs shares layers); returns the pairs. ``model`` should have its BatchNorms folded."""
    pairs = equalization_pairs(model, graph)
    for _ in range(passes):
        for pair in pairs:
            equalize_pair(model, pair)
    return pairs


def absorb_high_biases(
    model: nn.Module, graph: ModelGraph, pairs: Iterable[EqualizationPair], data: Iterable[Any], num_samples: int,
) -> dict[str, Tensor]:
    """Move the always-active part of each ReLU / ReLU6 pair's first bias into the second layer
    (module docstring); ``a_c`` is the smallest pre-activation seen on ``num_samples`` samples,
    floored at 0. Returns ``{first scope: a}``."""
    chosen = [p for p in pairs if p.activation_op != "identity"
              and not any(model.get_submodule(p.second).padding)]
    sites = {f"{p.first}/conv2d#0:out0": p for p in chosen}
    lowest: dict[str, Tensor] = {}

    def record(key: str, x: Tensor) -> None:
        low = x.detach().float().transpose(0, 1).reshape(x.shape[1], -1).amin(dim=1)
        lowest[key] = low if key not in lowest else torch.minimum(lowest[key], low)

    params = dict(model.named_parameters()) | dict(model.named_buffers())
    run_observers(model, params, dict, list(sites), record, data, num_samples, "bias absorption")
    absorbed = {}
    with torch.no_grad():
        for key, pair in sites.items():
            first, second = model.get_submodule(pair.first), model.get_submodule(pair.second)
            a = lowest.get(key, torch.zeros(first.out_channels)).clamp(min=0)
            if first.bias is None or not bool((a > 0).any()):
                continue
            if pair.activation_op in CLIPPED_OPS:
                clip = model.get_submodule(pair.activation)
                upper = clip.upper if isinstance(clip, ChannelClip) else torch.full_like(a, float(clip.max_val))
                a = torch.minimum(a, upper)  # above the clip the output is constant: move at most the clip
                _replace(model, pair.activation, ChannelClip(upper - a))
            first.bias.sub_(a)
            w = second.weight.detach()
            shift = (w.sum(dim=(2, 3)) @ a) if second.groups == 1 else w.sum(dim=(1, 2, 3)) * a
            if second.bias is None:
                second.bias = nn.Parameter(torch.zeros(second.out_channels, dtype=w.dtype))
            second.bias.add_(shift)
            absorbed[pair.first] = a
    return absorbed
