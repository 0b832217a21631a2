"""Bias correction: compensate the shift of each layer's output mean that quantization causes.

For a conv / linear ``L`` with float output ``y`` and quantized output ``y_q`` (quantized
weights, and the quantized model's input to ``L``), the per-channel error of the mean,
``e_c = E[y_c] - E[y_q,c]`` over the calibration data (batch and spatial positions), is added
to ``L``'s bias: ``b_c <- b_c + e_c`` (Nagel et al., 2019, empirical bias correction).

``fast`` (NNCF's fast bias correction) corrects each layer for the error of its own
quantization only: in one pass of the float model, each layer is also run quantized (its
quantized weight, its input activation quantizers) on the float input it receives there, and
``y_q`` is that output. The errors of the layers before ``L`` are left to their own
corrections; measuring ``y_q`` in the quantized model instead would correct an upstream
layer's shift once there and again in every layer after it. The full variant walks the layers
in graph order and measures each in the quantized model after the layers before it were
corrected (one quantized pass per layer): slower, it also compensates what the corrected
upstream errors still shift downstream.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import optree
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from tqdm.auto import tqdm

from purecomp.apply import call_with_sites
from purecomp.compression import Compression, compose_sites, with_training
from purecomp.data import take_samples
from purecomp.graph import ModelGraph
from purecomp.intercept import Interceptor, ScopeStack, split_site

from .chain_state import quantization_state

LAYER_FUNCTIONS = {"conv1d": F.conv1d, "conv2d": F.conv2d, "conv3d": F.conv3d, "linear": F.linear}
CORRECTED_OPS = frozenset(LAYER_FUNCTIONS)


def correctable_layers(graph: ModelGraph, params: Mapping[str, Tensor], weights: Iterable[str]) -> list[str]:
    """Sites (graph order) of the first call of each conv / linear whose weight is in ``weights``
    and whose bias is a parameter in ``params``."""
    wanted = set(weights)
    sites = []
    for node in graph:
        if node.op not in CORRECTED_OPS or node.index != 0 or not node.scope:
            continue
        if f"{node.scope}.weight" in wanted and f"{node.scope}.bias" in params:
            sites.append(node.site)
    return sites


def _means(
    model: nn.Module, params: Mapping[str, Tensor], sites: Mapping[str, Any], keys: Sequence[str],
    batches: Sequence[tuple[tuple, dict]],
) -> dict[str, Tensor]:
    """Per-channel output means at ``keys`` (observed before any transform there) over ``batches``."""
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}

    def observer(key: str) -> Any:
        def observe(x: Tensor) -> Tensor:
            total, n = _layer_sums(x, split_site(key.rpartition(":")[0])[1])
            sums[key] = sums[key] + total if key in sums else total
            counts[key] = counts.get(key, 0) + n
            return x

        return observe

    table = compose_sites([{k: observer(k) for k in keys}, sites])
    with torch.no_grad():
        for args, kwargs in batches:
            call_with_sites(model, params, table, args, kwargs)
    return {k: (sums[k] / counts[k]).float() for k in sums}


def input_quantizers(site: str, sites: Mapping[str, Any], state: Any) -> list[Any]:
    """The activation transforms that act on the data input of ``site``: one at ``<site>:in0``
    and those at producers whose consumers (``consumers_of`` of the state's quantization member)
    include ``site``."""
    consumers_of = getattr(quantization_state(state), "consumers_of", None)
    return [fn for key, fn in sites.items()
            if key == f"{site}:in0" or (consumers_of is not None and site in consumers_of(key))]


def _layer_sums(y: Tensor, kind: str) -> tuple[Tensor, int]:
    """``(sum over all positions per output channel, count)`` of a layer output: channels on axis 1
    for a conv, on the last axis for a linear (whatever its rank). Summed in the output's dtype
    (one batch), returned in float64 for accumulation over batches."""
    y = y.detach()
    channel = y.dim() - 1 if kind == "linear" or y.dim() <= 2 else 1
    dims = [d for d in range(y.dim()) if d != channel]
    return y.sum(dim=dims).double(), y.numel() // y.shape[channel]


def _batch_sum(x: Tensor, kind: str) -> Tensor:
    """``x`` summed over its samples (a conv's batch axis; every axis but a linear's last) into
    one sample. A conv / linear ``f`` with bias ``b`` gives ``sum_i f(x_i) = f(sum_i x_i) + (n - 1) b``
    at each output position, and the ``b`` cancels in the difference of two such calls."""
    return x.reshape(-1, x.shape[-1]).sum(0, keepdim=True) if kind == "linear" else x.sum(0, keepdim=True)


def _local_shifts(
    model: nn.Module, params: Mapping[str, Tensor], quantized: Mapping[str, Tensor], sites: Mapping[str, Any],
    state: Any, layers: Sequence[str], batches: Sequence[tuple[tuple, dict]],
) -> dict[str, Tensor]:
    """One pass of the float model: per layer site, the per-channel mean of ``y - y_q``, its float
    output minus the same call with its weight quantized and its input through ``input_quantizers``.
    Both calls run on the batch summed into one sample (``_batch_sum``): the sum over samples and
    positions of ``y - y_q`` is that of ``f(sum x) - f_q(sum x_q)``, at a batch's fraction of the cost."""
    wanted = set(layers)
    inputs = {site: input_quantizers(site, sites, state) for site in layers}
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}

    def record(site: str, kind: str, scope: str, index: int, args: Any, kwargs: Any, out: Any) -> None:
        if site not in wanted:
            return
        weight, bias = params[f"{scope}.weight"], params.get(f"{scope}.bias")
        leaves, spec = optree.tree_flatten((args, kwargs))
        data = next(i for i, leaf in enumerate(leaves)
                    if isinstance(leaf, Tensor) and leaf is not weight and leaf is not bias)
        x = x_q = leaves[data]
        for fn in inputs[site]:
            x_q = fn(x_q)
        q_leaves = [quantized[f"{scope}.weight"] if leaf is weight else leaf for leaf in leaves]
        batched = kind == "linear" or x.dim() == int(kind[4]) + 2
        if batched:  # the layer is linear in its input: sum the batch first, run one sample
            leaves[data], q_leaves[data] = _batch_sum(x, kind), _batch_sum(x_q, kind)
            float_args, float_kwargs = optree.tree_unflatten(spec, leaves)
            difference = LAYER_FUNCTIONS[kind](*float_args, **float_kwargs)
        else:
            q_leaves[data], difference = x_q, out
        q_args, q_kwargs = optree.tree_unflatten(spec, q_leaves)
        total, _ = _layer_sums(difference - LAYER_FUNCTIONS[kind](*q_args, **q_kwargs), kind)
        n = _layer_sums(out, kind)[1]
        sums[site] = sums[site] + total if site in sums else total
        counts[site] = counts.get(site, 0) + n

    scopes = ScopeStack(model)
    with torch.no_grad():
        for args, kwargs in batches:
            with scopes.attached(), Interceptor(scopes, recorder=record):
                functional_call(model, dict(params), args, kwargs)
    return {site: (sums[site] / counts[site]).float() for site in sums}


def bias_correction(
    model: nn.Module,
    graph: ModelGraph,
    method: Compression,
    params: Mapping[str, Tensor],
    state: Any,
    data: Iterable[Any],
    num_samples: int = 300,
    *,
    fast: bool = True,
    layers: Sequence[str] | None = None,
    progress_bar: bool = True,
    quantized_weights: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """``params`` with the bias of every correctable layer (``correctable_layers`` of the weights
    ``method`` transforms, or the sites in ``layers``) corrected by the mean error its
    quantization causes; the float reference is ``model`` with ``params`` as they are.
    ``quantized_weights``: weights the quantized side uses instead of ``params``' (AdaRound's
    rounding; the method's quantizers then apply to them)."""
    batches = list(take_samples(data, num_samples, "bias correction"))
    state = with_training(state, False)
    on_quantized_side = dict(params) | dict(quantized_weights or {})
    quantized = method.params(on_quantized_side, state)
    changed = {k for k in quantized if quantized[k] is not on_quantized_side.get(k)} | set(quantized_weights or {})
    sites_of = layers if layers is not None else correctable_layers(graph, params, changed)
    keys = [f"{site}:out0" for site in sites_of]
    was_training = model.training
    model.eval()
    out = dict(params)
    try:
        if fast:
            shifts = _local_shifts(model, params, quantized, method.sites(state), state, sites_of, batches)
            for site in sites_of:
                bias = f"{site.rpartition('/')[0]}.bias"
                if site in shifts:
                    out[bias] = out[bias].detach() + shifts[site].to(out[bias].dtype)
            return out
        reference = _means(model, params, {}, keys, batches)
        for key in tqdm(keys, desc="bias correction", disable=not progress_bar or None, leave=False):
            current = method.params(out | dict(quantized_weights or {}), state)
            measured = _means(model, current, method.sites(state), [key], batches)
            bias = f"{key.rpartition('/')[0]}.bias"
            out[bias] = (out[bias].detach() + (reference[key] - measured[key]).to(out[bias].dtype))
    finally:
        model.train(was_training)
    return out
