"""``binarization(...)``: 1-bit weights and activations for 2D convolutions, as a ``Compression``."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from purecomp.compression import Compression, Progress
from purecomp.errors import CalibrationError, ConfigError
from purecomp.graph import ModelGraph, OpNode
from purecomp.init_context import InitContext
from purecomp.scopes import Scope, select_sites
from purecomp.struct import replace, static_field, struct

from .binarizer import WEIGHT_MODES, ActivationBinarizer, binarize_weight
from .staged import StagedSchedule

SCALE_QUANTILE = 0.999  # the activation scale starts at this quantile of the calibration inputs


@struct
class BinarizationState:
    """Binarized weights by parameter name, activation binarizers by input key (``<conv site>:in0``).

    ``weights_on`` / ``activations_on`` are the stages of the staged schedule.
    """

    activations: dict[str, ActivationBinarizer]
    weights: tuple[str, ...] = static_field()
    mode: str = static_field()
    weights_on: bool = static_field(default=True)
    activations_on: bool = static_field(default=True)

    def statistics(self, graph: Any = None) -> dict[str, list[dict[str, Any]]]:
        """The ``binarization`` table (``rows``)."""
        return {"binarization": self.rows()}

    def compression_progress(self) -> float:
        """The share of the two stages (weights, activations) that are on."""
        return (int(self.weights_on) + int(self.activations_on)) / 2

    def export_rule(self) -> Any:
        from .export_rule import BinarizationExport

        return BinarizationExport(self)

    def rows(self) -> list[dict[str, Any]]:
        rows = [
            {"binarized": name, "kind": "weight", "mode": self.mode, "enabled": self.weights_on, "scale": "", "threshold": ""}
            for name in self.weights
        ]
        for key, b in self.activations.items():
            t = b.threshold.detach()
            rows.append({
                "binarized": key, "kind": "activation", "mode": "scale-threshold", "enabled": self.activations_on,
                "scale": float(b.scale.detach()),
                "threshold": f"{float(t.min()):.3f}..{float(t.max()):.3f}",
            })
        return rows


def binarized_convs(
    graph: ModelGraph, ignored: Sequence[str], targets: Sequence[str] | None, origin: str, scope: Scope | None = None
) -> list[OpNode]:
    """The ``conv2d`` calls left by the scopes (and ``scope``) whose weight is a parameter and input a float tensor."""
    allowed = select_sites(graph, ignored, targets, origin, scope)
    return [
        node for node in graph
        if node.op == "conv2d" and node.site in allowed and len(node.inputs) > 1
        and node.inputs[1].kind == "param" and node.inputs[0].kind in ("node", "input")
        and node.input_info[0].is_float
    ]


def _top_quantile(x: Tensor, q: float) -> float:
    """The smallest of the top ``1 - q`` fraction of ``x`` (at least one element)."""
    flat = x.detach().reshape(-1).float()
    k = max(1, round(flat.numel() * (1 - q)))
    return float(flat.topk(k).values.min())


def calibrate_scales(context: InitContext, keys: Sequence[str], num_samples: int) -> dict[str, float]:
    """Mean over calibration batches of each input's top-0.1% value (``SCALE_QUANTILE``)."""
    seen: dict[str, list[float]] = {key: [] for key in keys}
    context.calibrate(keys, lambda key, x: seen[key].append(_top_quantile(x, SCALE_QUANTILE)), num_samples,
                      "binarization init")
    scales = {}
    for key, values in seen.items():
        if not values:
            raise CalibrationError(f"binarization init: the input {key} was never computed on the calibration data")
        scale = sum(values) / len(values)
        if not scale > 0:
            raise CalibrationError(
                f"binarization init: the input {key} has no positive values on the calibration data "
                f"(top-0.1% value {scale:.4g}); binarize inputs that follow a ReLU or similar, or ignore this conv"
            )
        scales[key] = scale
    return scales


def binarization(
    mode: str = "xnor",
    *,
    schedule: StagedSchedule | None = None,
    ignored_scopes: Sequence[str] = (),
    target_scopes: Sequence[str] | None = None,
    num_init_samples: int = 256,
    origin: str = "",
) -> Compression:
    """Binarize the weights (``mode``: xnor, dorefa) and the inputs of every selected ``conv2d``.

    Weights: ``sign(W) * mean(|W|)`` per output filter (xnor) or per tensor (dorefa),
    straight-through. Inputs: ``s * H(x - s t)`` (``ActivationBinarizer``), ``s`` starting at
    the top-0.1% value of the input on ``num_init_samples`` calibration samples, ``t`` at 0.5.
    ``schedule`` (default: both on from epoch 1, NNCF's default) turns each on at its epoch;
    ``step(state, progress)`` follows ``progress.epoch``. At init (epoch 0) both are off unless
    the schedule starts them at 0.
    """
    if mode not in WEIGHT_MODES:
        raise ConfigError(f"{origin}mode", f"expected one of {list(WEIGHT_MODES)}, got {mode!r}")
    if num_init_samples <= 0:
        raise ConfigError(f"{origin}num_init_samples", f"expected a positive number of samples, got {num_init_samples}")
    staged = schedule or StagedSchedule()

    def init(context: InitContext) -> BinarizationState:
        graph, params = context.graph, context.params
        convs = binarized_convs(graph, ignored_scopes, target_scopes, origin, context.scope)
        if not convs:
            raise ConfigError(f"{origin}ignored_scopes", "no conv2d is left to binarize; expected at least one")
        weights = tuple(dict.fromkeys(node.inputs[1].name for node in convs))
        keys = [f"{node.site}:in0" for node in convs]
        scales = calibrate_scales(context, keys, num_init_samples)
        device = params[weights[0]].device  # the binarizers live where the model does
        binarizers = {
            f"{node.site}:in0": ActivationBinarizer(
                torch.tensor([math.log(scales[f"{node.site}:in0"])], device=device, requires_grad=True),
                torch.zeros(node.input_info[0].shape[1], device=device, requires_grad=True),
            )
            for node in convs
        }
        stage = staged.stage(0)
        return BinarizationState(binarizers, weights, mode, stage.weights, stage.activations)

    def params_fn(params: Mapping[str, Tensor], state: BinarizationState) -> dict[str, Tensor]:
        out = dict(params)
        if state.weights_on:
            for name in state.weights:
                out[name] = binarize_weight(out[name], state.mode)
        return out

    def sites(state: BinarizationState) -> dict[str, Any]:
        return dict(state.activations) if state.activations_on else {}

    def loss(params: Mapping[str, Tensor], state: BinarizationState) -> Tensor:
        return torch.zeros(())

    def step(state: BinarizationState, progress: Progress, params: Any = None) -> BinarizationState:
        stage = staged.stage(progress.epoch)
        if (stage.weights, stage.activations) == (state.weights_on, state.activations_on):
            return state
        return replace(state, weights_on=stage.weights, activations_on=stage.activations)

    return Compression(init, params_fn, sites, loss, step, name="binarization")
