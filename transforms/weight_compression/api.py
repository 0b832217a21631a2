"""``compress_weights``: NNCF 3.x's one-call weight compression, on a PyTorch module.

Like ``nncf.compress_weights`` for PyTorch, it modifies ``model`` IN PLACE and returns it: every
compressed ``nn.Linear`` / ``nn.Embedding`` is replaced by a ``CompressedLinear`` /
``CompressedEmbedding`` holding packed integers, scales and zero points (``modules.py``); the float
weights are released. Modules sharing one weight (tied embeddings and LM head) share the packed
buffers. ``state_from_model`` reads the compression back as a ``WeightCompressionState`` (for
``pc.save_state`` and ``pc.statistics``), ``install`` puts a state into a float model, and
``load_compressed_state_dict`` loads a compressed model's ``state_dict()`` into a float one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from purecomp.data import describe_inputs
from purecomp.errors import CalibrationError, ConfigError, PurecompError, StateError, warn_no_effect
from purecomp.graph import trace
from purecomp.stats import statistics
from purecomp.transforms.ptq.dataset import Dataset
from purecomp.transforms.ptq.parameters import IgnoredScope
from purecomp.transforms.ptq.pipeline import calibration_batches

from . import layers as layer_search
from .compressor import compress
from .fq_lora import add_lora_adapters, check_format, refuse_unstripped
from .method import scorer, uses_data, weight_compression
from .modules import FORMAT, CompressedEmbedding, CompressedLinear
from .parameters import check_options, resolve
from .precision import plan
from .state import WeightCompressionState

log = logging.getLogger(__name__)


def _scope_patterns(ignored_scope: Any, nodes: Any) -> tuple[list[str], bool]:
    """``(patterns, validate)`` of an ``IgnoredScope``, a list of names / ``{re}`` patterns, or ``None``."""
    if ignored_scope is None:
        return [], True
    if isinstance(ignored_scope, IgnoredScope):
        return ignored_scope.ignored_scopes(nodes), ignored_scope.validate
    if isinstance(ignored_scope, str) or not isinstance(ignored_scope, Sequence):
        raise ConfigError("ignored_scope", f"expected a purecomp.IgnoredScope or a list of names, got {ignored_scope!r}")
    return list(ignored_scope), True


def compress_weights(
    model: nn.Module,
    *,
    mode: str = "int8_asym",
    ratio: float | None = None,
    group_size: int | None = None,
    ignored_scope: IgnoredScope | Sequence[str] | None = None,
    all_layers: bool | None = None,
    dataset: Dataset | Iterable[Any] | None = None,
    sensitivity_metric: str | None = None,
    subset_size: int = 128,
    awq: bool | None = None,
    scale_estimation: bool | None = None,
    gptq: bool | None = None,
    backup_mode: str | None = None,
    compression_format: str = "dq",
    advanced_parameters: Any = None,
) -> nn.Module:
    """Compress the weights of ``model``'s linears and embeddings; returns ``model`` itself,
    modified in place (module docstring; ``docs/weight_compression.md``).

    ``mode``: ``int8_asym`` (default), ``int8_sym``, ``int4_asym``, ``int4_sym``, ``nf4``.
    ``group_size``: input channels per scale (default: -1, per output channel, for INT8; 128 for
    4-bit modes). ``ratio`` (default 1): the share of the ratio-defining weights (the linears but
    the last, by number of elements) put in the 4-bit ``mode``, the rest in ``backup_mode``
    (``int8_asym`` default, ``int8_sym``, or ``none`` for float); the least sensitive go to 4 bits
    (``sensitivity_metric``: ``weight_quantization_error`` without a dataset,
    ``max_activation_variance`` with one). Embeddings and the last linear stay in the backup
    precision unless ``all_layers=True``. ``ignored_scope``: a ``purecomp.IgnoredScope`` or a list
    of module names / ``{re}`` patterns, left in float. ``dataset``: a ``purecomp.Dataset`` or any
    iterable of model inputs (a tensor, a tuple of positional inputs, a dict of keyword inputs);
    the first ``subset_size`` samples give the activation statistics, and the first sample traces
    the layer order (without a dataset, the registration order of the modules is used).
    ``awq``, ``scale_estimation``, ``gptq``: NNCF's data-aware algorithms for the 4-bit layers (AWQ
    input-channel scales, refined group scales, GPTQ error compensation; ``awq.py``,
    ``scale_estimation.py``, ``gptq.py``), combinable as in NNCF; they need a ``dataset`` and read
    each 4-bit layer's input statistics on the ``subset_size`` samples (a second pass over them).
    ``advanced_parameters``: ``AdvancedCompressionParameters`` or a dict
    (``group_size_fallback_mode``: ``error`` / ``ignore`` / ``adjust``; ``min_adjusted_group_size``;
    ``awq_params``, ``scale_estimation_params``, ``gptq_params``; ``lora_adapter_rank``).
    ``compression_format``: ``dq`` (default: packed integers dequantized in ``forward``) or
    ``fq_lora`` (4-bit modes: after compression, each 4-bit linear becomes a
    ``LoRAQuantizedLinear`` with a trainable group scale and LoRA adapters, every other parameter
    frozen, for QAT; ``purecomp.strip`` folds them back; ``fq_lora.py``)."""
    if not isinstance(model, nn.Module):
        raise ConfigError("model", f"expected a torch.nn.Module, got {type(model).__name__}")
    if dataset is not None and not uses_data(mode):
        warn_no_effect("dataset", f"{mode} compresses every layer per output channel without data "
                       "(NNCF's PyTorch backend drops the dataset for the INT8 modes too)")
        dataset = None
    compression_format = check_format(compression_format, mode)
    check_options(mode, ratio=ratio, group_size=group_size, all_layers=all_layers, has_dataset=dataset is not None,
                  sensitivity_metric=sensitivity_metric, subset_size=subset_size, backup_mode=backup_mode, awq=awq,
                  scale_estimation=scale_estimation, gptq=gptq)
    settings = resolve(mode, ratio=ratio, group_size=group_size, all_layers=all_layers,
                       has_dataset=dataset is not None, sensitivity_metric=sensitivity_metric,
                       subset_size=subset_size, backup_mode=backup_mode, advanced_parameters=advanced_parameters)
    params = dict(model.named_parameters())
    with torch.no_grad():
        if dataset is None:
            patterns, validate = _scope_patterns(ignored_scope, layer_search.module_nodes(model))
            layers = layer_search.from_modules(model, patterns, validate, origin="")
            state = compress(plan(layers, settings, scorer(settings, params)), params)
        else:
            batches = calibration_batches(dataset, subset_size)
            args, kwargs = batches[0]
            was_training = model.training
            model.eval()
            try:
                try:
                    graph = trace(model, args, kwargs)
                except PurecompError:
                    raise
                except Exception as exc:  # the model refuses the sample: name what it got
                    raise CalibrationError(f"dataset: the model cannot run on a calibration batch "
                                           f"({describe_inputs(args, kwargs)}): {type(exc).__name__}: {exc}") from exc
                patterns, validate = _scope_patterns(ignored_scope, graph)
                held = [node.site for node in graph
                        if layer_search.weight_of(node) is not None and isinstance(
                            model.get_submodule(node.scope), (nn.Linear, nn.Embedding))]
                method = weight_compression(
                    settings.mode, ratio=settings.ratio, group_size=settings.group_size,
                    all_layers=settings.all_layers, sensitivity_metric=settings.sensitivity_metric,
                    backup_mode=settings.backup_mode, subset_size=settings.subset_size, ignored_scopes=patterns,
                    target_scopes=held, validate_scopes=validate, advanced_parameters=settings.advanced, awq=awq,
                    scale_estimation=scale_estimation, gptq=gptq)
                state = method.init(graph, params, [kw if kw else (a,) for a, kw in batches], calibration_mode="eval")
            finally:
                model.train(was_training)
    install(model, state)
    log.info("weight compression:\n%s", statistics(None, state))
    if compression_format == "fq_lora":
        add_lora_adapters(model, settings.advanced.lora_adapter_rank, settings.mode)
    return model


def _holders(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """``(path, module, weight name)`` of every ``nn.Linear`` / ``nn.Embedding`` at every path."""
    names = {id(p): name for name, p in model.named_parameters()}
    out = []
    for path, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, (nn.Linear, nn.Embedding)) and id(module.weight) in names:
            out.append((path, module, names[id(module.weight)]))
    return out


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def install(model: nn.Module, state: WeightCompressionState) -> nn.Module:
    """Replace, in place, each ``nn.Linear`` / ``nn.Embedding`` whose weight ``state`` compresses by
    its compressed module (modules sharing the weight share the buffers). ``StateError`` when a
    compressed weight is held by no such module or its shape differs."""
    if not isinstance(state, WeightCompressionState):
        raise StateError(f"expected a WeightCompressionState, got {type(state).__name__}")
    new: dict[int, nn.Module] = {}
    places: list[tuple[str, int]] = []
    for path, module, name in _holders(model):  # build every module first: an error leaves the model as it was
        packed = state.weights.get(name)
        if packed is None:
            continue
        if id(module) not in new:
            if isinstance(module, nn.Linear):
                new[id(module)] = CompressedLinear.from_linear(module, packed)
            else:
                new[id(module)] = CompressedEmbedding.from_embedding(module, packed)
        places.append((path, id(module)))
    done = {name for _, module, name in _holders(model) if id(module) in new}
    missing = sorted(set(state.weights) - done)
    if missing:
        raise StateError(f"weights {missing[:5]} of the state are held by no nn.Linear / nn.Embedding of the model "
                         "(compress_weights replaces modules; use pc.apply with the weight_compression method for "
                         "weights used by functional calls)")
    for path, key in places:
        _set_module(model, path, new[key])
    return model


def state_from_model(model: nn.Module) -> WeightCompressionState:
    """The ``WeightCompressionState`` a compressed ``model`` holds (packed weights by the parameter
    names they replaced; float ``nn.Linear`` / ``nn.Embedding`` weights as ``float_weights``). The
    ratio-defining set of the original call is not recorded in the modules and comes back empty."""
    refuse_unstripped(model, "reading the compression state (saving)")
    weights, kinds, seen = {}, {}, {}
    for path, module in model.named_modules():
        if isinstance(module, (CompressedLinear, CompressedEmbedding)):
            key = id(module.packed_weight)
            if key not in seen:
                name = f"{path}.weight" if path else "weight"
                seen[key] = name
                weights[name] = module.packed
                kinds[name] = "linear" if isinstance(module, CompressedLinear) else "embedding"
    floats = {}
    for _, module, name in _holders(model):
        floats[name] = module.weight.numel()
        kinds[name] = "linear" if isinstance(module, nn.Linear) else "embedding"
    return WeightCompressionState(weights, floats, (), kinds)


def load_compressed_state_dict(model: nn.Module, state_dict: Mapping[str, Any]) -> nn.Module:
    """Load a compressed model's ``state_dict()`` into ``model`` (the same architecture, float):
    every module the state dict describes as packed (its ``_extra_state``) is first replaced by an
    empty compressed module; modules that shared a weight share the loaded buffers again. Strict."""
    shared: dict[int, list[nn.Module]] = {}
    for key, value in state_dict.items():
        if not (key.endswith("_extra_state") and isinstance(value, dict) and value.get("format") == FORMAT):
            continue
        path = key[: -len("_extra_state")].rstrip(".")
        module = model.get_submodule(path)
        if isinstance(module, (CompressedLinear, CompressedEmbedding)):
            continue
        dtype = getattr(torch, value["dtype"])
        out, in_features = value["shape"]
        if isinstance(module, nn.Linear):
            new = CompressedLinear.empty(value["mode"], value["group_size"], in_features, out, module.bias is not None,
                                         dtype, input_scale=bool(value.get("input_scale")))
        elif isinstance(module, nn.Embedding):
            new = CompressedEmbedding.empty(value["mode"], value["group_size"], out, in_features, module.padding_idx,
                                            dtype)
        else:
            raise StateError(f"{path!r} holds a packed weight in the state_dict but is a {type(module).__name__} "
                             "in the model; expected nn.Linear or nn.Embedding")
        shared.setdefault(id(module.weight), []).append(new)
        _set_module(model, path, new)
    model.load_state_dict(dict(state_dict))
    for group in shared.values():
        first = group[0]
        for other in group[1:]:
            if other.get_extra_state() == first.get_extra_state() and all(
                    torch.equal(getattr(first, b), getattr(other, b)) for b in ("packed_weight", "scale")):
                for b in ("packed_weight", "scale", "zero_point", "input_scale"):
                    setattr(other, b, getattr(first, b))
    return model


def dequantized_weights(model: nn.Module) -> dict[str, Tensor]:
    """``W'`` of every compressed module, by weight name (for comparisons and tests)."""
    return {name: packed.dequantize() for name, packed in state_from_model(model).weights.items()}
