"""Where quantizers go, computed on a recorded ``ModelGraph``.

Weights: one quantizer per weight parameter of a conv, conv-transpose, linear or matmul.
Activations: the tensor inputs of quantizable ops, moved upstream through
quantization-agnostic ops (reshape, max pool, dropout...) to the tensor that produced
them; one quantizer per such tensor, shared by all its consumers. Because only quantizable
ops ask for quantized inputs, and batch norm / activations that follow a conv or linear are
not quantizable, no quantizer lands inside conv/linear -> batch norm -> activation: it sits
after the last op of that pattern.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from purecomp.graph import ModelGraph, OpNode, TensorRef
from purecomp.op_kinds import (
    AGNOSTIC_OPS,
    CONV_OPS,
    CONV_TRANSPOSE_OPS,
    ELEMENTWISE_OPS,
    EMBEDDING_OPS,
    LINEAR_OPS,
    NORM_FUSING_PRODUCERS,
    NORM_OPS,
    QUANTIZABLE_OPS,
    WEIGHTED_OPS,
)


@dataclasses.dataclass(frozen=True)
class WeightTarget:
    """A weight parameter to quantize: its name, per-channel axis and the ops that read it."""

    param: str
    axis: int
    readers: tuple[str, ...]
    op: str


@dataclasses.dataclass(frozen=True)
class ActivationTarget:
    """A tensor to quantize (key ``input:<name>`` or ``<site>:out<j>``) and the ops it feeds."""

    key: str
    ref: TensorRef
    consumers: tuple[str, ...]


def weight_axis(node: OpNode, position: int) -> int:
    """Output-channel axis of the weight read at input ``position`` of ``node`` (rows of an embedding)."""
    if node.op in CONV_TRANSPOSE_OPS:
        return 1
    if node.op in CONV_OPS | LINEAR_OPS | EMBEDDING_OPS:
        return 0
    # matmul-like: out = a @ b; the output channels of b are its last axis, of a its second-to-last
    rank = len(node.input_info[position].shape)
    return rank - 1 if position == len(node.inputs) - 1 else max(rank - 2, 0)


def _weight_position(node: OpNode) -> int | None:
    if node.op in CONV_OPS | CONV_TRANSPOSE_OPS | LINEAR_OPS | EMBEDDING_OPS:
        ok = len(node.inputs) > 1 and node.inputs[1].kind == "param"
        return 1 if ok else None
    for k, ref in enumerate(node.inputs):
        if ref.kind == "param" and node.input_info[k].is_float:
            return k
    return None


def _from_constant(graph: ModelGraph, ref: TensorRef) -> bool:
    """Whether ``ref`` is a parameter or constant seen through shape-only ops (``weight.view(1, -1, 1, 1)``)."""
    while ref.kind == "node":
        producer = graph.producer(ref)
        if producer is None or producer.op not in AGNOSTIC_OPS or not producer.inputs:
            return False
        ref = producer.inputs[0]
    return ref.kind in ("param", "const")


def activation_positions(graph: ModelGraph, node: OpNode) -> list[int]:
    """Positions of the activation (non-parameter, floating) inputs of ``node`` to quantize.

    An elementwise ``add`` / ``mul`` is quantized only when it joins two activations (a
    residual add, an attention-style product): with a scalar or a parameter on the other side
    (``x + eps``, ``x * scale``) no integer kernel needs its input quantized, and quantizing it
    only adds error (inside a normalization, ``sum(x^2) + eps`` then a division, a lot).
    """
    if node.op not in QUANTIZABLE_OPS:
        return []
    if node.op in NORM_OPS:
        producer = graph.producer(node.inputs[0]) if node.inputs else None
        if producer is not None and producer.op in NORM_FUSING_PRODUCERS:
            return []
        candidates = [0]
    elif node.op in CONV_OPS | CONV_TRANSPOSE_OPS | LINEAR_OPS:
        candidates = [0]
    else:
        candidates = list(range(len(node.inputs)))
    positions = [
        k for k in candidates
        if k < len(node.inputs)
        and node.inputs[k].kind in ("node", "input")
        and node.input_info[k].is_float
        and not _from_constant(graph, node.inputs[k])
    ]
    if node.op in ELEMENTWISE_OPS and len(positions) < 2:
        return []
    return positions


def source_of(graph: ModelGraph, ref: TensorRef) -> TensorRef:
    """Walk ``ref`` upstream through quantization-agnostic ops to the tensor that needs the quantizer."""
    while ref.kind == "node":
        producer = graph.producer(ref)
        if producer is None or producer.op not in AGNOSTIC_OPS or not producer.inputs:
            break
        upstream = producer.inputs[0]
        if upstream.kind not in ("node", "input"):
            break
        ref = upstream
    return ref


# ---------------------------------------------------------------- placement


def weight_targets(graph: ModelGraph, allowed: Iterable[str]) -> list[WeightTarget]:
    allowed = set(allowed)
    found: dict[str, WeightTarget] = {}
    for node in graph:
        if node.op not in WEIGHTED_OPS:
            continue
        k = _weight_position(node)
        if k is None:
            continue
        name = node.inputs[k].name
        if name in found:
            prev = found[name]
            found[name] = dataclasses.replace(prev, readers=prev.readers + (node.site,))
        else:
            found[name] = WeightTarget(name, weight_axis(node, k), (node.site,), node.op)
    return [t for t in found.values() if any(r in allowed for r in t.readers)]


def activation_targets(
    graph: ModelGraph, allowed: Iterable[str], *, quantize_inputs: bool, quantize_outputs: bool,
    input_ops: Iterable[str] = (),
) -> list[ActivationTarget]:
    """Tensors to quantize, one quantizer shared by all the tensor's quantized readers; the readers
    whose op is in ``input_ops`` get their own quantizer at their input instead (key
    ``<site>:in<k>``), which the tensor's other readers do not see."""
    allowed = set(allowed)
    own_input = frozenset(input_ops)
    consumers: dict[TensorRef, list[str]] = {}
    at_inputs: list[ActivationTarget] = []
    for node in graph:
        if node.site not in allowed:
            continue
        for k in activation_positions(graph, node):
            if node.op in own_input:
                at_inputs.append(ActivationTarget(f"{node.site}:in{k}", TensorRef("node", node.site), (node.site,)))
                continue
            src = source_of(graph, node.inputs[k])
            producer = graph.producer(src)
            if producer is not None and producer.op in EMBEDDING_OPS:
                continue
            sites = consumers.setdefault(src, [])
            if node.site not in sites:
                sites.append(node.site)
    if quantize_outputs:
        for ref in graph.outputs:
            if ref.kind == "node" and graph.node(ref.name).outputs[ref.index].is_float:
                consumers.setdefault(ref, []).append("output")
    targets = [
        ActivationTarget(ref.key, ref, tuple(sites))
        for ref, sites in consumers.items()
        if quantize_inputs or ref.kind != "input"
    ] + at_inputs
    order = {node.site: i for i, node in enumerate(graph)}
    targets.sort(key=lambda t: order.get(t.ref.name, -1) if t.ref.kind == "node" else -1)
    return targets
