"""One quantization step for the quantizers around a residual add.

For ``z = Q_o(Q_a(a) + Q_b(b))`` with symmetric quantizers of steps ``s_a``, ``s_b``, ``s_o``,
giving all three the step ``s = max(s_a, s_b, s_o)`` makes the sum a multiple of ``s``:
``Q_a(a) + Q_b(b) = s (n_a + n_b)``, so ``Q_o`` of it only clamps. A runtime that skips the
rounding of one input quantizer of the add then still computes ``round(a / s) + n_b = n_a + n_b``
exactly: OpenVINO's CPU plugin does skip it when it fuses conv -> quantize -> add -> quantize
into one convolution (``Convolution::setPostOps``, "drop rounding one special residual pattern"),
and with three different steps its result parts from the exported graph's. Each quantizer keeps
its own signedness and levels; only its step changes, to the largest of its group, so no range
shrinks. The step per quantizer is ``(|scale| + eps) / qh``, so ``scale = s qh - eps``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import torch

from purecomp.graph import ModelGraph, TensorRef
from purecomp.ops.reference import EPS
from purecomp.transforms.quantize import SymmetricQuantizer
from purecomp.transforms.quantize.placement import source_of

from .chain_state import map_quantization, quantization_state

log = logging.getLogger(__name__)

RESIDUAL_OPS = frozenset({"add"})


def _reading(graph_key: str | None, site: str, index: int, activations: Mapping[str, Any], consumers_of: Any) -> str | None:
    """The activation quantizer acting on input ``index`` of ``site``: at ``<site>:in<index>``, or
    at ``graph_key``, the tensor placement quantizes for that input (``source_of``: upstream of
    dropout, views and other ops that keep a grid), when ``site`` is one of its consumers."""
    own = f"{site}:in{index}"
    if own in activations:
        return own
    if graph_key is not None and graph_key in activations and site in consumers_of(graph_key):
        return graph_key
    return None


def residual_groups(graph: ModelGraph, state: Any) -> list[list[str]]:
    """Groups (connected through shared quantizers) of the activation quantizers of every add
    whose two inputs and whose output are quantized: each add contributes its two input
    quantizers and the quantizers its output goes through (at the tensor or at each reader)."""
    q_state = quantization_state(state)
    activations = getattr(q_state, "activations", {})
    consumers_of = getattr(q_state, "consumers_of", lambda key: ())
    parent: dict[str, str] = {}

    def root(key: str) -> str:
        while parent.setdefault(key, key) != key:
            key = parent[key]
        return key

    for node in graph:
        if node.op not in RESIDUAL_OPS or len(node.inputs) != 2 or not all(i.is_float for i in node.input_info):
            continue
        keys = [_reading(source_of(graph, ref).key if ref.kind in ("input", "node") else None, node.site, i,
                         activations, consumers_of) for i, ref in enumerate(node.inputs)]
        out = TensorRef("node", node.site, 0)
        outputs = [out.key] if out.key in activations else []
        outputs += [f"{reader.site}:in{i}" for reader, i in graph.consumers(out) if f"{reader.site}:in{i}" in activations]
        if None in keys or not outputs:
            continue
        first, *rest = [*keys, *outputs]
        for key in rest:
            parent[root(key)] = root(first)
    groups: dict[str, list[str]] = {}
    for key in parent:
        groups.setdefault(root(key), []).append(key)
    return [sorted(g) for g in groups.values() if len(g) > 1]


def unify_residual_scales(graph: ModelGraph, state: Any) -> tuple[Any, list[list[str]]]:
    """``state`` with every ``residual_groups`` group of per-tensor symmetric quantizers on one
    step, the largest of the group's (module docstring); returns it and the groups it unified
    (a group with another kind of quantizer is left as it is)."""
    activations = dict(quantization_state(state).activations)
    unified = []
    for group in residual_groups(graph, state):
        members = [activations[k] for k in group]
        if not all(type(q) is SymmetricQuantizer and q.scale.numel() == 1 for q in members):
            log.info("residual add quantizers %s left as they are: one step needs linear symmetric per-tensor "
                     "quantizers, got %s", group, sorted({type(q).__name__ for q in members}))
            continue
        step = max(float(q.integer_grid()[0]) for q in members)
        for key, q in zip(group, members):
            scale = torch.full_like(q.scale.detach(), step * q.levels[1] - EPS)
            activations[key] = dataclasses.replace(q, scale=scale.requires_grad_(q.scale.requires_grad))
        unified.append(group)
    return map_quantization(state, lambda q: dataclasses.replace(q, activations=activations)), unified
