"""purecomp.struct: frozen optree dataclasses in the purecomp namespace; static fields are tree
metadata; flatten/unflatten/map; crossing a torch.func boundary as a list of leaves."""

from __future__ import annotations

import dataclasses

import optree
import pytest
import torch
from torch import Tensor

from purecomp.struct import (
    NAMESPACE,
    replace,
    static_field,
    struct,
    tree_flatten,
    tree_leaves,
    tree_map,
    tree_unflatten,
)


@struct
class Scale:
    value: Tensor
    bits: int = static_field(default=8)
    name: str = static_field(default="w")


@struct
class Pair:
    first: Scale
    second: Scale
    offset: Tensor | None = None
    mode: str = static_field(default="sum")


def pair() -> Pair:
    return Pair(Scale(torch.tensor([1.0, 2.0])), Scale(torch.tensor(3.0), bits=4, name="x"), torch.tensor(0.5))


def test_structs_are_frozen():
    s = Scale(torch.ones(2))
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.value = torch.zeros(2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.bits = 4
    assert dataclasses.is_dataclass(s)


def test_static_fields_are_metadata_not_leaves():
    p = pair()
    leaves = tree_leaves(p)
    assert len(leaves) == 3 and all(isinstance(t, Tensor) for t in leaves)
    _, spec = tree_flatten(p)
    _, same = tree_flatten(Pair(Scale(torch.zeros(2)), Scale(torch.ones(()), bits=4, name="x"), torch.ones(())))
    assert spec == same, "different tensors, same structure"
    _, other_bits = tree_flatten(replace(p, second=replace(p.second, bits=8)))
    _, other_mode = tree_flatten(replace(p, mode="max"))
    assert other_bits != spec and other_mode != spec, "a static field is part of the structure"
    assert spec.namespace == NAMESPACE


def test_none_is_a_leaf_free_node():
    p = replace(pair(), offset=None)
    leaves, spec = tree_flatten(p)
    assert len(leaves) == 2
    assert tree_unflatten(spec, leaves).offset is None
    assert tree_flatten(pair())[1] != spec


def test_flatten_unflatten_round_trip_inside_containers():
    tree = {"a": pair(), "b": (Scale(torch.arange(3.0)), [torch.ones(1)])}
    leaves, spec = tree_flatten(tree)
    assert len(leaves) == 5
    again = tree_unflatten(spec, leaves)
    assert type(again["a"]) is Pair and type(again["b"][0]) is Scale
    assert again["a"].second.bits == 4 and again["a"].second.name == "x" and again["a"].mode == "sum"
    assert all(x is y for x, y in zip(tree_leaves(again), leaves)), "the leaves themselves come back"
    new = tree_unflatten(spec, [t * 0 for t in leaves])
    assert all(float(t.abs().sum()) == 0 for t in tree_leaves(new))
    assert float(tree["a"].first.value.sum()) == 3.0


def test_namespace_is_required_to_see_inside():
    p = pair()
    assert optree.tree_leaves(p) == [p], "without the namespace a struct is one opaque leaf"
    assert len(optree.tree_leaves(p, namespace=NAMESPACE)) == 3


def test_tree_map_keeps_types_and_static_fields():
    p = pair()
    doubled = tree_map(lambda t: t * 2, p)
    assert type(doubled) is Pair and type(doubled.second) is Scale
    assert doubled.second.bits == 4 and doubled.second.name == "x"
    assert torch.equal(doubled.first.value, torch.tensor([2.0, 4.0])) and float(doubled.offset) == 1.0
    summed = tree_map(lambda a, b: a + b, p, doubled)
    assert torch.equal(summed.first.value, torch.tensor([3.0, 6.0]))
    with pytest.raises(ValueError):
        tree_map(lambda a, b: a + b, p, replace(p, mode="max"))


def test_replace_builds_a_new_struct_and_leaves_the_original():
    p = pair()
    value = p.first.value
    q = replace(p, first=replace(p.first, value=torch.zeros(2), bits=2), mode="max")
    assert q is not p and q.first is not p.first
    assert p.first.value is value and torch.equal(value, torch.tensor([1.0, 2.0]))
    assert p.first.bits == 8 and p.mode == "sum"
    assert q.first.bits == 2 and q.mode == "max" and q.second is p.second
    with pytest.raises(TypeError):
        replace(p, nope=1)


def test_grad_through_a_torch_func_boundary_over_the_leaves():
    from torch.func import grad, vmap

    p = pair()
    leaves, spec = tree_flatten(p)

    def f(leaves: list[Tensor], x: Tensor) -> Tensor:
        s = tree_unflatten(spec, leaves)
        scale = 2 ** s.second.bits  # static metadata is a plain int inside
        return ((x * s.first.value).sum() * s.second.value + s.offset) / scale

    x = torch.tensor([3.0, -1.0])
    g = grad(f)(leaves, x)
    assert isinstance(g, list) and len(g) == 3
    assert torch.allclose(g[0], x * 3.0 / 16)
    assert torch.allclose(g[1], (x * torch.tensor([1.0, 2.0])).sum() / 16)
    assert torch.allclose(g[2], torch.tensor(1 / 16))
    grads = tree_unflatten(spec, g)
    assert type(grads) is Pair and grads.second.bits == 4
    # per-sample gradients over a batch of x, the struct's leaves shared
    xs = torch.randn(5, 2)
    per_sample = vmap(grad(f), in_dims=(None, 0))(leaves, xs)
    assert per_sample[0].shape == (5, 2)
    assert torch.allclose(per_sample[0], xs * 3.0 / 16)
    # eager autograd agrees
    live = [t.clone().requires_grad_(True) for t in leaves]
    f(live, x).backward()
    assert all(torch.allclose(a.grad, b) for a, b in zip(live, g))
