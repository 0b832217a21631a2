"""Where quantizers sit on real architectures."""

from __future__ import annotations

import pytest
import torch

import purecomp as pc
from purecomp.op_kinds import NORM_FUSING_PRODUCERS, WEIGHTED_OPS
from purecomp.scopes import select_sites
from purecomp.transforms.quantize import activation_targets, weight_targets
from purecomp.transforms.quantize.placement import source_of

from models import TORCHVISION, tiny_bert, torchvision_model


def targets(name, **kw):
    model, x = torchvision_model(name)
    graph = pc.trace(model, (x,))
    allowed = select_sites(graph, kw.pop("ignored", ()), kw.pop("targets", None), "")
    acts = activation_targets(graph, allowed, quantize_inputs=True, quantize_outputs=False)
    return model, graph, weight_targets(graph, allowed), {t.key: t for t in acts}


@pytest.mark.slow
def test_resnet18_placement():
    model, graph, weights, acts = targets("resnet18")
    convs_and_fc = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert sorted(t.param for t in weights) == sorted(f"{n}.weight" for n in convs_and_fc)
    assert all(t.axis == 0 for t in weights)
    assert "input:0" in acts
    # after each ReLU
    relu_outputs = {f"{n.site}:out0" for n in graph if n.op == "relu"}
    assert relu_outputs <= set(acts)
    # before each residual add: the main branch's last BN, and the downsample BN
    for block in ("layer1.0", "layer2.0", "layer3.1", "layer4.0"):
        add = graph.node(f"{block}/add#0")
        for ref in add.inputs:
            assert ref.key in acts or graph.producer(ref).op == "max_pool2d"
    assert "layer2.0.downsample.1/batch_norm#0:out0" in acts
    # one quantizer shared by the block input's consumers (conv1 and the residual add)
    assert set(acts["relu/relu#0:out0"].consumers) == {"layer1.0.conv1/conv2d#0", "layer1.0/add#0"}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TORCHVISION))
def test_no_quantizer_between_conv_and_its_batch_norm(name):
    _, graph, weights, acts = targets(name)
    assert weights and acts
    for key, target in acts.items():
        if target.ref.kind != "node":
            continue
        producer = graph.node(target.ref.name)
        consumers = [n.op for n, _ in graph.consumers(target.ref)]
        if producer.op in NORM_FUSING_PRODUCERS:
            assert "batch_norm" not in consumers, f"{key} sits between {producer.op} and batch_norm"
        assert producer.op not in {"view", "reshape", "flatten", "max_pool2d", "dropout"}, "moved upstream"
    weighted = {n.site for n in graph if n.op in WEIGHTED_OPS}
    # every conv/linear input is quantized (possibly upstream of shape-only ops)
    fed = {c for t in acts.values() for c in t.consumers}
    assert weighted <= fed


@pytest.mark.slow
def test_mobilenet_v2_quantizes_after_relu6_and_before_residual_add():
    _, graph, _, acts = targets("mobilenet_v2")
    assert {f"{n.site}:out0" for n in graph if n.op == "hardtanh"} <= set(acts)
    adds = [n for n in graph if n.op == "add" and len(n.inputs) == 2 and n.inputs[1].kind == "node"]
    assert adds
    for add in adds:
        assert all(ref.key in acts for ref in add.inputs)


@pytest.mark.slow
def test_inception_concat_inputs_and_avg_pool_are_quantized():
    _, graph, _, acts = targets("inception_v3")
    cats = [n for n in graph if n.op == "cat"]
    assert cats
    for cat in cats:
        # a max-pool branch is quantized upstream of the pool (quantization commutes with max)
        assert all(source_of(graph, ref).key in acts for ref in cat.inputs if ref.kind == "node")
    pools = [n for n in graph if n.op == "avg_pool2d"]
    assert pools and all(source_of(graph, pool.inputs[0]).key in acts for pool in pools)


@pytest.mark.slow
def test_ignored_and_target_scopes():
    _, graph, weights, acts = targets("resnet18", ignored=["layer1", "{re}fc/.*"])
    names = {t.param for t in weights}
    assert not any(n.startswith("layer1.") for n in names) and "fc.weight" not in names
    assert "layer2.0.conv1.weight" in names
    _, _, weights, _ = targets("resnet18", targets=["layer4.1.conv2"])
    assert [t.param for t in weights] == ["layer4.1.conv2.weight"]


@pytest.mark.slow
def test_bert_integer_inputs_are_not_quantized():
    model, ids, mask = tiny_bert()
    graph = pc.trace(model, (ids,), {"attention_mask": mask})
    state = pc.quantization().init(graph, dict(model.named_parameters()), [dict(input_ids=ids, attention_mask=mask)])
    assert not any(k.startswith("input:") for k in state.activations)
    # embeddings are handled as weights: their tables are quantized, their lookups are not re-quantized
    weighted = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))]
    assert sorted(state.weights) == sorted(f"{n}.weight" for n in weighted)
    assert not any("embedding#" in k for k in state.activations)
    assert "embeddings/add#0:out0" in state.activations
