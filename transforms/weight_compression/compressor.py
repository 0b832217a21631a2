"""From a precision plan to compressed weights: the per-layer step, with its hook.

Each weight with a ``LayerConfig`` becomes a ``PackedWeight``. The integers come from a
``LayerAlgorithm``: ``round_to_nearest`` (``grid.quantize``, data-free) or ``data_aware`` (AWQ,
scale estimation, GPTQ: ``awq.py``, ``scale_estimation.py``, ``gptq.py``), which receives the
statistics of the layer's calibration inputs (``layer_inputs.LayerInputs``) and returns the
integers and scales that replace round-to-nearest's, with AWQ's input scale when it set one
(``LayerResult``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from purecomp.errors import CalibrationError

from .awq import AWQParameters, awq_scale
from .gptq import GPTQParameters, gptq
from .grid import Quantized, mode_spec, quantize
from .layer_inputs import LayerInputs
from .precision import LayerConfig, Plan
from .scale_estimation import ScaleEstimationParameters, estimate_scales
from .state import SCALE_DTYPE, PackedWeight, WeightCompressionState


class LayerResult(NamedTuple):
    """A layer's integers and scales, and the per-input-channel ``input_scale`` (``1 / s``) that AWQ
    divides its inputs by (``None``: no input scaling)."""

    quantized: Quantized
    input_scale: Tensor | None = None


# (weight [out, in], its config, statistics of its calibration inputs or None) -> integers and scales
LayerAlgorithm = Callable[[Tensor, LayerConfig, "LayerInputs | None"], "Quantized | LayerResult"]


def round_to_nearest(weight: Tensor, config: LayerConfig, inputs: LayerInputs | None = None) -> Quantized:
    """``grid.quantize``: each weight to the nearest level of its group's grid (data-free)."""
    return quantize(weight, config.mode, config.group_size)


def data_aware(awq: AWQParameters | None = None, scale_estimation: ScaleEstimationParameters | None = None,
               gptq_params: GPTQParameters | None = None) -> LayerAlgorithm:
    """The layer step of NNCF's data-aware compression, for 4-bit layers (8-bit ones, the backup
    precision, take round-to-nearest, as in NNCF): AWQ's scales ``s`` first (when ``awq``), then
    the weight ``W diag(s)`` on the inputs ``x / s`` by GPTQ (when ``gptq_params``; with scale
    estimation of each group's scale when ``scale_estimation`` too, as NNCF), else by scale
    estimation, else round-to-nearest. Every stage is never worse than round-to-nearest on the
    layer's output error on the calibration tokens, so neither is the result."""

    def algorithm(weight: Tensor, config: LayerConfig, inputs: LayerInputs | None = None) -> Quantized | LayerResult:
        if mode_spec(config.mode).bits != 4:
            return quantize(weight, config.mode, config.group_size)
        if inputs is None:
            raise CalibrationError("a 4-bit layer received no calibration input: AWQ, scale estimation and GPTQ "
                                   "need its input statistics")
        w = weight.detach().to(torch.float32)
        s = None
        if awq is not None:
            s = awq_scale(w, config, inputs, awq)
            if bool((s == 1).all()):
                s = None
            else:
                w, inputs = w * s, inputs.scaled(s)
        if gptq_params is not None:
            q = gptq(w, config, inputs, gptq_params, scale_estimation=scale_estimation)
        elif scale_estimation is not None:
            q = estimate_scales(w, config, inputs, scale_estimation)
        else:
            q = quantize(w, config.mode, config.group_size)
        return LayerResult(q, None if s is None else 1.0 / s)

    return algorithm


def compress(
    plan: Plan,
    weights: Mapping[str, Tensor],
    *,
    algorithm: LayerAlgorithm = round_to_nearest,
    inputs: Mapping[str, LayerInputs] | None = None,
    scale_dtype: torch.dtype = SCALE_DTYPE,
    desc: str = "weight compression",
) -> WeightCompressionState:
    """The ``WeightCompressionState`` of ``plan`` over ``weights`` (param name -> tensor); a
    progress bar runs over the layers. ``inputs``: the calibration statistics of the layers that
    have some (``algorithm`` gets ``None`` for the others)."""
    packed: dict[str, PackedWeight] = {}
    float_weights: dict[str, int] = {}
    for name, config in tqdm(list(plan.configs.items()), desc=desc, unit="layer", leave=False, disable=None):
        weight = weights[name]
        if config is None:
            float_weights[name] = weight.numel()
            continue
        layer_inputs = None if inputs is None else inputs.get(name)
        try:
            result = algorithm(weight.detach(), config, layer_inputs)
        except CalibrationError as exc:
            raise CalibrationError(f"{plan.layers[name].module or name if name in plan.layers else name}: {exc}") \
                from exc
        q, input_scale = result if isinstance(result, LayerResult) else (result, None)
        packed[name] = PackedWeight.pack(q, config.mode, scale_dtype, input_scale)
    for name, layer in plan.skipped.items():
        float_weights.setdefault(name, layer.numel)
    kinds = {name: layer.kind for name, layer in {**plan.skipped, **plan.layers}.items()}
    return WeightCompressionState(packed, float_weights, plan.ratio_defining, kinds)
