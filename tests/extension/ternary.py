"""A compression method written outside purecomp: ternary weights with clipped activations.

It uses only the public extension points (``purecomp.Compression``, ``InitContext``, state
structs, ``purecomp.register_algorithm``, an export rule) and is the example docs/concepts.md
("Writing your own method") walks through.

Weights of each selected conv / linear become ``alpha * t`` with ``t`` in {-1, 0, +1}
(ternary weight networks): ``t = sign(w) [|w| > delta]``, ``delta = factor * mean|w|`` and
``alpha = mean of |w| over |w| > delta``, per output channel, with a straight-through gradient.
Their inputs are clipped to ``[-c, c]`` with a trainable ``c`` (one per site, initialised from
calibration: the largest absolute input seen). Both turn on at ``start_epoch``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

import purecomp as pc
from purecomp.export.modules import owner, store_integers
from purecomp.export.rules import ExportContext, ExportRule
from purecomp.scopes import select_sites
from purecomp.struct import replace, static_field, struct

TERNARY_OPS = ("conv2d", "linear")


def ternarize(weight: Tensor, factor: float) -> Tensor:
    """``alpha * sign(w) [|w| > delta]`` per output channel (axis 0), straight-through in backward."""
    w = weight.detach()
    dims = tuple(range(1, w.dim()))
    delta = factor * w.abs().mean(dim=dims, keepdim=True)
    keep = (w.abs() > delta).to(w.dtype)
    alpha = (w.abs() * keep).sum(dim=dims, keepdim=True) / keep.sum(dim=dims, keepdim=True).clamp(min=1)
    ternary = alpha * torch.sign(w) * keep
    return ternary + (weight - weight.detach())  # exactly ternary; gradient 1 to the float weight


@struct
class Clip:
    """``clamp(x, -|c|, |c|)``: gradient 1 inside for ``x``, ``sign(x) sign(c)`` outside for ``c``."""

    bound: Tensor

    def __call__(self, x: Tensor) -> Tensor:
        c = self.bound.abs()
        return torch.minimum(torch.maximum(x, -c), c)


@struct
class TernaryState:
    """Clip bounds by site key (trainable), the ternarized weight names and the stage flag."""

    clips: dict[str, Clip]
    weights: tuple[str, ...] = static_field()
    factor: float = static_field()
    enabled: bool = static_field(default=False)

    # -- the extension protocol (purecomp.protocol) --
    def statistics(self, graph: Any = None) -> dict[str, list[dict[str, Any]]]:
        rows = [{"site": key, "kind": "clip", "bound": float(c.bound.detach().abs()), "enabled": self.enabled}
                for key, c in self.clips.items()]
        return {"ternarization": rows}

    def compression_progress(self) -> float:
        return 1.0 if self.enabled else 0.0

    def export_rule(self) -> ExportRule:
        return TernaryExport(self)


class ClipModule(nn.Module):
    """Export form of ``Clip``: ONNX ``Clip`` with constant bounds."""

    def __init__(self, bound: float) -> None:
        super().__init__()
        self.bound = bound

    def forward(self, x: Tensor) -> Tensor:
        return torch.clamp(x, -self.bound, self.bound)


@dataclasses.dataclass(frozen=True)
class TernaryExport(ExportRule):
    """Ternary weights as int8 {-1, 0, 1} behind a per-channel ``Dequantize`` (exactly
    ``alpha * t``; a BatchNorm after them folds into ``alpha``), clips as ``ClipModule``."""

    state: TernaryState

    def encode_weights(self, context: ExportContext) -> None:
        if not self.state.enabled:
            return
        for name in self.state.weights:
            w = context.params[name].detach()  # already ternarized by the weight transform
            dims = tuple(range(1, w.dim()))
            alpha = w.abs().amax(dim=dims)
            signs = torch.sign(w).to(torch.int8)
            module, attr = owner(context.model, name)
            store_integers(module, attr, signs, alpha.clamp(min=1e-12), torch.zeros_like(alpha, dtype=torch.int8), 0)
            context.encoded[name] = True

    def site_modules(self, context: ExportContext) -> None:
        if not self.state.enabled:
            return
        for key, clip in self.state.clips.items():
            context.modules[context.remap.get(key, key)] = ClipModule(float(clip.bound.detach().abs()))
            context.handled.add(key)


def ternarization(
    *, factor: float = 0.7, start_epoch: int = 0, ignored_scopes: tuple[str, ...] = (),
    target_scopes: tuple[str, ...] | None = None, num_init_samples: int = 16,
) -> pc.Compression:
    """Ternary weights and clipped inputs for every selected conv2d / linear."""

    def init(context: pc.InitContext) -> TernaryState:
        graph = context.graph
        allowed = select_sites(graph, ignored_scopes, target_scopes, "", context.scope)
        nodes = [n for n in graph if n.site in allowed and n.op in TERNARY_OPS and len(n.inputs) > 1
                 and n.inputs[1].kind == "param"]
        weights = tuple(dict.fromkeys(n.inputs[1].name for n in nodes))
        keys = [f"{n.site}:in0" for n in nodes]
        largest = dict.fromkeys(keys, 0.0)

        def record(key: str, x: Tensor) -> None:
            largest[key] = max(largest[key], float(x.detach().abs().max()))

        context.calibrate(keys, record, num_init_samples, "ternary clip init")
        device = context.params[weights[0]].device if weights else torch.device("cpu")
        clips = {k: Clip(torch.tensor(max(v, 1e-3), device=device, requires_grad=True)) for k, v in largest.items()}
        return TernaryState(clips, weights, factor, enabled=start_epoch <= 0)

    def params_fn(params: Mapping[str, Tensor], state: TernaryState) -> dict[str, Tensor]:
        chosen = state.weights if state.enabled else ()
        return {**params, **{name: ternarize(params[name], state.factor) for name in chosen}}

    def sites(state: TernaryState) -> dict[str, Any]:
        return dict(state.clips) if state.enabled else {}

    def step(state: TernaryState, progress: pc.Progress, params: Any = None) -> TernaryState:
        return replace(state, enabled=progress.epoch >= start_epoch)

    return pc.Compression(init, params_fn, sites, lambda params, state: torch.zeros(()), step, name="ternarization")


SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["algorithm"],
    "properties": {
        "algorithm": {"const": "ternarization"},
        "factor": {"type": "number", "exclusiveMinimum": 0, "maximum": 2},
        "start_epoch": {"type": "integer", "minimum": 0},
        "num_init_samples": {"type": "integer", "minimum": 1},
        "ignored_scopes": {"$ref": "#/$defs/scopes"},
        "target_scopes": {"$ref": "#/$defs/scopes"},
    },
}


def ternarization_from_config(section: Mapping[str, Any], origin: str) -> pc.Compression:
    return ternarization(
        factor=section.get("factor", 0.7), start_epoch=section.get("start_epoch", 0),
        num_init_samples=section.get("num_init_samples", 16),
        ignored_scopes=tuple(section.get("ignored_scopes", ())), target_scopes=section.get("target_scopes"),
    )


def register() -> None:
    """The one line that plugs the method into configs and checkpoints."""
    pc.register_algorithm("ternarization", ternarization_from_config, schema=SCHEMA,
                          state_classes=(TernaryState, Clip))
