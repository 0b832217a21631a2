"""``purecomp.trace``: record a model's op calls once into an immutable ``ModelGraph``.

The graph is recorded, not required: models keep their Python control flow. Placement
(where quantizers go, which channels prune together) is computed on the recording.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from functools import cached_property
from typing import Any

import optree
import torch
from torch import Tensor, nn

from .errors import UnknownOpError
from .intercept import Interceptor, ScopeStack


@dataclasses.dataclass(frozen=True)
class TensorRef:
    """Where a tensor came from: a model input, an op output, a parameter/buffer, or unknown."""

    kind: str  # "input" | "node" | "param" | "const"
    name: str  # input name, producer site, or parameter name
    index: int = 0  # output index for kind == "node"

    @property
    def key(self) -> str:
        """Transform key of this tensor: ``input:<name>`` or ``<site>:out<index>``."""
        if self.kind == "input":
            return f"input:{self.name}"
        if self.kind == "node":
            return f"{self.name}:out{self.index}"
        raise ValueError(f"a {self.kind} tensor has no transform key")


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def is_float(self) -> bool:
        return self.dtype.is_floating_point


@dataclasses.dataclass(frozen=True)
class OpNode:
    """One op call: its site name, op kind, module scope, tensor inputs and outputs."""

    site: str
    op: str
    scope: str
    index: int
    module_type: str
    inputs: tuple[TensorRef, ...]
    input_info: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    kwargs: tuple[tuple[str, Any], ...] = ()

    @property
    def params(self) -> tuple[str, ...]:
        """Names of the parameters and buffers this op reads."""
        return tuple(ref.name for ref in self.inputs if ref.kind == "param")

    def param_position(self, name: str) -> int:
        for k, ref in enumerate(self.inputs):
            if ref.kind == "param" and ref.name == name:
                return k
        raise UnknownOpError(f"op {self.site} does not read parameter {name!r}")

    def option(self, name: str, default: Any = None) -> Any:
        return dict(self.kwargs).get(name, default)


@dataclasses.dataclass(frozen=True)
class ModelGraph:
    """The recorded op graph of one forward call."""

    nodes: tuple[OpNode, ...]
    inputs: tuple[tuple[str, TensorInfo], ...]
    outputs: tuple[TensorRef, ...]
    param_shapes: tuple[tuple[str, tuple[int, ...]], ...]
    model: nn.Module = dataclasses.field(compare=False, repr=False)

    @cached_property
    def _by_site(self) -> dict[str, OpNode]:
        return {node.site: node for node in self.nodes}

    @cached_property
    def _consumers(self) -> dict[TensorRef, list[tuple[OpNode, int]]]:
        table: dict[TensorRef, list[tuple[OpNode, int]]] = {}
        for node in self.nodes:
            for k, ref in enumerate(node.inputs):
                table.setdefault(ref, []).append((node, k))
        return table

    @property
    def sites(self) -> tuple[str, ...]:
        return tuple(node.site for node in self.nodes)

    def node(self, site: str) -> OpNode:
        try:
            return self._by_site[site]
        except KeyError:
            raise UnknownOpError(f"the model graph has no site {site!r}") from None

    def has_site(self, site: str) -> bool:
        return site in self._by_site

    def consumers(self, ref: TensorRef) -> list[tuple[OpNode, int]]:
        """Ops reading ``ref`` and the position of ``ref`` among their tensor inputs."""
        return list(self._consumers.get(ref, ()))

    def producer(self, ref: TensorRef) -> OpNode | None:
        return self._by_site.get(ref.name) if ref.kind == "node" else None

    def readers_of_param(self, name: str) -> list[OpNode]:
        return [node for node, _ in self.consumers(TensorRef("param", name))]

    def __iter__(self) -> Iterator[OpNode]:
        return iter(self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)


def output_tensors(out: Any) -> list[Tensor]:
    """The tensors of a model's result: nested tuples, lists and mappings (HuggingFace
    ``ModelOutput`` subclasses ``OrderedDict``, which optree treats as a leaf)."""
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for value in out.values() for t in output_tensors(value)]
    if isinstance(out, (tuple, list)):
        return [t for value in out for t in output_tensors(value)]
    return [t for t in optree.tree_leaves(out) if isinstance(t, Tensor)]


def flatten_inputs(args: Sequence[Any], kwargs: dict[str, Any]) -> list[tuple[str, Tensor]]:
    """Model inputs by name: positional tensors ``"0"``, ``"1"``...; keyword tensors by their key.

    Nested containers are flattened; their leaves get ``"<name>.<k>"``.
    """
    named: list[tuple[str, Tensor]] = []
    for name, value in [(str(i), a) for i, a in enumerate(args)] + list(kwargs.items()):
        leaves = optree.tree_leaves(value)
        if isinstance(value, Tensor):
            named.append((name, value))
            continue
        for k, leaf in enumerate(leaves):
            if isinstance(leaf, Tensor):
                named.append((f"{name}.{k}", leaf))
    return named


_RECORDED_KWARGS = ("stride", "padding", "dilation", "groups", "inplace", "dim", "start_dim", "end_dim")


class _Recorder:
    def __init__(self, model: nn.Module, named_inputs: list[tuple[str, Tensor]]) -> None:
        self.origin: dict[int, TensorRef] = {}
        self.keep_alive: list[Tensor] = []
        self.nodes: list[OpNode] = []
        self.module_types: dict[str, str] = {}
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            self._mark(tensor, TensorRef("param", name))
        for name, tensor in named_inputs:
            self._mark(tensor, TensorRef("input", name))

    def _mark(self, tensor: Tensor, ref: TensorRef) -> None:
        self.origin[id(tensor)] = ref
        self.keep_alive.append(tensor)

    def ref_of(self, tensor: Tensor) -> TensorRef:
        return self.origin.get(id(tensor), TensorRef("const", ""))

    def __call__(self, site: str, kind: str, scope: str, index: int, args: Any, kwargs: Any, out: Any) -> None:
        out_leaves = [t for t in optree.tree_leaves(out) if isinstance(t, Tensor)]
        if not out_leaves:
            return
        in_leaves = [t for t in optree.tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
        options = tuple((k, _freeze(v)) for k, v in kwargs.items() if k in _RECORDED_KWARGS)
        node = OpNode(
            site=site,
            op=kind,
            scope=scope,
            index=index,
            module_type=self.module_types.get(scope, ""),
            inputs=tuple(self.ref_of(t) for t in in_leaves),
            input_info=tuple(TensorInfo(tuple(t.shape), t.dtype) for t in in_leaves),
            outputs=tuple(TensorInfo(tuple(t.shape), t.dtype) for t in out_leaves),
            kwargs=options + _positional_options(kind, args),
        )
        self.nodes.append(node)
        for j, tensor in enumerate(out_leaves):
            self._mark(tensor, TensorRef("node", site, j))


def _freeze(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(value)
    if isinstance(value, Tensor):
        return None
    return value


def _positional_options(kind: str, args: tuple) -> tuple[tuple[str, Any], ...]:
    """Conv hyper-parameters passed positionally (``F.conv2d(x, w, b, stride, padding, dilation, groups)``)."""
    if kind.startswith("conv") and not kind.startswith("conv_transpose"):
        names = ("stride", "padding", "dilation", "groups")
        return tuple((n, _freeze(v)) for n, v in zip(names, args[3:]))
    if kind.startswith("conv_transpose"):
        names = ("stride", "padding", "output_padding", "groups", "dilation")
        return tuple((n, _freeze(v)) for n, v in zip(names, args[3:]))
    return ()


def trace(model: nn.Module, example_inputs: Sequence[Any] | Any, example_kwargs: dict[str, Any] | None = None) -> ModelGraph:
    """Run ``model`` once on the example inputs (no gradient) and record its op graph.

    ``example_inputs`` is a tuple of positional arguments (a lone tensor is accepted too).
    The model's train/eval mode is used as it is; the model is not changed.
    """
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    kwargs = dict(example_kwargs or {})
    named_inputs = flatten_inputs(args, kwargs)
    recorder = _Recorder(model, named_inputs)
    scopes = ScopeStack(model)
    was_training = model.training
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    try:
        with torch.no_grad(), scopes.attached(), Interceptor(scopes, recorder=recorder):
            recorder.module_types = scopes.module_types
            out = model(*args, **kwargs)
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
        model.train(was_training)
    outputs = tuple(recorder.ref_of(t) for t in output_tensors(out))
    params = tuple((n, tuple(p.shape)) for n, p in list(model.named_parameters()) + list(model.named_buffers()))
    return ModelGraph(
        nodes=tuple(recorder.nodes),
        inputs=tuple((name, TensorInfo(tuple(t.shape), t.dtype)) for name, t in named_inputs),
        outputs=outputs,
        param_shapes=params,
        model=model,
    )
