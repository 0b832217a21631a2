"""Channel dependency groups for filter pruning, computed on a recorded ``ModelGraph``.

Every channel of a tracked tensor carries an id. A conv / linear with ``groups == 1`` (the
*producer*) gives its output fresh ids; batch norm, depthwise convs and zero-preserving
elementwise ops reuse their input's ids; ``add``/``sub``/``mul``/``div`` of channel-aligned
tensors unite ids position-wise; ``cat`` on the channel axis concatenates the id lists; a
``flatten`` to ``(N, C*H*W)`` keeps the ids with a block of ``H*W`` features per channel.
Ids that touch the same slice of one parameter are united too (shared weights).

A union-find class of ids is one *channel*: removing it means removing the filters of its
producers, the matching rows of batch norms and depthwise convs, and the matching input
channels (or linear input column blocks) of its consumers. It is SAFE to remove when every
op touching it is known, it reaches no model output, every producer is an eligible
conv/linear module, and it is provably zero at every consumer once the masked slots are
zero (a per-channel ``zero`` flag: producers true; batch norm and zero-preserving ops keep
their input's; ``sigmoid``-like ops false; add/sub AND, mul OR, div the numerator's).
Classes that share a producer layer form a *group* (a ResNet stage's residual channels are
one group); a group is prunable only when all of its classes are safe.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

from purecomp.graph import ModelGraph, OpNode, TensorRef
from purecomp.op_kinds import (
    BINARY_OPS,
    CONV_OPS,
    CONV_TRANSPOSE_OPS,
    NONZERO_UNARY_OPS,
    RESHAPE_OPS,
    SPATIAL_OPS,
    ZERO_PRESERVING_OPS,
)
from purecomp.scopes import Scope, select_sites

CONV_MODULES = frozenset({"Conv1d", "Conv2d", "Conv3d"})
CONV_TRANSPOSE_MODULES = frozenset({"ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d"})
NORM_MODULES = frozenset({"BatchNorm1d", "BatchNorm2d", "BatchNorm3d"})

# roles of a slot: which ones are zeroed while training, which only disappear at export
MASKED_ROLES = frozenset({"filter", "bias", "member"})  # + "norm" when batch norms are pruned
ROLES = ("filter", "bias", "member", "norm", "stat", "consumer")


@dataclasses.dataclass(frozen=True)
class Slot:
    """The slice ``[start, stop)`` along ``axis`` of parameter ``param`` that belongs to a channel."""

    param: str
    axis: int
    start: int
    stop: int
    role: str  # one of ROLES

    @property
    def key(self) -> tuple[str, int, int, int]:
        return (self.param, self.axis, self.start, self.stop)


@dataclasses.dataclass(frozen=True)
class ChannelClass:
    """One removable channel: its producer filters and every slot that goes with it."""

    slots: tuple[Slot, ...]

    @property
    def filters(self) -> tuple[Slot, ...]:
        return tuple(s for s in self.slots if s.role == "filter")


@dataclasses.dataclass(frozen=True)
class ChannelGroup:
    """Classes tied through shared producer layers; ``reasons`` empty means prunable."""

    layers: tuple[str, ...]  # producer weight names
    classes: tuple[ChannelClass, ...]
    reasons: tuple[str, ...]

    @property
    def prunable(self) -> bool:
        return not self.reasons


@dataclasses.dataclass(frozen=True, eq=False)
class PruningGroups:
    """Every channel group of a model (compared by identity: it is static state metadata)."""

    groups: tuple[ChannelGroup, ...]

    @property
    def prunable(self) -> tuple[int, ...]:
        """Indices of the prunable groups."""
        return tuple(i for i, g in enumerate(self.groups) if g.prunable)

    def unsafe(self) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
        """``(layers, reasons)`` of every group left unpruned."""
        return [(g.layers, g.reasons) for g in self.groups if not g.prunable]


@dataclasses.dataclass
class _Channels:
    """Channel ids of one tensor along ``axis``; with ``block > 1`` feature ``j`` is channel ``j // block``."""

    ids: list[int]
    zero: list[bool]
    axis: int
    block: int = 1


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []

    def fresh(self, n: int) -> list[int]:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return list(range(start, start + n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


class _Analysis:
    """One pass over the graph in execution order, collecting ids, slots and unsafe reasons."""

    def __init__(
        self,
        graph: ModelGraph,
        allowed: frozenset[str],
        prune_first_conv: bool,
        prune_downsample_convs: bool,
    ) -> None:
        self.graph = graph
        self.allowed = allowed
        self.prune_first_conv = prune_first_conv
        self.prune_downsample_convs = prune_downsample_convs
        self.uf = _UnionFind()
        self.tensors: dict[TensorRef, _Channels] = {}
        self.slots: dict[int, list[Slot]] = {}
        self.reasons: dict[int, list[str]] = {}
        self.no_weighted_yet: set[TensorRef] = set()  # tensors no conv/linear has touched

    # ---------------------------------------------------------------- helpers
    def unsafe(self, ids: Sequence[int], reason: str) -> None:
        for i in ids:
            self.reasons.setdefault(i, []).append(reason)

    def add_slots(self, ids: Sequence[int], make: Callable[[int], list[Slot]]) -> None:
        for c, i in enumerate(ids):
            for slot in make(c):
                self.slots.setdefault(i, []).append(slot)

    def channels(self, node: OpNode, k: int) -> _Channels | None:
        return self.tensors.get(node.inputs[k])

    def poison_inputs(self, node: OpNode, reason: str) -> None:
        for ref in node.inputs:
            ch = self.tensors.get(ref)
            if ch is not None:
                self.unsafe(ch.ids, reason)

    def first_input_is_raw(self, node: OpNode) -> bool:
        ref = node.inputs[0]
        return ref.kind == "input" or ref in self.no_weighted_yet

    def set_out(self, node: OpNode, ch: _Channels) -> None:
        self.tensors[TensorRef("node", node.site, 0)] = ch

    # ---------------------------------------------------------------- ops
    def run(self) -> None:
        for node in self.graph:
            raw = bool(node.inputs) and any(
                r.kind == "input" or r in self.no_weighted_yet
                for r in node.inputs
                if r.kind in ("input", "node")
            )
            if node.op in CONV_OPS | CONV_TRANSPOSE_OPS or node.op == "linear":
                self.weighted(node)
                continue
            handler = getattr(self, f"op_{node.op}", None)
            if handler is None:
                if node.op in ZERO_PRESERVING_OPS or node.op in NONZERO_UNARY_OPS:
                    handler = self.unary
                elif node.op in BINARY_OPS:
                    handler = self.binary
                elif node.op in RESHAPE_OPS:
                    handler = self.reshape
            if handler is None:
                self.poison_inputs(node, f"unsupported op {node.op} at {node.site}")
            else:
                handler(node)
            if raw:
                self.no_weighted_yet.add(TensorRef("node", node.site, 0))
        for ref in self.graph.outputs:
            ch = self.tensors.get(ref)
            if ch is not None:
                self.unsafe(ch.ids, f"reaches the model output {ref.name}")
        # a result no recorded op reads may leave the model inside a container the tracer does
        # not flatten (e.g. a HuggingFace ModelOutput): treat it as an output
        read = {ref for node in self.graph for ref in node.inputs}
        for ref, ch in self.tensors.items():
            if ref not in read and ref not in self.graph.outputs:
                self.unsafe(
                    ch.ids, f"the result of {ref.name} is read by no op (taken as a model output)"
                )

    def weighted(self, node: OpNode) -> None:
        """Conv / conv-transpose / linear: consumer of its input channels, producer of its output."""
        if len(node.inputs) < 2 or node.inputs[1].kind != "param":
            self.poison_inputs(node, f"{node.op} at {node.site} has no weight parameter")
            return
        weight = node.inputs[1].name
        bias = (
            node.inputs[2].name if len(node.inputs) > 2 and node.inputs[2].kind == "param" else None
        )
        transpose = node.op in CONV_TRANSPOSE_OPS
        is_linear = node.op == "linear"
        modules = {"linear": frozenset({"Linear"})}.get(
            node.op, CONV_TRANSPOSE_MODULES if transpose else CONV_MODULES
        )
        module_ok = weight == f"{node.scope}.weight" and node.module_type in modules
        in_shape, out_shape = node.input_info[0].shape, node.outputs[0].shape
        groups = int(node.option("groups", 1) or 1)
        in_axis = len(in_shape) - 1 if is_linear else 1
        out_axis = len(out_shape) - 1 if is_linear else 1
        ch = self.channels(node, 0)
        raw = self.first_input_is_raw(node)
        if ch is not None and ch.axis != in_axis:
            self.unsafe(ch.ids, f"channel axis moves before {node.site}")
            ch = None
        if ch is not None and not module_ok:
            self.unsafe(ch.ids, f"{node.site} is not a {'/'.join(sorted(modules))} module")
            ch = None
        # depthwise conv: output channel c is input channel c
        if groups > 1:
            depthwise = not transpose and groups == in_shape[1] == out_shape[1]
            if ch is not None and depthwise and ch.block == 1:
                self.add_slots(
                    ch.ids,
                    lambda c: (
                        [Slot(weight, 0, c, c + 1, "member")]
                        + ([Slot(bias, 0, c, c + 1, "member")] if bias else [])
                    ),
                )
                self.set_out(node, _Channels(list(ch.ids), list(ch.zero), 1))
                return
            if ch is not None:
                self.unsafe(ch.ids, f"grouped conv {node.site} (groups={groups})")
            ids = self.uf.fresh(out_shape[1])
            self.unsafe(ids, f"produced by grouped conv {node.site}")
            self.set_out(node, _Channels(ids, [False] * len(ids), 1))
            return
        if ch is not None:
            block = ch.block
            for c, ok in enumerate(ch.zero):
                if not ok:
                    self.unsafe([ch.ids[c]], f"not provably zero at its consumer {node.site}")
            consumer_axis = 0 if transpose else 1
            self.add_slots(
                ch.ids,
                lambda c: [Slot(weight, consumer_axis, c * block, (c + 1) * block, "consumer")],
            )
        # producer
        filter_axis = 1 if transpose else 0
        ids = self.uf.fresh(out_shape[out_axis])
        self.add_slots(
            ids,
            lambda c: (
                [Slot(weight, filter_axis, c, c + 1, "filter")]
                + ([Slot(bias, 0, c, c + 1, "bias")] if bias else [])
            ),
        )
        if not module_ok:
            self.unsafe(ids, f"{node.site} is not a {'/'.join(sorted(modules))} module")
        if node.site not in self.allowed:
            self.unsafe(ids, f"{node.site} is excluded by ignored_scopes/target_scopes")
        if not is_linear and raw and not self.prune_first_conv:
            self.unsafe(ids, f"{node.site} is a first conv (prune_first_conv=False)")
        stride = node.option("stride", 1)
        strides = stride if isinstance(stride, tuple) else (stride,)
        if (
            node.op in CONV_OPS
            and any(int(s) > 1 for s in strides)
            and not self.prune_downsample_convs
        ):
            self.unsafe(ids, f"{node.site} is a downsampling conv (prune_downsample_convs=False)")
        self.set_out(node, _Channels(ids, [True] * len(ids), out_axis))

    def op_batch_norm(self, node: OpNode) -> None:
        ch = self.channels(node, 0)
        if ch is None:
            return
        if ch.axis != 1 or ch.block != 1 or node.module_type not in NORM_MODULES:
            self.poison_inputs(
                node, f"batch norm {node.site} is not a BatchNorm module over the channel axis"
            )
            return
        params = [r.name for r in node.inputs[1:] if r.kind == "param"]
        roles = {
            p: ("stat" if p.rsplit(".", 1)[-1].startswith("running") else "norm") for p in params
        }
        if (
            any(not p.startswith(node.scope + ".") for p in params)
            or len(params) != len(node.inputs) - 1
        ):
            self.poison_inputs(
                node, f"batch norm {node.site} reads tensors that are not its module's parameters"
            )
            return
        self.add_slots(ch.ids, lambda c: [Slot(p, 0, c, c + 1, roles[p]) for p in params])
        self.set_out(node, _Channels(list(ch.ids), list(ch.zero), 1))

    def unary(self, node: OpNode) -> None:
        tracked = [k for k, r in enumerate(node.inputs) if r in self.tensors]
        extra = [r for r in node.inputs[1:] if r.kind in ("node", "input", "param")]
        ch = self.channels(node, 0)
        if ch is None:
            if tracked:
                self.poison_inputs(
                    node, f"{node.op} at {node.site} reads channels as a secondary input"
                )
            return
        out_shape = node.outputs[0].shape
        spatial = node.op in SPATIAL_OPS
        same_channels = (
            len(out_shape) > ch.axis and out_shape[ch.axis] == node.input_info[0].shape[ch.axis]
        )
        if extra or not same_channels or (spatial and (ch.axis != 1 or ch.block != 1)):
            self.poison_inputs(node, f"{node.op} at {node.site} changes or mixes channels")
            return
        zero = list(ch.zero) if node.op in ZERO_PRESERVING_OPS else [False] * len(ch.ids)
        self.set_out(node, _Channels(list(ch.ids), zero, ch.axis, ch.block))

    def binary(self, node: OpNode) -> None:
        out_shape = node.outputs[0].shape
        rank = len(out_shape)
        k0 = next((k for k, r in enumerate(node.inputs) if r in self.tensors), None)
        if k0 is None:
            return
        first = self.tensors[node.inputs[k0]]
        axis = (
            first.axis + rank - len(node.input_info[k0].shape)
        )  # in the output's (broadcast) rank
        block = first.block
        size = out_shape[axis]
        aligned: list[_Channels] = []
        broadcast_terms = False
        for k, ref in enumerate(node.inputs):
            shape = node.input_info[k].shape
            pos = axis - (rank - len(shape))
            dim = shape[pos] if pos >= 0 else 1
            ch = self.tensors.get(ref)
            if dim == 1:
                broadcast_terms = True
                if ch is not None:
                    self.unsafe(ch.ids, f"broadcast along channels at {node.site}")
                continue
            if ch is None or ch.axis != pos or ch.block != block or dim != size:
                self.poison_inputs(
                    node,
                    f"{node.op} at {node.site} mixes tracked channels with an untracked tensor",
                )
                return
            aligned.append(ch)
        if not aligned:  # a single channel broadcast everywhere
            self.poison_inputs(node, f"{node.op} at {node.site} broadcasts a single channel")
            return
        ids = list(aligned[0].ids)
        for ch in aligned[1:]:
            for a, b in zip(ids, ch.ids):
                self.uf.union(a, b)
        if node.op in ("add", "sub"):
            zero = [all(ch.zero[c] for ch in aligned) for c in range(len(ids))]
            if broadcast_terms or len(node.inputs) < 2:  # a broadcast or scalar term is added
                zero = [False] * len(ids)
        elif node.op == "mul":
            zero = [any(ch.zero[c] for ch in aligned) for c in range(len(ids))]
        else:  # div: zero where the numerator is
            numerator = self.tensors.get(node.inputs[0])
            zero = list(numerator.zero) if numerator is aligned[0] else [False] * len(ids)
        self.set_out(node, _Channels(ids, zero, axis, block))

    def op_cat(self, node: OpNode) -> None:
        out_shape = node.outputs[0].shape
        chans = [self.tensors.get(r) for r in node.inputs]
        if all(c is None for c in chans):
            return
        shapes = [i.shape for i in node.input_info]
        dim = node.option("dim")
        if dim is None:
            dims = [
                d
                for d in range(len(out_shape))
                if out_shape[d] == sum(s[d] for s in shapes)
                and all(
                    s[e] == out_shape[e] for s in shapes for e in range(len(out_shape)) if e != d
                )
            ]
            dim = dims[0] if len(dims) == 1 or len(shapes) > 1 else 1
        dim = dim % len(out_shape)
        if any(c is None or c.axis != 1 or c.block != 1 for c in chans):
            self.poison_inputs(
                node, f"cat at {node.site} joins tracked channels with untracked tensors"
            )
            return
        if dim == 1:
            ids = [i for c in chans for i in c.ids]
            zero = [z for c in chans for z in c.zero]
        else:
            ids = list(chans[0].ids)
            for c in chans[1:]:
                for a, b in zip(ids, c.ids):
                    self.uf.union(a, b)
            zero = [all(c.zero[j] for c in chans) for j in range(len(ids))]
        self.set_out(node, _Channels(ids, zero, 1))

    def reduction(self, node: OpNode) -> None:
        """``mean``/``sum``/``amax`` over spatial axes keep (zero) channels; over channels: unsafe."""
        ch = self.channels(node, 0)
        if ch is None:
            return
        in_shape, out_shape = node.input_info[0].shape, node.outputs[0].shape
        dims = node.option("dim")
        if dims is not None:
            dims = {d % len(in_shape) for d in (dims if isinstance(dims, tuple) else (dims,))}
            keeps = 0 not in dims and 1 not in dims
        elif len(out_shape) == len(in_shape):  # keepdim: the reduced axes have size 1
            keeps = out_shape[:2] == in_shape[:2]
        else:  # without dims, only an unambiguous spatial reduction is understood
            keeps = (
                len(out_shape) >= 2
                and out_shape[:2] == in_shape[:2]
                and in_shape[1] not in in_shape[2:]
            )
        if not keeps or ch.axis != 1 or ch.block != 1 or len(node.inputs) > 1:
            self.poison_inputs(node, f"{node.op} at {node.site} reduces over channels")
            return
        self.set_out(node, _Channels(list(ch.ids), list(ch.zero), 1))

    op_mean = op_sum = op_amax = reduction

    def reshape(self, node: OpNode) -> None:
        ch = self.channels(node, 0)
        if ch is None:
            return
        in_shape, out_shape = node.input_info[0].shape, node.outputs[0].shape
        if tuple(in_shape) == tuple(out_shape):
            self.set_out(node, _Channels(list(ch.ids), list(ch.zero), ch.axis, ch.block))
            return
        flattens = (
            ch.axis == 1
            and ch.block == 1
            and len(out_shape) == 2
            and len(in_shape) >= 2
            and out_shape[0] == in_shape[0]
            and out_shape[1] == math.prod(in_shape[1:])
        )
        if not flattens:
            self.poison_inputs(node, f"{node.op} at {node.site} reshapes the channel axis")
            return
        block = math.prod(in_shape[2:])
        self.set_out(node, _Channels(list(ch.ids), list(ch.zero), 1, block))


def channel_groups(
    graph: ModelGraph,
    *,
    prune_first_conv: bool = False,
    prune_downsample_convs: bool = False,
    ignored_scopes: Sequence[str] = (),
    target_scopes: Sequence[str] | None = None,
    origin: str = "",
    scope: Scope | None = None,
) -> PruningGroups:
    """The channel groups of ``graph`` (see the module docstring for the rules); only the sites
    the scopes (and ``scope``, ``InitContext.scope``) allow are pruned."""
    allowed = select_sites(graph, ignored_scopes, target_scopes, origin, scope)
    analysis = _Analysis(graph, allowed, prune_first_conv, prune_downsample_convs)
    analysis.run()
    uf = analysis.uf
    # ids touching the same slice of one parameter are one channel
    by_key: dict[tuple, int] = {}
    for i, slots in analysis.slots.items():
        for slot in slots:
            j = by_key.setdefault(slot.key, i)
            uf.union(i, j)
    slots: dict[int, dict[tuple, Slot]] = {}
    reasons: dict[int, list[str]] = {}
    for i, items in analysis.slots.items():
        bucket = slots.setdefault(uf.find(i), {})
        for slot in items:
            bucket.setdefault(slot.key, slot)
    for i, items in analysis.reasons.items():
        reasons.setdefault(uf.find(i), []).extend(items)
    roots = [r for r in slots if any(s.role == "filter" for s in slots[r].values())]
    # classes sharing a producer layer form a group
    layer_uf = _UnionFind()
    layer_ids: dict[str, int] = {}
    for r in roots:
        layers = sorted({s.param for s in slots[r].values() if s.role == "filter"})
        for name in layers:
            if name not in layer_ids:
                layer_ids[name] = layer_uf.fresh(1)[0]
        for name in layers[1:]:
            layer_uf.union(layer_ids[layers[0]], layer_ids[name])
    members: dict[int, list[int]] = {}
    for r in roots:
        first = min(s.param for s in slots[r].values() if s.role == "filter")
        members.setdefault(layer_uf.find(layer_ids[first]), []).append(r)
    order = {
        node.inputs[1].name: n
        for n, node in enumerate(graph)
        if len(node.inputs) > 1 and node.inputs[1].kind == "param"
    }
    groups = []
    for rs in members.values():
        layers = sorted(
            {s.param for r in rs for s in slots[r].values() if s.role == "filter"},
            key=lambda p: order.get(p, 0),
        )
        classes = []
        for r in rs:
            ordered = sorted(
                slots[r].values(),
                key=lambda s: (
                    ROLES.index(s.role),
                    order.get(s.param, 0),
                    s.param,
                    s.axis,
                    s.start,
                ),
            )
            classes.append(ChannelClass(tuple(ordered)))
        classes.sort(key=lambda c: (layers.index(c.filters[0].param), c.filters[0].start))
        why = list(dict.fromkeys(reason for r in rs for reason in reasons.get(r, ())))
        groups.append(ChannelGroup(tuple(layers), tuple(classes), tuple(why)))
    groups.sort(key=lambda g: order.get(g.layers[0], 0))
    return PruningGroups(tuple(groups))
