"""How a ``BinarizationState`` becomes export modules (``purecomp.export.rules``): binarized
weights as int8 signs behind a per-filter ``Dequantize`` (exactly ``sign * alpha``), activation
binarizers as ``BinarizeActivation`` at their sites. Only the enabled stages are exported."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from purecomp.errors import StateError
from purecomp.export.modules import BinarizeActivation, owner, store_integers
from purecomp.export.rules import ExportContext, ExportRule

CONV_INPUT_RANK = 4  # binarized inputs are those of conv2d


@dataclasses.dataclass(frozen=True)
class BinarizationExport(ExportRule):
    state: Any  # BinarizationState

    def encode_weights(self, context: ExportContext) -> None:
        if not self.state.weights_on:
            return
        if context.kept:
            raise StateError("materialize does not combine filter pruning with binarization; materialize one of them")
        for name in self.state.weights:
            if name in context.encoded:
                raise StateError(f"weight {name!r} is encoded twice (binarized after another method encoded it): "
                                 "materialize supports one quantization or binarization method per weight in a chain")
            w = context.params[name].detach().float()
            dims = tuple(range(1, w.dim()))
            alpha = w.abs().amax(dim=dims) if dims else w.abs()
            signs = torch.where(w > 0, 1, -1).to(torch.int8)
            module, attr = owner(context.model, name)
            store_integers(module, attr, signs, alpha.contiguous(), torch.zeros_like(alpha, dtype=torch.int8), 0)
            context.encoded[name] = False  # a BatchNorm after a binarized conv stays unfolded

    def site_modules(self, context: ExportContext) -> None:
        if not self.state.activations_on:
            return
        if context.kept:
            raise StateError("materialize does not combine filter pruning with binarization; materialize one of them")
        graph = context.graph
        for key, b in self.state.activations.items():
            if key in context.modules:
                raise StateError(f"two activation transforms at {key!r}: materialize supports one quantizer or "
                                 "binarizer per site")
            site = key.rsplit(":", 1)[0]
            rank = len(graph.node(site).input_info[0].shape) if graph is not None and graph.has_site(site) else CONV_INPUT_RANK
            with torch.no_grad():
                scale = b.scale.detach().float()
                threshold = scale.reshape(()) * b.threshold.detach().float()
            context.modules[key] = BinarizeActivation(scale, threshold, b.axis % rank, rank)
            context.handled.add(key)
