"""``grouped_activations``: replace chosen per-tensor activation quantizers of a quantization
method by per-group ones (``GroupedQuantizer``), with groups and ranges from calibration."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

from purecomp.compression import Compression
from purecomp.errors import ConfigError, ScopeError
from purecomp.graph import ModelGraph, TensorRef
from purecomp.init_context import InitContext
from purecomp.op_kinds import CHANNEL_PRESERVING_OPS
from purecomp.scopes import scope_matches

from .grouped import GROUP_RANGE_TYPES, ChannelStatistics, channel_groups, make_grouped_quantizer
from .method import QuantizationState
from .quantizer import LogRangeAsymmetricQuantizer, LogScaleSymmetricQuantizer
from .range_init import RangeInit

log = logging.getLogger(__name__)


def grouped_activations(
    method: Compression,
    scopes: Sequence[str],
    num_groups: int = 4,
    range_init: RangeInit | None = None,
) -> Compression:
    """``method`` whose ``init`` turns every activation quantizer all of whose consumers match
    ``scopes`` into a ``GroupedQuantizer`` with at most ``num_groups`` groups.

    After ``method.init``, a second pass over the calibration data records each chosen tensor's
    per-channel minima and maxima (float model, as the per-tensor range init sees it). The groups
    come from ``channel_groups`` on the per-channel ranges, each group's range from the same
    statistics (``range_init.type``: ``min_max``, the default, or ``mean_min_max``; at most
    ``range_init.num_init_samples`` samples). Only the inputs of ``linear`` ops can be grouped, read
    directly or through dropout (the export splits the linear by groups). Bits and everything else stay as ``method``
    made them.

    The grouped quantizers sit on the linears' inputs (keys ``<linear site>:in0``, one copy per
    linear), not on the tensor: the tensor's other readers (a post-LN transformer's residual add)
    read it unquantized. The runtime adds in float anyway (the residual add reads
    DequantizeLinear's float output either way), so only the matmul inputs need to be INT8. Raises ``ScopeError`` when no pattern matches a site, ``ConfigError`` for
    ``num_groups < 1``, a range type without a per-group form, or a matched tensor that also feeds
    something other than a linear.
    """
    patterns = tuple(scopes)
    init_cfg = range_init or RangeInit(type="min_max")
    if not isinstance(num_groups, int) or num_groups < 1:
        raise ConfigError("num_groups", f"expected an integer >= 1, got {num_groups!r}")
    if init_cfg.type not in GROUP_RANGE_TYPES:
        raise ConfigError("range_init.type", f"grouped quantizers support {list(GROUP_RANGE_TYPES)}, got {init_cfg.type!r}")

    def chosen(graph: ModelGraph, state: QuantizationState) -> list[str]:
        keys = []
        for key in state.activations:
            consumers = [c for c in state.consumers_of(key) if c != "output"]
            if not consumers or not all(any(scope_matches(p, graph.node(c)) for p in patterns) for c in consumers):
                continue
            for c in consumers:
                node = graph.node(c)
                if node.op != "linear" or not node.inputs or not _reads_directly(graph, node.inputs[0], key):
                    raise ConfigError(
                        "grouped_activation_scopes",
                        f"{key} feeds {c} ({node.op}); grouped quantizers need every consumer to be a linear "
                        "reading the tensor directly (or through dropout)",
                    )
            keys.append(key)
        return keys

    def regroup(context: InitContext, state: Any) -> Any:
        if isinstance(state, tuple):
            return tuple(regroup(context, s) for s in state)
        if not isinstance(state, QuantizationState):
            return state
        keys = chosen(context.graph, state)
        if not keys:
            return state
        stats = _channel_statistics(context, keys, init_cfg)
        acts = {k: q for k, q in state.activations.items() if k not in keys}
        consumers = [c for c in state.consumers if c[0] not in keys]
        for key in keys:
            if isinstance(state.activations[key], LogRangeAsymmetricQuantizer | LogScaleSymmetricQuantizer):
                raise ConfigError("grouped_activation_scopes", f"{key}: grouped quantizers train their ranges as they "
                                  "are; expected activations without logarithm_scale")
            low, high = stats[key].channel_range(init_cfg.type)
            groups = channel_groups(low, high, num_groups)
            g_low, g_high = stats[key].group_range(groups, init_cfg.type)
            for site in state.consumers_of(key):
                acts[f"{site}:in0"] = make_grouped_quantizer(g_low, g_high, groups, bits=state.activations[key].bits)
                consumers.append((f"{site}:in0", (site,)))
            log.debug("%s: groups of %s channels", key, [groups.count(k) for k in range(max(groups) + 1)])
        log.info("grouped activation quantizers (%d tensors, up to %d groups): %s", len(keys), num_groups, keys)
        return dataclasses.replace(state, activations=acts, consumers=tuple(consumers))

    def init(context: InitContext) -> Any:
        if not any(scope_matches(p, node) for p in patterns for node in context.graph):
            raise ScopeError("grouped_activation_scopes", f"{list(patterns)} match no site of the model; expected "
                             "patterns of linear sites")
        return regroup(context, method.init(context))

    return method._replace(init=init)


def _reads_directly(graph: ModelGraph, ref: TensorRef, key: str) -> bool:
    """Whether ``ref`` is tensor ``key`` itself or reached from it only through ops that keep every
    element in place (dropout, which is the identity in eval mode, clone...)."""
    while ref.key != key:
        producer = graph.producer(ref) if ref.kind == "node" else None
        if producer is None or producer.op not in CHANNEL_PRESERVING_OPS or not producer.inputs:
            return False
        ref = producer.inputs[0]
    return True


def _channel_statistics(context: InitContext, keys: Sequence[str], init: RangeInit) -> dict[str, ChannelStatistics]:
    stats = {key: ChannelStatistics() for key in keys}
    context.calibrate(keys, lambda key, x: stats[key].observe(x), init.num_init_samples, "grouped range init")
    return stats
