"""How a ``QuantizationState`` becomes export modules (``purecomp.export.rules``).

Weights are stored as integers on their quantizer's grid behind ``Dequantize`` (symmetric ones
may take a BatchNorm fold); every per-tensor activation quantizer becomes a
``QuantizeDequantize`` at its site (moved to the conv's output when its BatchNorm was folded),
repeated at consumers that read it only through shape ops; a grouped input quantizer turns its
linear into a ``GroupedLinear``; quantized embeddings gather integer rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from torch import nn

from purecomp.errors import StateError
from purecomp.export.embedding import replace_quantized_embeddings
from purecomp.export.grouped_linear import output_key, split_grouped_linear
from purecomp.export.modules import QuantizeDequantize, owner, quantize_weight
from purecomp.export.pruning import slice_quantizer
from purecomp.export.rules import ExportContext, ExportRule
from purecomp.graph import ModelGraph
from purecomp.intercept import split_site
from purecomp.op_kinds import SHAPE_OPS

from .grouped import GroupedQuantizer
from .placement import activation_positions, source_of


@dataclasses.dataclass(frozen=True)
class QuantizationExport(ExportRule):
    state: Any  # QuantizationState

    def encode_weights(self, context: ExportContext) -> None:
        for name, quantizer in self.state.weights.items():
            if name in context.encoded:
                raise StateError(f"weight {name!r} is encoded twice: materialize supports one quantization method "
                                 "per weight in a chain")
            quantizer = slice_quantizer(quantizer, context.kept.get(name, {}))
            module, attr = owner(context.model, name)
            quantize_weight(module, attr, context.params[name], quantizer)
            context.encoded[name] = quantizer.mode == "symmetric"

    def site_modules(self, context: ExportContext) -> None:
        graph = context.graph
        for key, quantizer in self.state.activations.items():
            context.handled.add(key)
            if isinstance(quantizer, GroupedQuantizer):
                if context.kept:
                    raise StateError("materialize does not combine filter pruning with grouped quantizers")
                continue
            target = context.remap.get(key, key)
            if any(isinstance(m, QuantizeDequantize) for m in _parts(context.modules.get(target))):
                raise StateError(f"two activation transforms at {key!r} are quantizers: materialize supports one quantizer per site")
            context.add_site_module(target, QuantizeDequantize.of(quantizer))
            if graph is not None:
                for site in requantized_inputs(graph, key, self.state.consumers_of(key)):
                    context.modules[site] = QuantizeDequantize.of(quantizer)

    def finish(self, context: ExportContext) -> None:
        keys = set(context.modules)
        for key, quantizer in self.state.activations.items():
            if isinstance(quantizer, GroupedQuantizer):
                output = context.modules.pop(output_key(key), None)
                split_grouped_linear(context.model, key, quantizer, context.graph, output=output, sites=keys)
        replace_quantized_embeddings(context.model, keep=scopes_with_sites(context.modules, "embedding"))


def _parts(module: Any) -> list[Any]:
    """``module`` and, for a ``Sequential`` of site transforms, its members."""
    if module is None:
        return []
    return list(module) if isinstance(module, nn.Sequential) else [module]


def scopes_with_sites(modules: Mapping[str, Any], op: str) -> set[str]:
    """Module scopes that hold an activation transform at a call of ``op`` (their calls must stay as they are)."""
    scopes = set()
    for key in modules:
        site = key.rpartition(":")[0]
        if "#" not in site:
            continue  # a model input ("input:<name>")
        scope, kind, _ = split_site(site)
        if kind == op:
            scopes.add(scope)
    return scopes


def requantized_inputs(graph: ModelGraph, key: str, consumers: tuple[str, ...]) -> list[str]:
    """Consumer inputs that reach quantizer ``key`` only through shape ops (flatten, view...).

    Repeating the quantize-dequantize there changes no value (it is idempotent on the grid) and
    spares runtimes from moving DequantizeLinear across the shape op themselves (onnxruntime
    fails to do so for int8 zero points).
    """
    sites = []
    for site in consumers:
        if not graph.has_site(site):
            continue
        node = graph.node(site)
        for k in activation_positions(graph, node):
            ref = node.inputs[k]
            if ref.kind == "node" and ref.key != key and source_of(graph, ref).key == key:
                if graph.node(ref.name).op in SHAPE_OPS:
                    sites.append(f"{site}:in{k}")
    return sites
