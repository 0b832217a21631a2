"""``weight_compression``: weight-only compression as a ``purecomp.Compression`` value.

``init`` picks each weight's precision (``precision.py``, NNCF's rules; data-aware sensitivity
from the calibration data when given), gathers the input statistics of the 4-bit layers when AWQ,
scale estimation or GPTQ is on (``collect_inputs``: one pass over ``subset_size`` samples of the
model as the earlier chain members leave it; every layer sees the FLOAT model's inputs, the
quantization of earlier layers is not propagated) and stores every compressed weight as integers
and scales (``WeightCompressionState``); ``params`` returns the dequantized weights ``W'``; there are no
site transforms, no loss and no schedule. ``pc.apply(model, method, params, state, x)`` runs
the model on ``W'``; ``compress_weights`` builds modules holding the packed form instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from purecomp.compression import Compression, Progress
from purecomp.errors import CalibrationError, ConfigError
from purecomp.init_context import InitContext
from purecomp.scopes import select_sites

from . import layers as layer_search
from .compressor import LayerAlgorithm, compress, data_aware, round_to_nearest
from .grid import mode_spec
from .layer_inputs import InputAccumulator, LayerInputs
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


def collect_inputs(context: InitContext, layers: Sequence[Layer], subset_size: int) -> dict[str, LayerInputs]:
    """The input statistics (``layer_inputs.LayerInputs``) of each linear in ``layers`` (at the input
    of its first call), streamed over ``subset_size`` calibration samples. Linears whose input is
    the same tensor of the graph (q, k, v after one norm; gate and up) share one accumulator."""
    accumulators: dict[str, InputAccumulator] = {}
    keys: dict[str, InputAccumulator] = {}
    by_tensor: dict[Any, InputAccumulator] = {}
    for layer in layers:
        if layer.kind != "linear" or not layer.site or layer.weight in accumulators:
            continue
        source = context.graph.node(layer.site).inputs[0]
        shared = source.kind in ("node", "input")
        if shared and source in by_tensor:
            accumulators[layer.weight] = by_tensor[source]
            continue
        accumulators[layer.weight] = keys[f"{layer.site}:in0"] = InputAccumulator()
        if shared:
            by_tensor[source] = accumulators[layer.weight]

    def record(key: str, x: Tensor) -> None:
        keys[key].add(x, key)

    if keys:
        context.calibrate(list(keys), record, subset_size, "weight compression: layer inputs")
    results: dict[int, LayerInputs] = {}
    out = {}
    for name, acc in accumulators.items():
        if acc.tokens:
            out[name] = results.setdefault(id(acc), acc.result())
    return out


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
    algorithm: LayerAlgorithm | None = None,
    awq: bool | None = None,
    scale_estimation: bool | None = None,
    gptq: bool | None = None,
) -> Compression:
    """Weight-only compression of the linears and embeddings (NNCF's ``compress_weights`` options,
    same names and defaults; ``docs/weight_compression.md``). ``ignored_scopes`` /
    ``target_scopes`` are scope patterns (``purecomp.scopes``; ``validate_scopes``: each must match a
    site). Calibration data given to ``init``
    make a data-aware sensitivity metric the default (``max_activation_variance``), used only when
    ``ratio < 1``. ``scale_dtype``: how scales are stored (float16, as NNCF's PyTorch backend).
    ``awq``, ``scale_estimation``, ``gptq``: NNCF's data-aware algorithms for the 4-bit layers
    (``compressor.data_aware``; options in ``advanced_parameters``' ``awq_params``,
    ``scale_estimation_params``, ``gptq_params``); they need calibration data in ``init``.
    ``algorithm``: a custom per-layer step (``compressor.LayerAlgorithm``, default round-to-nearest),
    exclusive with those three."""
    options = dict(ratio=ratio, group_size=group_size, all_layers=all_layers, sensitivity_metric=sensitivity_metric,
                   subset_size=subset_size, backup_mode=backup_mode, awq=awq, scale_estimation=scale_estimation,
                   gptq=gptq)
    check_options(mode, has_dataset=True, **options)
    aware = [key for key, on in (("awq", awq), ("scale_estimation", scale_estimation), ("gptq", gptq)) if on]
    if algorithm is not None and aware:
        raise ConfigError("algorithm", f"a custom per-layer algorithm replaces {', '.join(aware)}; pass one or "
                          "the other")

    def init(context: InitContext) -> WeightCompressionState:
        has_data = context.data is not None
        check_options(mode, has_dataset=has_data, **options)
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
        if not aware:
            return compress(chosen, context.params, algorithm=algorithm or round_to_nearest, scale_dtype=scale_dtype)
        four_bit = [chosen.layers[name] for name, config in chosen.configs.items()
                    if config is not None and mode_spec(config.mode).bits == 4]
        inputs = collect_inputs(context, four_bit, settings.subset_size)
        advanced = settings.advanced
        step = data_aware(awq=advanced.awq_params if awq else None,
                          scale_estimation=advanced.scale_estimation_params if scale_estimation else None,
                          gptq_params=advanced.gptq_params if gptq else None)
        return compress(chosen, context.params, algorithm=step, inputs=inputs, scale_dtype=scale_dtype,
                        desc=f"weight compression ({' + '.join(aware)})")

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
