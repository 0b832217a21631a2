"""Bit complexity of a precision assignment: ``sum_ops FLOPs(op) * bits(op)``.

An op with a quantized weight runs at ``max(weight bits, input activation bits)``. FLOPs of each
op come from ``torch.utils.flop_counter`` replaying the recorded call on meta tensors of the
recorded shapes. ``compression ratio = complexity(all 8 bits) / complexity(candidate)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from purecomp.errors import StateError
from purecomp.graph import ModelGraph, OpNode
from purecomp.op_kinds import CONV_OPS, CONV_TRANSPOSE_OPS, EMBEDDING_OPS
from purecomp.transforms.quantize.placement import ActivationTarget, WeightTarget

_CONV_OPTIONS = ("stride", "padding", "dilation", "groups")
_CONV_TRANSPOSE_OPTIONS = ("stride", "padding", "output_padding", "groups", "dilation")
REFERENCE_BITS = 8


def op_flops(node: OpNode) -> int:
    """FLOPs of one recorded op call (2 per multiply-add), counted by ``FlopCounterMode``."""
    if node.op in EMBEDDING_OPS:
        return 0
    fn = getattr(F, node.op, None) or getattr(torch, node.op, None)
    if fn is None:
        raise StateError(f"cannot count FLOPs of {node.site}: no torch function named {node.op!r}")
    names = _CONV_OPTIONS if node.op in CONV_OPS else _CONV_TRANSPOSE_OPTIONS if node.op in CONV_TRANSPOSE_OPS else ()
    options = {k: v for k, v in ((n, node.option(n)) for n in names) if v is not None}
    inputs = [torch.zeros(info.shape, dtype=info.dtype, device="meta") for info in node.input_info]
    counter = FlopCounterMode(display=False)
    try:
        with counter:
            fn(*inputs, **options)
    except Exception as exc:
        raise StateError(f"cannot count FLOPs of {node.site} ({node.op}): {type(exc).__name__}: {exc}") from exc
    return int(counter.get_total_flops())


@dataclasses.dataclass(frozen=True)
class CostModel:
    """FLOPs of each op reading a quantized weight, which weights and activation quantizers feed it.

    - ``weight_sites``: weight name -> sites of the ops reading it
    - ``activation_consumers``: activation key -> the weighted sites it feeds
    - ``flops``: site -> FLOPs
    """

    weight_sites: dict[str, tuple[str, ...]]
    activation_consumers: dict[str, tuple[str, ...]]
    flops: dict[str, int]

    @classmethod
    def build(cls, graph: ModelGraph, weights: Sequence[WeightTarget], activations: Sequence[ActivationTarget]) -> CostModel:
        weight_sites = {t.param: t.readers for t in weights}
        weighted = {s for sites in weight_sites.values() for s in sites}
        consumers = {a.key: tuple(s for s in a.consumers if s in weighted) for a in activations}
        flops = {site: op_flops(graph.node(site)) for site in sorted(weighted)}
        return cls(weight_sites, consumers, flops)

    def site_weights(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for name, sites in self.weight_sites.items():
            for s in sites:
                out.setdefault(s, []).append(name)
        return out

    def activation_bits(self, weight_bits: Mapping[str, int], mode: str, default: int) -> dict[str, int]:
        """Bits of each activation quantizer given the weights' bits.

        ``strict``: the widest weight among the ops it feeds (groups make them all equal);
        ``liberal``: the narrowest. An activation feeding no weighted op keeps ``default``."""
        by_site = self.site_weights()
        out = {}
        for key, sites in self.activation_consumers.items():
            widths = [weight_bits[w] for s in sites for w in by_site.get(s, ())]
            pick = max if mode == "strict" else min
            out[key] = pick(widths) if widths else default
        return out

    def complexity(self, weight_bits: Mapping[str, int], activation_bits: Mapping[str, int]) -> float:
        """``sum_ops FLOPs(op) * max(weight bits, input activation bits)``."""
        inputs: dict[str, list[int]] = {}
        for key, sites in self.activation_consumers.items():
            for s in sites:
                inputs.setdefault(s, []).append(activation_bits[key])
        total = 0.0
        for site, names in self.site_weights().items():
            total += self.flops[site] * max([weight_bits[n] for n in names] + inputs.get(site, []))
        return total

    def reference(self) -> float:
        """Complexity with every quantizer at 8 bits."""
        return float(sum(self.flops.values()) * REFERENCE_BITS)

    def groups(self) -> list[tuple[str, ...]]:
        """Weights whose ops share a quantized input (connected components): strict mode gives
        each group one bit width, so every op's input and weight agree."""
        parent = {w: w for w in self.weight_sites}

        def find(w: str) -> str:
            while parent[w] != w:
                parent[w] = parent[parent[w]]
                w = parent[w]
            return w

        by_site = self.site_weights()
        for sites in self.activation_consumers.values():
            members = [w for s in sites for w in by_site.get(s, ())]
            for other in members[1:]:
                parent[find(other)] = find(members[0])
        groups: dict[str, list[str]] = {}
        for w in self.weight_sites:
            groups.setdefault(find(w), []).append(w)
        return [tuple(g) for g in groups.values()]
