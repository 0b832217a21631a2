"""From a precision plan to compressed weights: the per-layer step, with its hook.

Each weight with a ``LayerConfig`` becomes a ``PackedWeight``. The integers come from a
``LayerAlgorithm``: ``round_to_nearest`` (``grid.quantize``) today. Data-aware algorithms (AWQ,
scale estimation, GPTQ; ``awq.py``, ``scale_estimation.py``, ``gptq.py`` of this package when
they arrive) are pure functions of the same signature that receive the layer's calibration
inputs and return the integers and scales that replace round-to-nearest's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .grid import Quantized, quantize
from .precision import LayerConfig, Plan
from .state import SCALE_DTYPE, PackedWeight, WeightCompressionState


@dataclasses.dataclass(frozen=True)
class LayerInputs:
    """Calibration inputs of one layer: ``samples``, each ``[tokens, in_features]``."""

    samples: tuple[Tensor, ...]


# (weight [out, in], its config, its calibration inputs or None) -> integers and scales
LayerAlgorithm = Callable[[Tensor, LayerConfig, "LayerInputs | None"], Quantized]


def round_to_nearest(weight: Tensor, config: LayerConfig, inputs: LayerInputs | None = None) -> Quantized:
    """``grid.quantize``: each weight to the nearest level of its group's grid (data-free)."""
    return quantize(weight, config.mode, config.group_size)


def compress(
    plan: Plan,
    weights: Mapping[str, Tensor],
    *,
    algorithm: LayerAlgorithm = round_to_nearest,
    inputs: Mapping[str, LayerInputs] | None = None,
    scale_dtype: torch.dtype = SCALE_DTYPE,
) -> WeightCompressionState:
    """The ``WeightCompressionState`` of ``plan`` over ``weights`` (param name -> tensor); a
    progress bar runs over the layers."""
    packed: dict[str, PackedWeight] = {}
    float_weights: dict[str, int] = {}
    for name, config in tqdm(list(plan.configs.items()), desc="weight compression", unit="layer",
                             leave=False, disable=None):
        weight = weights[name]
        if config is None:
            float_weights[name] = weight.numel()
            continue
        q = algorithm(weight.detach(), config, None if inputs is None else inputs.get(name))
        packed[name] = PackedWeight.pack(q, config.mode, scale_dtype)
    for name, layer in plan.skipped.items():
        float_weights.setdefault(name, layer.numel)
    kinds = {name: layer.kind for name, layer in {**plan.skipped, **plan.layers}.items()}
    return WeightCompressionState(packed, float_weights, plan.ratio_defining, kinds)
