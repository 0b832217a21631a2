"""``purecomp.quantize``: post-training INT8 quantization in one call (NNCF 3.x's names).

On a copy of the model, in order: BatchNorm folding, cross-layer equalization with high-bias
absorption (opt-in), range estimation on ``subset_size`` calibration samples (weights
symmetric per channel; activations per tensor, symmetric for the ``performance`` preset,
asymmetric for ``mixed``), MSE-optimal clipping (opt-in), one step for the quantizers around each
residual add (``unify_residual_scales``), activation steps with 16 significant bits
(``activation_step_bits``), AdaRound (opt-in), fast or full
bias correction, then each quantized layer's bias put on its int32 accumulator grid ``s_x s_w``
(``int32_bias``: what integer kernels add).
With ``model_type="transformer"`` BatchNorm folding is skipped and SmoothQuant runs before
range estimation (docs/ptq.md, Transformers). The result is a ``CompressedModule``: its
forward is the quantized model (the numerics the exported ONNX has), its quantizer ranges are
trainable parameters (fine-tune it and QAT continues from the PTQ ranges), ``purecomp.strip`` materializes it and
``purecomp.export_quantized`` writes its ONNX.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import optree
import torch
from torch import Tensor, nn

from purecomp.api import CompressedModule
from purecomp.compression import chain, compose_sites, with_training
from purecomp.data import take_samples
from purecomp.errors import CalibrationError, ConfigError
from purecomp.export import materialize, to_onnx
from purecomp.export.materialize import fold_batchnorms
from purecomp.graph import ModelGraph, trace
from purecomp.integrations.hf_compress import TRANSFORMER_TARGET_SCOPES, use_eager_attention
from purecomp.transforms.quantize import RangeInit, quantization
from purecomp.transforms.smooth_quant import smooth_quant

from .activation_steps import with_short_activation_steps
from .bias_correction import CORRECTED_OPS, bias_correction, correctable_layers
from .chain_state import map_quantization, quantization_state, without_quantization
from .dataset import Dataset, model_inputs
from .equalization import absorb_high_biases, cross_layer_equalization
from .int32_bias import biases_on_int32_grid, int32_bias_steps
from .parameters import (
    MODEL_TYPES,
    PRESETS,
    TARGET_DEVICES,
    AdvancedQuantizationParameters,
    IgnoredScope,
    check_choice,
    quantization_params,
)
from .ranges import activation_samples, mse_activation_quantizers, mse_weight_quantizers
from .residual_scales import unify_residual_scales

log = logging.getLogger(__name__)

ACTIVATION_RANGE_TYPES = {"min_max": "min_max", "mean_min_max": "mean_min_max", "percentile": "percentile",
                          "mse": "mean_min_max"}


def calibration_batches(dataset: Dataset | Iterable[Any], subset_size: int) -> list[tuple[tuple, dict]]:
    """The first ``subset_size`` samples of ``dataset`` as ``(args, kwargs)`` model calls. A
    ``Dataset`` yields model inputs (its ``transform_fn`` applied); any other iterable yields
    batches as training loaders do (``x`` or ``(x, y, ...)``: the model input is ``x``)."""
    if isinstance(dataset, Dataset):
        items: Iterable[Any] = ((model_inputs(item),) for item in dataset.get_inference_data())
        items = ([args] if not kwargs else kwargs for (args, kwargs), in items)
    elif isinstance(dataset, Iterable):
        items = dataset
    else:
        raise CalibrationError(f"calibration_dataset must be a purecomp.Dataset or an iterable of batches, got "
                               f"{type(dataset).__name__}")
    batches = list(take_samples(items, subset_size, "calibration data"))
    if not batches:
        raise CalibrationError("calibration_dataset yielded no batch")
    return batches


def _as_data(batches: Sequence[tuple[tuple, dict]]) -> list[Any]:
    """``batches`` in the form ``data.batch_inputs`` reads back unchanged."""
    return [kwargs if kwargs else (args,) for args, kwargs in batches]


def _trace(model: nn.Module, batches: Sequence[tuple[tuple, dict]], rows: int = 2) -> ModelGraph:
    """The graph of ``model`` on the first ``rows`` samples of the first batch (the op graph does not
    depend on the batch size; a batch whose tensors do not share one leading size is used whole)."""
    args, kwargs = batches[0]
    leaves = [t for t in optree.tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
    sizes = {t.shape[0] if t.dim() else None for t in leaves}
    if len(sizes) == 1 and None not in sizes and sizes.pop() > rows:
        args, kwargs = optree.tree_map(lambda t: t[:rows] if isinstance(t, Tensor) else t, (args, kwargs))
    return trace(model, args, kwargs)


def _eager_attention(model: nn.Module) -> None:
    """Switch the outermost HuggingFace model inside ``model`` (if any) to eager attention, so the
    two attention matmuls are quantizable ops (``use_eager_attention``)."""
    for module in model.modules():
        if hasattr(getattr(module, "config", None), "_attn_implementation"):
            use_eager_attention(module)
            return


def _add_zero_biases(model: nn.Module, graph: ModelGraph) -> bool:
    """Give every conv / linear without a bias a zero one, so bias correction has a place to write;
    whether any was added (the graph then needs a new trace to see the new parameters)."""
    added = False
    for node in graph:
        if node.op not in CORRECTED_OPS or not node.scope or node.index != 0:
            continue
        module = model.get_submodule(node.scope)
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) and module.bias is None:
            out = module.out_channels if not isinstance(module, nn.Linear) else module.out_features
            module.bias = nn.Parameter(torch.zeros(out, dtype=module.weight.dtype, device=module.weight.device))
            added = True
    return added


def _ignored(ignored_scope: IgnoredScope | Sequence[str] | None, graph: ModelGraph) -> list[str]:
    if ignored_scope is None:
        return []
    if isinstance(ignored_scope, IgnoredScope):
        return ignored_scope.ignored_scopes(graph)
    if isinstance(ignored_scope, str) or not isinstance(ignored_scope, Sequence):
        raise ConfigError("ignored_scope", f"expected an IgnoredScope or a list of names, got {ignored_scope!r}")
    return list(ignored_scope)


def quantize(
    model: nn.Module,
    calibration_dataset: Dataset | Iterable[Any],
    *,
    preset: str | None = None,
    target_device: str = "ANY",
    subset_size: int = 300,
    fast_bias_correction: bool = True,
    model_type: str | None = None,
    ignored_scope: IgnoredScope | Sequence[str] | None = None,
    advanced_parameters: AdvancedQuantizationParameters | Mapping[str, Any] | None = None,
) -> CompressedModule:
    """Post-training INT8 quantization of ``model`` (unchanged) on ``subset_size`` samples of
    ``calibration_dataset`` (module docstring). ``preset``: ``performance`` (default; symmetric
    activations) or ``mixed`` (asymmetric activations). ``fast_bias_correction``: one-pass bias
    correction; ``False`` runs the layer-by-layer one. ``target_device`` is accepted for NNCF
    compatibility: every device gets the same 8-bit scheme. ``model_type="transformer"``: transformer
    placement (inputs of linears and attention matmuls, one input quantizer per linear call), the
    ``mixed`` preset unless ``preset`` says otherwise, no BatchNorm folding, and SmoothQuant on the
    linears (``advanced_parameters.smooth_quant_alphas["matmul"]``, 0.95; negative: off)."""
    if not isinstance(model, nn.Module):
        raise ConfigError("model", f"expected a torch.nn.Module, got {type(model).__name__}")
    check_choice("preset", preset, (None, *PRESETS))
    check_choice("target_device", target_device, TARGET_DEVICES)
    check_choice("model_type", model_type, MODEL_TYPES)
    if not isinstance(subset_size, int) or isinstance(subset_size, bool) or subset_size < 1:
        raise ConfigError("subset_size", f"expected a positive number of samples, got {subset_size!r}")
    options = AdvancedQuantizationParameters.of(advanced_parameters)
    transformer = model_type == "transformer"
    batches = calibration_batches(calibration_dataset, subset_size)
    data = _as_data(batches)
    work = copy.deepcopy(model).eval()
    if transformer:
        _eager_attention(work)
    graph = _trace(work, batches)
    if options.batchnorm_folding and not transformer:
        fold_batchnorms(work, graph, {})
        graph = _trace(work, batches)
    if options.cross_layer_equalization:
        pairs = cross_layer_equalization(work, graph)
        if options.bias_absorption:
            absorb_high_biases(work, graph, pairs, data, subset_size)
        graph = _trace(work, batches)
        log.info("cross-layer equalization: %d pairs", len(pairs))
    if not options.disable_bias_correction and _add_zero_biases(work, graph):
        graph = _trace(work, batches)
    mode = PRESETS[preset or ("mixed" if transformer else "performance")]  # NNCF's defaults per model type
    low, high = options.activations_percentiles
    ignored = _ignored(ignored_scope, graph)
    weights = dict(mode="symmetric", bits=8, per_channel=options.weights_per_channel) | quantization_params(
        options.weights_quantization_params, "advanced_parameters.weights_quantization_params")
    activations = dict(mode=mode, bits=8) | quantization_params(
        options.activations_quantization_params, "advanced_parameters.activations_quantization_params")
    method = quantization(
        weights=weights,
        activations=activations,
        ignored_scopes=ignored,
        target_scopes=TRANSFORMER_TARGET_SCOPES if transformer else None,
        range_init=RangeInit(type=ACTIVATION_RANGE_TYPES[options.activations_range_estimator],
                             num_init_samples=subset_size, min_percentile=low, max_percentile=high),
        quantize_outputs=options.quantize_outputs,
        quantize_at_inputs_of=("linear",) if transformer else (),
        origin="quantize.",
    )
    alpha = options.matmul_alpha
    if transformer and alpha >= 0:
        method = chain(smooth_quant(alpha, ignored_scopes=ignored, num_samples=subset_size), method)
    params = dict(work.named_parameters())
    state = method.init(graph, params, data, calibration_mode="eval")  # PTQ: ranges as inference sees them
    if "mse" in (options.weights_range_estimator, options.activations_range_estimator):
        smoothed = method.params(params, without_quantization(state))  # the weights the quantizers see
        before = method.sites(without_quantization(state))  # the input transforms their quantizers follow
    if options.weights_range_estimator == "mse":
        state = map_quantization(state, lambda q: dataclasses.replace(
            q, weights=mse_weight_quantizers(q.weights, smoothed)))
    if options.activations_range_estimator == "mse":
        q_state = quantization_state(state)
        samples = activation_samples(work, smoothed, lambda observers: compose_sites([before, observers]),
                                     list(q_state.activations), data, subset_size)
        state = map_quantization(state, lambda q: dataclasses.replace(
            q, activations=mse_activation_quantizers(q.activations, samples)))
    if options.unify_residual_scales:
        state, groups = unify_residual_scales(graph, state)
        log.info("residual adds: %d groups of activation quantizers on one step", len(groups))
    if options.activation_step_bits is not None:
        state = with_short_activation_steps(state, options.activation_step_bits)
    uncorrected: dict[str, Tensor] = {}  # weights before AdaRound, biases before bias correction
    if options.adaround not in (None, False):
        from purecomp.transforms.adaround import adaround_weights

        rounded, report = adaround_weights(work, graph, method, params | dict(work.named_buffers()), state, data,
                                           options.adaround, num_samples=subset_size,
                                           path="advanced_parameters.adaround")
        with torch.no_grad():
            for layer in report.layers:
                uncorrected[layer.weight] = params[layer.weight].detach().clone()
                params[layer.weight].copy_(rounded[layer.weight])
        log.info("AdaRound:\n%s", report.table())
    if not options.disable_bias_correction:
        bc_samples = min(subset_size, options.bias_correction_subset_size or subset_size)
        # the float model is the reference; AdaRound's weights, where it ran, are the quantized side
        rounded_weights = {name: params[name] for name in uncorrected}
        reference = params | dict(work.named_buffers()) | uncorrected
        layers = None
        if rounded_weights:  # AdaRound's layers are left out: docs/ptq.md, AdaRound
            layers = [site for site in correctable_layers(graph, reference, quantization_state(state).weights)
                      if f"{site.rpartition('/')[0]}.weight" not in rounded_weights]
        corrected = bias_correction(work, graph, method, reference, state, data, bc_samples,
                                    fast=fast_bias_correction, quantized_weights=rounded_weights, layers=layers)
        with torch.no_grad():
            for name, p in params.items():
                if name not in rounded_weights and corrected[name] is not reference[name]:
                    uncorrected[name] = p.detach().clone()
                    p.copy_(corrected[name])
    moved_biases: dict[str, str] = {}  # layer -> the BatchNorm beta that holds its bias
    if options.int32_bias:
        grids = int32_bias_steps(graph, params, state)
        moved_biases = {grid.layer: name for name, grid in grids.items() if name != f"{grid.layer}.bias"}
        snapped = biases_on_int32_grid(params, grids)
        with torch.no_grad():
            for name in grids:
                uncorrected.setdefault(name, params[name].detach().clone())
                params[name].copy_(snapped[name])
    module = CompressedModule(work, method)
    module.set_state(state)
    module.graph = graph
    module.float_values = uncorrected  # what a layer returned to float needs (accuracy control)
    module.moved_biases = moved_biases
    module.adaround_report = report if options.adaround not in (None, False) else None
    return module.eval()


def _parts(module: CompressedModule) -> tuple[nn.Module, Any, dict[str, Tensor], Any, ModelGraph | None]:
    if not isinstance(module, CompressedModule):
        raise ConfigError("model", f"expected the module purecomp.quantize returned, got {type(module).__name__}")
    return module.model, module.method, module.model_params(), with_training(module.state, False), \
        getattr(module, "graph", None)


def strip(module: nn.Module) -> nn.Module:
    """The materialized form of a ``quantize`` (or ``create_compressed_model``) result: an ordinary
    eval-mode module with integer weights and export-form quantizers (``export.materialize``). Any
    other module whose submodules have a ``to_compressed()`` method (the QAT layers of a method
    package, e.g. ``compress_weights(..., compression_format="fq_lora")``) gets each such submodule
    replaced by what that method returns, in place."""
    if not isinstance(module, CompressedModule):
        found = [(name, m) for name, m in module.named_modules() if name and callable(getattr(m, "to_compressed", None))]
        if not found:
            raise ConfigError("model", "expected the module purecomp.quantize returned, or a model with trainable "
                              f"compressed layers (a to_compressed() method), got {type(module).__name__} with neither")
        for name, m in found:
            parent, _, child = name.rpartition(".")
            setattr(module.get_submodule(parent) if parent else module, child, m.to_compressed())
        return module.eval()
    model, method, params, state, graph = _parts(module)
    return materialize(model, method, params, state, graph)


def export_quantized(module: CompressedModule, example_inputs: Any, path: str | Path) -> Path:
    """ONNX (QDQ, runs as INT8 in onnxruntime and OpenVINO) of a ``quantize`` result."""
    model, method, params, state, _ = _parts(module)
    return to_onnx(model, method, params, state, example_inputs, path)
