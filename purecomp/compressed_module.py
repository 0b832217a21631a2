"""``CompressedModule``: the user's model plus the compression state's tensors as parameters and buffers.

State tensors are named by their path in the state tree, under ``compression.``: a chain's
member states by member name (a repeated name gets a suffix, ``quantization_1``), a single
method's state by ``method.name``, then the struct fields and dict keys, split at ``.``
(``compression.quantization.weights.conv1.weight.scale``). Each name segment is a plain
container module, so ``state_dict()`` keys read as those dotted paths.

``set_state`` keeps identity: a tensor at a path that already exists is copied into the
registered ``Parameter`` / buffer in place, a new path is added without touching the others,
and a vanished buffer is removed. What would silently detach a tensor from an optimizer (a
trainable tensor disappearing or changing shape or dtype) or leave a new trainable tensor
outside it (a buffer's path turning trainable) raises ``StateError`` naming the path,
changing nothing.

A trainable tensor that a new state hands back detached (RB sparsity's logits once its masks
freeze) stays the same trainable ``Parameter``: the optimizer keeps it, a module rebuilt
from a checkpoint lists the same parameters (so the optimizer's state loads), and it is up
to the method to stop sending it gradient (frozen RB gates no longer read the logits).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import optree
import torch
from torch import Tensor, nn

from .apply import apply
from .compression import Compression
from .errors import StateError
from .struct import NAMESPACE, tree_unflatten

ROOT = "compression"


class StateNode(nn.Module):
    """A plain container: one segment of a state tensor's dotted name."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("a StateNode only holds compression state tensors; it is not callable")


def _unique(names: Sequence[str]) -> list[str]:
    """``names`` with repeats suffixed: ``[q, q, q] -> [q, q_1, q_2]``; a suffix never takes a name
    that another member already has."""
    taken = set(names)
    used: set[str] = set()
    out = []
    for name in names:
        label, k = name, 0
        while label in used or (label != name and label in taken):
            k += 1
            label = f"{name}_{k}"
        used.add(label)
        out.append(label)
    return out


def _member_path(method: Compression, path: tuple[Any, ...]) -> tuple[str, ...]:
    """Name the leading entries of ``path`` inside ``method``'s state after chain members."""
    if not method.members or not path or not isinstance(path[0], int) or not 0 <= path[0] < len(method.members):
        return tuple(str(entry) for entry in path)
    labels = _unique([m.name for m in method.members])
    i = path[0]
    return (labels[i],) + _member_path(method.members[i], path[1:])


def state_names(method: Compression, paths: Sequence[tuple[Any, ...]]) -> list[str]:
    """The dotted name (below ``compression.``) of each state leaf path.

    A chain's state is the tuple of member states: its first entry becomes the member's name.
    A single method's state is named by ``method.name``."""
    out = []
    for path in paths:
        parts = _member_path(method, tuple(path)) if method.members else (method.name, *map(str, path))
        out.append(".".join(parts))
    return out


def _check_names(names: Sequence[str | None]) -> None:
    """Two leaves with one name, or a leaf whose name is a container of another, raise ``StateError``."""
    seen: set[str] = set()
    for name in names:
        if name is None:
            continue
        if any(not seg for seg in name.split(".")):
            raise StateError(f"compression state path {name!r} has an empty name segment")
        if name in seen:
            raise StateError(f"two compression state tensors share the path {name!r}")
        seen.add(name)
    prefixes = {".".join(name.split(".")[:k]) for name in seen for k in range(1, name.count(".") + 1)}
    clash = sorted(seen & prefixes)
    if clash:
        raise StateError(f"compression state path {clash[0]!r} is both a tensor and a container of tensors")


def _describe(t: Tensor) -> str:
    kind = "trainable" if isinstance(t, nn.Parameter) or t.requires_grad else "not trainable"
    return f"{tuple(t.shape)} {t.dtype} {kind}"


class CompressedModule(nn.Module):
    """The user's model run with a compression state; state tensors are its parameters and buffers.

    Trainable state leaves (``requires_grad``) are ``nn.Parameter`` s, other tensor leaves
    buffers, named ``compression.<path>`` (see the module docstring). ``set_state`` writes a
    stepped state into the registered tensors in place, so optimizers and DDP keep the
    same objects; new paths are added, vanished buffers removed.
    """

    def __init__(self, model: nn.Module, method: Compression) -> None:
        super().__init__()
        self.model = model
        self._modules[ROOT] = StateNode()
        self._method = method
        self._spec: Any = None
        # Per leaf in flatten order: the dotted name below ``compression.`` of a tensor leaf,
        # or None for a non-tensor leaf (kept in ``_others``).
        self._names: list[str | None] = []
        self._others: dict[int, Any] = {}

    def model_params(self) -> dict[str, Tensor]:
        return dict(self.model.named_parameters())

    @property
    def method(self) -> Compression:
        """The compression method this module applies."""
        return self._method

    # -- the registered tensors, found by walking the containers (DataParallel replicas have their own)

    def _node(self, segments: Sequence[str], create: bool = False) -> StateNode | None:
        node = self._modules[ROOT]
        for seg in segments:
            child = node._modules.get(seg)
            if child is None:
                if not create:
                    return None
                child = node._modules[seg] = StateNode()
            node = child
        return node

    def _get(self, name: str) -> Tensor | None:
        *parents, leaf = name.split(".")
        node = self._node(parents)
        if node is None:
            return None
        got = node._parameters.get(leaf)
        return got if got is not None else node._buffers.get(leaf)

    def _remove(self, name: str) -> None:
        segments = name.split(".")
        node = self._node(segments[:-1])
        if node is None:
            return
        node._parameters.pop(segments[-1], None)
        node._buffers.pop(segments[-1], None)
        # drop containers left empty
        for k in range(len(segments) - 1, 0, -1):
            node = self._node(segments[:k])
            if node is not None and not (node._parameters or node._buffers or node._modules):
                del self._node(segments[: k - 1])._modules[segments[k - 1]]
            else:
                break

    def _reorder(self, names: Sequence[str]) -> None:
        """Registration order = state flatten order, so a module rebuilt from a checkpoint lists
        its parameters in the order of one that grew its state during training."""
        order: dict[tuple[str, ...], list[str]] = {}
        for name in names:
            segments = name.split(".")
            for k in range(len(segments)):
                children = order.setdefault(tuple(segments[:k]), [])
                if segments[k] not in children:
                    children.append(segments[k])
        for prefix, children in order.items():
            node = self._node(prefix)
            rank = {c: i for i, c in enumerate(children)}
            for table in (node._parameters, node._buffers, node._modules):
                items = sorted(table.items(), key=lambda kv: rank.get(kv[0], len(rank)))
                table.clear()
                table.update(items)

    @property
    def state(self) -> Any:
        if self._spec is None:
            raise StateError("the compressed module has no state yet; call controller.initialize(data_loader)")
        leaves = []
        for i, name in enumerate(self._names):
            if name is None:
                leaves.append(self._others[i])
                continue
            tensor = self._get(name)
            if tensor is None:
                raise StateError(f"compression state tensor {ROOT}.{name} is missing from the module")
            leaves.append(tensor)
        return tree_unflatten(self._spec, leaves)

    def set_state(self, state: Any) -> None:
        """Write ``state`` into the registered tensors (same objects where the path exists).

        Raises ``StateError`` naming the path, changing nothing, where a trainable tensor
        would vanish or change shape or dtype, or a buffer's path would turn trainable. A
        detached tensor at a trainable path is copied into the (still trainable) Parameter."""
        paths, leaves, spec = optree.tree_flatten_with_path(state, namespace=NAMESPACE)
        labels = state_names(self._method, paths)
        names = [label if isinstance(leaf, Tensor) else None for label, leaf in zip(labels, leaves)]
        _check_names(names)
        new = {name: leaf for name, leaf in zip(names, leaves) if name is not None}
        current = {name: self._get(name) for name in self._names if name is not None}
        problems = []
        for name, old in current.items():
            leaf = new.get(name)
            if old is None:
                continue
            trainable = isinstance(old, nn.Parameter)
            if leaf is None:
                if trainable:
                    problems.append(f"{ROOT}.{name}: the trainable tensor {_describe(old)} is gone from the new state")
                continue
            changes = []
            if leaf.shape != old.shape:
                changes.append(f"shape {tuple(old.shape)} -> {tuple(leaf.shape)}")
            if leaf.dtype != old.dtype:
                changes.append(f"dtype {old.dtype} -> {leaf.dtype}")
            if leaf.requires_grad and not trainable:
                changes.append("not trainable -> trainable")
            if changes and (trainable or leaf.requires_grad):
                problems.append(f"{ROOT}.{name}: {', '.join(changes)}")
        if problems:
            raise StateError(
                "the new compression state would detach trainable tensors from their optimizer: "
                + "; ".join(problems)
            )
        with torch.no_grad():
            for name, old in current.items():
                leaf = new.get(name)
                if old is None:
                    continue
                if leaf is None or leaf.shape != old.shape or leaf.dtype != old.dtype:
                    self._remove(name)  # a buffer that vanished or changed layout: re-created below
                elif leaf is not old:
                    old.copy_(leaf)
            added = False
            for name, leaf in new.items():
                if self._get(name) is not None:
                    continue
                *parents, last = name.split(".")
                node = self._node(parents, create=True)
                if leaf.requires_grad:
                    node._parameters[last] = nn.Parameter(leaf.detach().clone(), requires_grad=True)
                else:
                    node._buffers[last] = leaf.detach().clone()
                added = True
        if added:
            self._reorder(list(new))
        self._names = names
        self._others = {i: leaf for i, (name, leaf) in enumerate(zip(names, leaves)) if name is None}
        self._spec = spec

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return apply(self.model, self._method, self.model_params(), self.state, *args, **kwargs)
