"""``weight_compression``: weight-only compression as a ``purecomp.Compression`` value.

``init`` picks each weight's precision (``precision.py``, NNCF's rules; data-aware sensitivity
from the calibration data when given) and stores every compressed weight as integers and scales
(``WeightCompressionState``); ``params`` returns the dequantized weights ``W'``; there are no
site transforms, no loss and no schedule. ``pc.apply(model, method, params, state, x)`` runs
the model on ``W'``; ``compress_weights`` builds modules holding the packed form instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from purecomp.compression import Compression, Progress
from purecomp.errors import CalibrationError
from purecomp.init_context import InitContext
from purecomp.scopes import select_sites

from . import layers as layer_search
from .compressor import LayerAlgorithm, compress, round_to_nearest
from .grid import mode_spec
from .parameters import INT8_MODES, Settings, check_options, resolve
from .precision import Layer, plan
from .sensitivity import WEIGHT_QUANTIZATION_ERROR, ActivationStatistic, layer_score
from .state import SCALE_DTYPE, WeightCompressionState


def scorer(settings: Settings, params: Mapping[str, Tensor],
           activations: Mapping[str, float] | None = None) -> Callable[[list[Layer]], list[float]]:
    """``scores(layers)`` for ``precision.plan``: ``sensitivity.layer_score`` of each layer."""
    def scores(layers: list[Layer]) -> list[float]:
        metric = settings.sensitivity_metric
        out = []
        for layer in layers:
            activation = None
            if metric != WEIGHT_QUANTIZATION_ERROR and layer.kind == "linear":
                if activations is None or layer.weight not in activations:
                    raise CalibrationError(f"{metric}: layer {layer.module or layer.weight!r} received no "
                                           "calibration input; it is not reached by the model on the data")
                activation = activations[layer.weight]
            out.append(layer_score(metric, params[layer.weight], layer.kind, activation))
        return out

    return scores


def collect_activations(context: InitContext, layers: Sequence[Layer], settings: Settings) -> dict[str, float]:
    """The data-aware metric's input statistic of each linear in ``layers`` (at the input of its
    first call), over ``subset_size`` calibration samples."""
    stats: dict[str, ActivationStatistic] = {}
    keys: dict[str, str] = {}
    for layer in layers:
        if layer.kind == "linear" and layer.weight not in stats and layer.site:
            stats[layer.weight] = ActivationStatistic(settings.sensitivity_metric, settings.subset_size)
            keys[f"{layer.site}:in0"] = layer.weight

    def record(key: str, x: Tensor) -> None:
        stats[keys[key]].add(x, key)

    context.calibrate(list(keys), record, settings.subset_size, "weight compression statistics")
    return {name: s.result() for name, s in stats.items() if s.count}


def weight_compression(
    mode: str = "int8_asym",
    *,
    ratio: float | None = None,
    group_size: int | None = None,
    all_layers: bool | None = None,
    sensitivity_metric: str | None = None,
    backup_mode: str | None = None,
    subset_size: int = 128,
    ignored_scopes: Sequence[str] = (),
    target_scopes: Sequence[str] | None = None,
    validate_scopes: bool = True,
    advanced_parameters: Any = None,
    scale_dtype: torch.dtype = SCALE_DTYPE,
    algorithm: LayerAlgorithm = round_to_nearest,
) -> Compression:
    """Weight-only compression of the linears and embeddings (NNCF's ``compress_weights`` options,
    same names and defaults; ``docs/weight_compression.md``). ``ignored_scopes`` /
    ``target_scopes`` are scope patterns (``purecomp.scopes``; ``validate_scopes``: each must match a
    site). Calibration data given to ``init``
    make a data-aware sensitivity metric the default (``max_activation_variance``), used only when
    ``ratio < 1``. ``scale_dtype``: how scales are stored (float16, as NNCF's PyTorch backend).
    ``algorithm``: the per-layer step (``compressor.LayerAlgorithm``)."""
    check_options(mode, ratio=ratio, group_size=group_size, all_layers=all_layers, has_dataset=True,
                  sensitivity_metric=sensitivity_metric, subset_size=subset_size, backup_mode=backup_mode)

    def init(context: InitContext) -> WeightCompressionState:
        has_data = context.data is not None
        check_options(mode, ratio=ratio, group_size=group_size, all_layers=all_layers, has_dataset=has_data,
                      sensitivity_metric=sensitivity_metric, subset_size=subset_size, backup_mode=backup_mode)
        settings = resolve(mode, ratio=ratio, group_size=group_size, all_layers=all_layers,
                           has_dataset=has_data and uses_data(mode), sensitivity_metric=sensitivity_metric,
                           subset_size=subset_size, backup_mode=backup_mode, advanced_parameters=advanced_parameters)
        allowed = select_sites(context.graph, ignored_scopes, target_scopes, "weight_compression.", context.scope,
                               validate=validate_scopes)
        layers = layer_search.from_graph(context.graph, allowed)
        activations = None

        def scores(ratio_defining: list[Layer]) -> list[float]:
            nonlocal activations
            if settings.sensitivity_metric != WEIGHT_QUANTIZATION_ERROR and activations is None:
                activations = collect_activations(context, ratio_defining, settings)
            return scorer(settings, context.params, activations)(ratio_defining)

        chosen = plan(layers, settings, scores)
        return compress(chosen, context.params, algorithm=algorithm, scale_dtype=scale_dtype)

    def params_fn(params: Mapping[str, Tensor], state: WeightCompressionState) -> dict[str, Tensor]:
        return state.dequantized(params)

    def sites(state: WeightCompressionState) -> dict[str, Any]:
        return {}

    def step(state: WeightCompressionState, progress: Progress, params: Any = None) -> WeightCompressionState:
        return state

    return Compression(init, params_fn, sites, lambda params, state: torch.zeros(()), step,
                       name="weight_compression")


def uses_data(mode: Any) -> bool:
    """Whether ``mode`` reads calibration data: the INT8 modes never do (NNCF's PyTorch backend drops
    the dataset for them)."""
    return mode_spec(getattr(mode, "value", mode)).name not in INT8_MODES
