"""Bias correction: compensate the shift of each layer's output mean that quantization causes.

For a conv / linear ``L`` with float output ``y`` and quantized output ``y_q`` (quantized
weights, and the quantized model's input to ``L``), the per-channel error of the mean,
``e_c = E[y_c] - E[y_q,c]`` over the calibration data (batch and spatial positions), is added
to ``L``'s bias: ``b_c <- b_c + e_c`` (Nagel et al., 2019, empirical bias correction).

``fast`` measures every layer in one pass of the float and the quantized model. The full
variant walks the layers in graph order and measures each after the layers before it were
corrected (one quantized pass per layer): slower, more accurate when errors compound.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from purecomp.apply import call_with_sites
from purecomp.compression import Compression, compose_sites, with_training
from purecomp.data import take_samples
from purecomp.graph import ModelGraph

CORRECTED_OPS = frozenset({"conv1d", "conv2d", "conv3d", "linear"})


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


def _channel_means(x: Tensor) -> tuple[Tensor, int]:
    """``(sum over all positions per channel, count)``: channels on axis 1 (conv) or last (linear)."""
    x = x.detach().double()
    flat = x.transpose(1, -1).reshape(-1, x.shape[1]) if x.dim() > 2 else x.reshape(-1, x.shape[-1])
    return flat.sum(dim=0), flat.shape[0]


def _means(
    model: nn.Module, params: Mapping[str, Tensor], sites: Mapping[str, Any], keys: Sequence[str],
    batches: Sequence[tuple[tuple, dict]],
) -> dict[str, Tensor]:
    """Per-channel output means at ``keys`` (observed before any transform there) over ``batches``."""
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}

    def observer(key: str) -> Any:
        def observe(x: Tensor) -> Tensor:
            total, n = _channel_means(x)
            sums[key] = sums[key] + total if key in sums else total
            counts[key] = counts.get(key, 0) + n
            return x

        return observe

    table = compose_sites([{k: observer(k) for k in keys}, sites])
    with torch.no_grad():
        for args, kwargs in batches:
            call_with_sites(model, params, table, args, kwargs)
    return {k: (sums[k] / counts[k]).float() for k in sums}


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
) -> dict[str, Tensor]:
    """``params`` with the bias of every correctable layer (``correctable_layers`` of the weights
    ``method`` transforms, or the sites in ``layers``) corrected by the mean error its
    quantization causes; the float reference is ``model`` with ``params`` as they are."""
    batches = list(take_samples(data, num_samples, "bias correction"))
    state = with_training(state, False)
    quantized = method.params(params, state)
    changed = {k for k in quantized if quantized[k] is not params.get(k)}
    sites_of = layers if layers is not None else correctable_layers(graph, params, changed)
    keys = [f"{site}:out0" for site in sites_of]
    was_training = model.training
    model.eval()
    out = dict(params)
    try:
        reference = _means(model, params, {}, keys, batches)
        groups = [keys] if fast else [[k] for k in keys]
        for group in tqdm(groups, desc="bias correction", disable=not progress_bar or fast or None, leave=False):
            current = method.params(out, state)
            measured = _means(model, current, method.sites(state), group, batches)
            for key in group:
                bias = f"{key.rpartition('/')[0]}.bias"
                out[bias] = (out[bias].detach() + (reference[key] - measured[key]).to(out[bias].dtype))
    finally:
        model.train(was_training)
    return out
