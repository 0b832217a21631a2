"""AdaRound over a model, layer by layer, as a weight transform ``params -> params``.

For each conv / linear whose weight a quantization method quantizes (graph order), two passes
over the calibration samples record only what that layer needs: its input in the quantized model
(``sequential``: every earlier layer already rounded, activation quantizers on; otherwise the
float model's input through the layer's own input quantizers) and its float output in the float
model. ``adaround_layer`` then learns the rounding, and the rounded weight, a point of the weight
quantizer's integer grid, replaces the float one before the next layer is recorded. One layer's
inputs and targets are held at a time (the report's ``peak_buffer_bytes``); earlier layers' are
freed.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import optree
import torch
from torch import Tensor, nn
from torch.func import functional_call
from tqdm.auto import tqdm

from purecomp.apply import input_sites, transform_inputs
from purecomp.compression import Compression, with_training
from purecomp.data import take_samples
from purecomp.errors import ConfigError
from purecomp.graph import ModelGraph
from purecomp.intercept import Interceptor, ScopeStack
from purecomp.transforms.ptq.bias_correction import LAYER_FUNCTIONS, input_quantizers
from purecomp.transforms.ptq.chain_state import without_quantization

from .layer import adaround_layer
from .parameters import AdaRoundParameters
from .rounding import broadcast_grid


@dataclasses.dataclass(frozen=True)
class AdaRoundLayerReport:
    site: str
    weight: str
    error_nearest: float
    error_adaround: float
    settled: float
    flipped: float
    seconds: float
    kept_nearest: bool = False


@dataclasses.dataclass(frozen=True)
class AdaRoundReport:
    """Per layer (graph order) what ``adaround_weights`` did; ``peak_buffer_bytes``: the largest
    inputs + targets held for one layer; ``skipped``: weights not rounded and why."""

    layers: tuple[AdaRoundLayerReport, ...]
    peak_buffer_bytes: int
    seconds: float
    skipped: tuple[tuple[str, str], ...] = ()

    def table(self) -> str:
        rows = ["layer                           error nearest  error AdaRound  settled  flipped  seconds"]
        rows += [f"{r.site:<32}{r.error_nearest:>13.4g}{r.error_adaround:>16.4g}{r.settled:>9.3f}{r.flipped:>9.3f}"
                 f"{r.seconds:>9.1f}{'  (nearest kept)' if r.kept_nearest else ''}" for r in self.layers]
        rows.append(f"peak buffered activations {self.peak_buffer_bytes / 2**20:.1f} MiB, {self.seconds:.1f} s")
        rows += [f"skipped {name}: {why}" for name, why in self.skipped]
        return "\n".join(rows)


def weight_quantizers(state: Any) -> Mapping[str, Any]:
    """The weight quantizers of ``state``: a quantization state's ``weights``, or those of the
    last member of a chain's tuple that has them."""
    members = state if isinstance(state, tuple) else (state,)
    for member in reversed(members):
        table = getattr(member, "weights", None)
        if isinstance(table, Mapping):
            return table
    raise ConfigError("state", "expected a quantization state with weight quantizers (a `weights` table)")


def rounding_layers(model: nn.Module, graph: ModelGraph, quantized: Mapping[str, Any]) -> tuple[
        list[tuple[str, str, str]], list[tuple[str, str]]]:
    """``(site, kind, weight name)`` of every conv / linear call (graph order) whose weight has a
    quantizer in ``quantized``, and ``(weight, reason)`` for weights left out: read by several
    calls (no single input to reconstruct), whether one module is called twice or several modules
    share the parameter. Calls are counted per parameter object, named as ``quantized`` names it."""
    canonical = {id(p): name for name, p in model.named_parameters()}  # the first name of each parameter
    calls: dict[str, list[tuple[str, str]]] = {}
    for node in graph:
        if node.op not in LAYER_FUNCTIONS or not node.scope:
            continue
        weight = getattr(model.get_submodule(node.scope), "weight", None)
        name = canonical.get(id(weight))
        if name is not None and name in quantized:
            calls.setdefault(name, []).append((node.site, node.op))
    layers, skipped = [], []
    for name, found in calls.items():
        if len(found) > 1:
            skipped.append((name, f"read by {len(found)} calls"))
        else:
            layers.append((found[0][0], found[0][1], name))
    return layers, skipped


def _record(model: nn.Module, params: Mapping[str, Tensor], sites: Mapping[str, Any], batches: Sequence[Any],
            site: str, weight: Tensor, bias: Tensor | None, extra: Sequence[Any], want_output: bool) -> Any:
    """Run ``model`` over ``batches`` and keep ``site``'s call only: the data input (after
    ``extra``) and the call's other arguments, or its output."""
    kept: list[Tensor] = []
    template: list[Any] = []

    def record(name: str, kind: str, scope: str, index: int, args: Any, kwargs: Any, out: Any) -> None:
        if name != site:
            return
        if want_output:
            kept.append(out.detach())
            return
        leaves, spec = optree.tree_flatten((args, kwargs))
        data = next(i for i, leaf in enumerate(leaves)
                    if isinstance(leaf, Tensor) and leaf is not weight and leaf is not bias)
        x = leaves[data]
        for fn in extra:
            x = fn(x)
        kept.append(x.detach())
        if not template:
            slot = next(i for i, leaf in enumerate(leaves) if leaf is weight)
            template.extend([spec, leaves, data, slot])

    scopes = ScopeStack(model)
    op_fns = {k: fn for k, fn in sites.items() if not k.startswith("input:")}
    with torch.no_grad():
        for args, kwargs in batches:
            args, kwargs = transform_inputs(args, kwargs, input_sites(sites))
            with scopes.attached(), Interceptor(scopes, sites=op_fns, recorder=record):
                functional_call(model, dict(params), args, kwargs)
    if not kept:
        raise ConfigError("layers", f"{site} was not called on the calibration data")
    shapes = {tuple(t.shape[1:]) for t in kept}
    if len(shapes) > 1:
        raise ConfigError("calibration data", f"{site} received inputs of shapes {sorted(shapes)} beyond the batch "
                          "axis; AdaRound stacks a layer's calibration inputs, expected samples of one shape "
                          "(for text, windows of one length)")
    return torch.cat(kept), template


def adaround_weights(
    model: nn.Module,
    graph: ModelGraph,
    method: Compression,
    params: Mapping[str, Tensor],
    state: Any,
    data: Iterable[Any],
    parameters: AdaRoundParameters | Mapping[str, Any] | None = None,
    *,
    num_samples: int = 300,
    progress_bar: bool = True,
    path: str = "adaround",
) -> tuple[dict[str, Tensor], AdaRoundReport]:
    """``params`` with the weight of every single-call conv / linear that ``method``'s ``state``
    quantizes replaced by its AdaRound rounding on that quantizer's grid (module docstring), and
    the report. ``model`` is only called (functionally); ``params`` is not modified. Applying
    ``method`` to the result reproduces the rounded weights (they lie on the grid)."""
    options = AdaRoundParameters.of(parameters, path)
    count = min(num_samples, options.num_samples or num_samples)
    batches = list(take_samples(data, count, "AdaRound"))
    state = with_training(state, False)
    quantizers = weight_quantizers(state)
    layers, skipped = rounding_layers(model, graph, quantizers)
    reference = {k: v.detach() for k, v in params.items()}  # the float model: targets (and inputs unless sequential)
    before_quantizers = method.params(reference, without_quantization(state))
    transformed = [name for _, _, name in layers if not torch.equal(before_quantizers[name], reference[name])]
    if transformed:
        raise ConfigError(path, f"{len(transformed)} weights (e.g. {transformed[0]!r}) are transformed before "
                          "their quantizer (SmoothQuant, for one; pc.quantize turns it off with "
                          "smooth_quant_alphas={'matmul': -1}), and AdaRound rounds the model's own weights; "
                          "expected a method that only quantizes them")
    out = dict(reference)
    sites = method.sites(state)
    was_training = model.training
    model.eval()
    started = time.perf_counter()
    reports: list[AdaRoundLayerReport] = []
    peak = 0
    bar = tqdm(layers, desc="AdaRound", unit="layer", disable=not progress_bar or None, leave=False)
    try:
        for site, kind, name in bar:
            layer_start = time.perf_counter()
            scope = name.rpartition(".")[0]
            bias_name = f"{scope}.bias"
            if options.sequential:
                current = method.params(out, state)
                inputs, template = _record(model, current, sites, batches, site, current[name],
                                           current.get(bias_name), (), False)
            else:
                own = input_quantizers(site, sites, state)
                inputs, template = _record(model, reference, {}, batches, site, reference[name],
                                           reference.get(bias_name), own, False)
            target, _ = _record(model, reference, {}, batches, site, reference[name], reference.get(bias_name),
                                (), True)
            peak = max(peak, inputs.numel() * inputs.element_size() + target.numel() * target.element_size())
            spec, leaves, data_slot, weight_slot = template
            function = LAYER_FUNCTIONS[kind]

            def layer(x: Tensor, w: Tensor, leaves: list = leaves, spec: Any = spec, data_slot: int = data_slot,
                      weight_slot: int = weight_slot, function: Any = function) -> Tensor:
                call = list(leaves)
                call[data_slot], call[weight_slot] = x, w
                a, kw = optree.tree_unflatten(spec, call)
                return function(*a, **kw)

            quantizer = quantizers[name]
            delta, zero_point, qmin, qmax = quantizer.integer_grid()
            weight = out[name]
            delta, zero_point = broadcast_grid(delta, zero_point, weight, getattr(quantizer, "axis", None))
            result = adaround_layer(layer, inputs, target, weight, (delta, zero_point, qmin, qmax), options,
                                    channel_dim=1 if kind != "linear" else -1)
            out[name] = result.weight.to(weight.dtype)
            del inputs, target
            reports.append(AdaRoundLayerReport(site, name, result.error_nearest, result.error_adaround,
                                               result.settled, result.flipped, time.perf_counter() - layer_start,
                                               result.kept_nearest))
            bar.set_postfix(error=f"{result.error_nearest:.3g}->{result.error_adaround:.3g}")
    finally:
        bar.close()
        model.train(was_training)
    report = AdaRoundReport(tuple(reports), peak, time.perf_counter() - started, tuple(skipped))
    return {k: out[k] if out[k] is not reference[k] else params[k] for k in params}, report
