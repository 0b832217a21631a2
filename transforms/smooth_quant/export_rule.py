"""Export form of SmoothQuant: a constant ``Mul`` by ``1 / s`` at each smoothed linear's input
(before its activation quantizer, when one follows); the weights are exported as ``W diag(s)``
by whichever rule encodes them (or as float)."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import Tensor, nn

from purecomp.export.rules import ExportContext, ExportRule


class ScaleInput(nn.Module):
    """``x * inverse`` with a constant per-channel ``inverse`` (ONNX ``Mul``)."""

    def __init__(self, inverse: Tensor) -> None:
        super().__init__()
        self.register_buffer("inverse", inverse.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        return x * self.inverse.to(x.dtype)


@dataclasses.dataclass(frozen=True)
class SmoothQuantExport(ExportRule):
    state: Any  # SmoothQuantState

    def site_modules(self, context: ExportContext) -> None:
        for key, smoothing in self.state.inputs.items():
            context.add_site_module(context.remap.get(key, key), ScaleInput(smoothing.inverse))
            context.handled.add(key)
