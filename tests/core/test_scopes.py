"""Scope matching (``purecomp.scopes``), op-kind tables and ``pc.scoped`` on resnet18."""

from __future__ import annotations

import re

import pytest
import torch
import torchvision

import purecomp as pc
from purecomp.errors import ConfigError, ScopeError
from purecomp.graph import OpNode
from purecomp.init_context import InitContext
from purecomp.op_kinds import CONV_OPS, LINEAR_OPS, QUANTIZABLE_OPS, WEIGHTED_OPS
from purecomp.scopes import Scope, key_matches, scope_matches, select_sites
from purecomp.struct import tree_flatten
from purecomp.transforms.mixed_precision import manual


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    graph = pc.trace(model, (x,))
    return model, x, graph, dict(model.named_parameters())


def node(graph, site) -> OpNode:
    return graph.node(site)


def same_state(a, b) -> bool:
    leaves_a, spec_a = tree_flatten(a)
    leaves_b, spec_b = tree_flatten(b)
    if spec_a != spec_b or len(leaves_a) != len(leaves_b):
        return False
    return all(
        torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(leaves_a, leaves_b)
    )


def under(name: str, scope: str) -> bool:
    return name.startswith(scope + ".") or name.startswith(scope + "/")


# ---------------------------------------------------------------- matching semantics


def test_plain_patterns_match_site_scope_and_scopes_above(resnet):
    graph = resnet[2]
    conv = node(graph, "layer1.0.conv1/conv2d#0")
    for pattern in ("layer1.0.conv1/conv2d#0", "layer1.0.conv1", "layer1.0", "layer1"):
        assert scope_matches(pattern, conv), pattern
    for pattern in ("layer", "layer1.0.conv", "layer1.0.conv1/conv2d", "layer2", "conv1"):
        assert not scope_matches(pattern, conv), pattern
    # a functional op called in a module's forward carries that module's scope
    add = node(graph, "layer1.0/add#0")
    assert scope_matches("layer1.0", add) and scope_matches("layer1", add)
    assert not scope_matches("layer1.0.conv1", add)


def test_re_patterns_search_the_site_name(resnet):
    graph = resnet[2]
    conv = node(graph, "layer1.0.conv1/conv2d#0")
    assert scope_matches("{re}layer1.*", conv)
    assert scope_matches(r"{re}.*/conv2d#\d+", conv)
    assert scope_matches("{re}layer1", conv)  # re.search, as NNCF: a part of the name is enough
    assert scope_matches("{re}conv2d#0", conv)
    assert not scope_matches("{re}^conv1", conv)  # anchors still anchor
    assert not scope_matches("{re}layer1$", conv)
    with pytest.raises(re.error):
        scope_matches("{re}(", conv)


def test_op_kind_selection_with_re_patterns(resnet):
    graph = resnet[2]
    linears = select_sites(graph, (), [r"{re}.*/linear#\d+"], "")
    assert linears == {n.site for n in graph if n.op in LINEAR_OPS} == {"fc/linear#0"}
    convs = select_sites(graph, [r"{re}layer\d\.0\.downsample.*"], [r"{re}.*/conv2d#\d+"], "")
    assert convs == {n.site for n in graph if n.op in CONV_OPS and "downsample" not in n.scope}
    assert len(convs) == 20 - 3


def test_key_matches_quantizer_keys():
    assert key_matches("layer1", "layer1.0.conv1.weight")
    assert key_matches("layer1.0", "layer1.0/relu#0:out0")
    assert key_matches("{re}.*conv1.weight", "layer1.0.conv1.weight")
    assert not key_matches("layer1", "layer10.conv.weight")
    assert key_matches("{re}conv1", "layer1.0.conv1.weight")  # re.search
    assert not key_matches("{re}^conv1", "layer1.0.conv1.weight")


def test_op_kind_tables_are_consistent():
    assert CONV_OPS | LINEAR_OPS <= WEIGHTED_OPS <= QUANTIZABLE_OPS
    assert all(isinstance(op, str) for op in QUANTIZABLE_OPS)


# ---------------------------------------------------------------- select_sites


def test_select_sites_ignored_and_target(resnet):
    graph = resnet[2]
    everything = {n.site for n in graph}
    assert select_sites(graph, (), None, "") == everything
    assert select_sites(graph, (), [], "") == frozenset()
    no_layer1 = select_sites(graph, ["layer1"], None, "")
    assert no_layer1 == {s for s in everything if not under(s, "layer1")}
    only_layer1_convs = select_sites(graph, ["{re}.*/relu#\\d+"], ["layer1"], "")
    assert only_layer1_convs and all(under(s, "layer1") and "relu" not in s for s in only_layer1_convs)


def test_select_sites_errors_name_the_json_path(resnet):
    graph = resnet[2]
    with pytest.raises(ScopeError, match=r"compression\[0\]\.ignored_scopes\[1\]: 'nope' matches no site") as info:
        select_sites(graph, ["layer1", "nope"], None, "compression[0].")
    assert info.value.path == "compression[0].ignored_scopes[1]"
    with pytest.raises(ScopeError, match=r"^target_scopes\[0\]: invalid regular expression"):
        select_sites(graph, (), ["{re}("], "")
    with pytest.raises(ScopeError, match=r"target_scopes\[0\].*matches no site.*the nearest are \['layer1\.[01]'"):
        select_sites(graph, (), ["{re}^layer1$"], "")


def test_select_sites_scope_restricts_further(resnet):
    graph = resnet[2]
    own = select_sites(graph, ["layer2"], None, "")
    scope = Scope(ignored=("layer3",), target=("layer2", "layer3", "layer4"))
    both = select_sites(graph, ["layer2"], None, "", scope)
    assert both == {s for s in own if scope.allows(graph.node(s))}
    assert both and all(under(s, "layer4") for s in both)


# ---------------------------------------------------------------- Scope


def test_scope_allows(resnet):
    graph = resnet[2]
    assert all(Scope().allows(n) for n in graph) and not any(Scope(target=()).allows(n) for n in graph)
    scope = Scope(ignored=["{re}.*relu.*"], target=["layer1"])
    assert scope.ignored == ("{re}.*relu.*",) and scope.target == ("layer1",)  # lists become tuples
    assert Scope(ignored="layer1").ignored == ("layer1",)  # NNCF: one pattern may be a bare string
    with pytest.raises(ConfigError, match=r"target\[0\]: expected a string"):
        Scope(target=[1])


SCOPES = [
    Scope(),
    Scope(ignored=("layer1",)),
    Scope(target=("layer1", "layer2")),
    Scope(ignored=("{re}.*/relu#\\d+",), target=("layer2", "fc")),
    Scope(target=("{re}.*/conv2d#\\d+",)),
    Scope(target=()),
]


@pytest.mark.parametrize("a", range(len(SCOPES)))
@pytest.mark.parametrize("b", range(len(SCOPES)))
def test_restrict_allows_what_both_allow(resnet, a, b):
    graph = resnet[2]
    sa, sb = SCOPES[a], SCOPES[b]
    both = sa.restrict(sb)
    for n in graph:
        assert both.allows(n) == (sa.allows(n) and sb.allows(n)), n.site
    # restricting again nests further and stays an intersection
    deeper = both.restrict(Scope(ignored=("layer2.0",)))
    for n in graph:
        assert deeper.allows(n) == (both.allows(n) and not scope_matches("layer2.0", n))


def test_restrict_flattens_when_it_can():
    assert Scope(("a",)).restrict(Scope(("b", "a"))) == Scope(("a", "b"))
    assert Scope(("a",)).restrict(Scope(target=("t",))) == Scope(("a",), ("t",))
    assert Scope(target=("t",)).restrict(None) == Scope(target=("t",))
    nested = Scope(target=("t",)).restrict(Scope(target=("u",)))
    assert nested.within == Scope(target=("u",))


# ---------------------------------------------------------------- pc.scoped on every built-in method


def test_scoped_quantization_equals_ignored_scopes(resnet):
    model, x, graph, params = resnet
    ignored = ["{re}layer1.*"]
    scoped = pc.scoped(pc.quantization(), ignored=ignored)
    assert scoped.name == pc.quantization().name
    state = scoped.init(graph, params, [x])
    expected = pc.quantization(ignored_scopes=ignored).init(graph, params, [x])
    assert same_state(state, expected)
    assert state.weights and not any(under(k, "layer1") for k in state.weights)
    for key, consumers in state.consumers:
        assert any(not under(c, "layer1") for c in consumers), key
    full = pc.quantization().init(graph, params, [x])
    assert any(under(k, "layer1") for k in full.weights)


def test_scoped_adds_to_the_methods_own_scopes(resnet):
    model, x, graph, params = resnet
    state = pc.scoped(pc.quantization(ignored_scopes=["layer2"]), ignored=["layer1"]).init(graph, params, [x])
    assert state.weights and not any(under(k, "layer1") or under(k, "layer2") for k in state.weights)
    only = pc.scoped(pc.quantization(target_scopes=["layer1", "layer2"]), target=["layer2", "layer3"])
    state = only.init(graph, params, [x])
    assert state.weights and all(under(k, "layer2") for k in state.weights)


def test_nested_scoped_and_precision_plan(resnet):
    model, x, graph, params = resnet
    method = pc.scoped(
        pc.scoped(pc.quantization(precision=manual([[4, "layer1"]])), target=["layer1", "layer2"]),
        ignored=["layer2"],
    )
    state = method.init(graph, params, [x])
    assert state.weights and all(under(k, "layer1") for k in state.weights)
    assert {q.bits for q in state.weights.values()} == {4}


def test_scoped_patterns_must_match(resnet):
    model, x, graph, params = resnet
    with pytest.raises(ScopeError, match=r"scoped\.ignored\[1\]: 'nowhere' matches no site"):
        pc.scoped(pc.magnitude_sparsity(0.5), ignored=["layer1", "nowhere"]).init(graph, params)
    with pytest.raises(ScopeError, match=r"scoped\.target\[0\]"):
        pc.scoped(pc.magnitude_sparsity(0.5), target=["{re}^layer$"]).init(graph, params)


@pytest.mark.parametrize("make", [
    lambda **kw: pc.magnitude_sparsity(0.5, **kw),
    lambda **kw: pc.const_sparsity(**kw),
    lambda **kw: pc.rb_sparsity(0.5, **kw),
])
def test_scoped_sparsity_equals_target_scopes(resnet, make):
    model, x, graph, params = resnet
    state = pc.scoped(make(), target=["layer2"]).init(graph, params, [x])
    expected = make(target_scopes=["layer2"]).init(graph, params, [x])
    assert same_state(state, expected)
    names = [k for k, v in vars(state).items() if isinstance(v, dict) and v]
    assert names
    for field in names:
        assert all(under(k, "layer2") for k in getattr(state, field)), field


def test_scoped_pruning_equals_ignored_scopes(resnet):
    model, x, graph, params = resnet
    state = pc.scoped(pc.filter_pruning(0.5), ignored=["layer4"]).init(graph, params)
    expected = pc.filter_pruning(0.5, ignored_scopes=["layer4"]).init(graph, params)
    assert same_state(state.masks, expected.masks) and state.pruned == expected.pruned  # groups: by identity
    assert [g.layers for g in state.groups.groups] == [g.layers for g in expected.groups.groups]
    full = pc.filter_pruning(0.5).init(graph, params)
    layer4 = [k for k, m in full.masks.items() if under(k, "layer4") and bool((m == 0).any())]
    assert layer4  # unscoped, layer4 filters are pruned
    assert not any(under(k, "layer4") and bool((m == 0).any()) for k, m in state.masks.items())


def test_scoped_binarization_equals_target_scopes(resnet):
    model, x, graph, params = resnet
    state = pc.scoped(pc.binarization(), target=["layer3"]).init(graph, params, [x])
    expected = pc.binarization(target_scopes=["layer3"]).init(graph, params, [x])
    assert same_state(state, expected)
    assert state.weights and all(under(k, "layer3") for k in state.weights)
    assert state.activations and all(under(k, "layer3") for k in state.activations)
    with pytest.raises(ConfigError, match="no conv2d is left"):
        pc.scoped(pc.binarization(target_scopes=["layer3"]), target=["layer2"]).init(graph, params, [x])


def test_scoped_inside_chain_restricts_only_its_member(resnet):
    model, x, graph, params = resnet
    method = pc.chain(pc.scoped(pc.magnitude_sparsity(0.5), target=["layer3"]), pc.quantization())
    sparse, quant = method.init(graph, params, [x])
    assert sparse.masks and all(under(k, "layer3") for k in sparse.masks)
    assert any(under(k, "layer1") for k in quant.weights)
    assert method.members and len(method.members) == 2


def test_scoped_chain_restricts_every_member(resnet):
    model, x, graph, params = resnet
    method = pc.scoped(pc.chain(pc.magnitude_sparsity(0.5), pc.quantization()), ignored=["layer1", "layer2"])
    sparse, quant = method.init(graph, params, [x])
    for keys in (sparse.masks, quant.weights):
        assert keys and not any(under(k, "layer1") or under(k, "layer2") for k in keys)
    expected = pc.chain(
        pc.magnitude_sparsity(0.5, ignored_scopes=["layer1", "layer2"]),
        pc.quantization(ignored_scopes=["layer1", "layer2"]),
    ).init(graph, params, [x])
    assert same_state((sparse, quant), expected)
    assert len(method.members) == 2  # the chain's members stay visible


def test_scoped_sets_the_context_scope(resnet):
    model, x, graph, params = resnet
    seen = []
    probe = pc.identity()._replace(init=lambda context: seen.append(context.scope) or ())
    pc.scoped(pc.scoped(probe, target=["layer1"]), ignored=["layer1.0"]).init(graph, params)
    scope = seen[0]
    assert isinstance(scope, Scope)
    allowed = {n.site for n in graph if scope.allows(n)}
    assert allowed == {n.site for n in graph if under(n.site, "layer1") and not under(n.site, "layer1.0")}
    context = InitContext.start(graph, params)
    assert context.scope is None
