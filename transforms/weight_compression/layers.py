"""Finding the weighted layers (linears, embeddings) of a model, in execution order.

From a recorded ``ModelGraph`` (``from_graph``): every ``linear`` / ``embedding`` op call that
reads a 2-D float parameter as its weight, in call order (the graph's order is the order the
ops ran, a topological order). From the module tree (``from_modules``, used when no data is
given to trace the model): every ``nn.Linear`` and ``nn.Embedding`` in registration order, which
is the call order for HuggingFace causal LMs (the LM head is registered last).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import nn

from purecomp.graph import ModelGraph, OpNode
from purecomp.scopes import select_sites

from .precision import Layer

OPS = {"linear": 1, "embedding": 1}  # op -> position of the weight among its inputs


def weight_of(node: OpNode) -> str | None:
    """The parameter a ``linear`` / ``embedding`` call reads as a 2-D float weight, else ``None``."""
    position = OPS.get(node.op)
    if position is None or len(node.inputs) <= position:
        return None
    ref, info = node.inputs[position], node.input_info[position]
    if ref.kind != "param" or len(info.shape) != 2 or not info.is_float:
        return None
    return ref.name


def from_graph(graph: ModelGraph, allowed: Iterable[str]) -> list[Layer]:
    """The weighted op calls of ``graph`` (``allowed``: sites not ignored)."""
    allowed = frozenset(allowed)
    layers = []
    for node in graph:
        weight = weight_of(node)
        if weight is not None:
            shape = node.input_info[OPS[node.op]].shape
            layers.append(Layer(weight, node.op, node.scope, (int(shape[0]), int(shape[1])),
                                ignored=node.site not in allowed, site=node.site))
    return layers


def module_nodes(model: nn.Module) -> list[OpNode]:
    """A stand-in op node per ``nn.Linear`` / ``nn.Embedding`` (site ``<module>/linear#0``), so the
    scope patterns of ``purecomp.scopes`` apply without tracing."""
    nodes = []
    for name, module in model.named_modules():
        op = "linear" if isinstance(module, nn.Linear) else "embedding" if isinstance(module, nn.Embedding) else None
        if op is not None:
            nodes.append(OpNode(f"{name}/{op}#0", op, name, 0, type(module).__name__, (), (), ()))
    return nodes


def from_modules(model: nn.Module, ignored: Sequence[str], validate: bool = True, origin: str = "") -> list[Layer]:
    """The ``nn.Linear`` / ``nn.Embedding`` modules of ``model`` holding a 2-D float weight, in
    registration order; ``ignored`` are scope patterns (``purecomp.scopes``)."""
    nodes = module_nodes(model)
    allowed = select_sites(nodes, ignored, None, origin, validate=validate)  # type: ignore[arg-type]
    names = {id(p): name for name, p in model.named_parameters()}  # tied weights: the first name
    layers = []
    for node in nodes:
        module = model.get_submodule(node.scope)
        weight = module.weight
        if weight is None or weight.dim() != 2 or not weight.is_floating_point() or id(weight) not in names:
            continue
        layers.append(Layer(names[id(weight)], node.op, node.scope, (int(weight.shape[0]), int(weight.shape[1])),
                            ignored=node.site not in allowed, site=node.site))
    return layers
