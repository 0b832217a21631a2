"""purecomp.trace on real architectures."""

from __future__ import annotations

import pytest
import torch

import purecomp as pc
from purecomp.errors import UnknownOpError
from purecomp.intercept import op_kind, split_site

from models import TORCHVISION, tiny_bert, torchvision_model


def test_op_kind_normalizes_inplace_dunder_and_functional_forms():
    assert op_kind(torch.Tensor.__iadd__) == "add"
    assert op_kind(torch.Tensor.add_) == "add"
    assert op_kind(torch.add) == "add"
    assert op_kind(torch.Tensor.__radd__) == "add"
    assert op_kind(torch.Tensor.__matmul__) == "matmul"
    assert op_kind(torch.nn.functional.max_pool2d) == "max_pool2d"
    assert op_kind(torch.nn.functional.relu) == "relu"
    assert split_site("layer1.0/add#0") == ("layer1.0", "add", 0)
    assert split_site("conv2d#3") == ("", "conv2d", 3)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TORCHVISION))
def test_traces_torchvision_models_unchanged(name):
    model, x = torchvision_model(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    graph = pc.trace(model, (x,))
    assert len(graph) > 10
    assert len(set(graph.sites)) == len(graph), "site names are unique"
    convs = [n for n in graph if n.op == "conv2d"]
    conv_modules = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == len(conv_modules)
    assert all(n.params and n.params[0].endswith("weight") for n in convs)
    # every op input is a model input, a parameter, or the output of an earlier op
    seen = set()
    for node in graph:
        for ref in node.inputs:
            if ref.kind == "node":
                assert ref.name in seen
        seen.add(node.site)
    assert graph.outputs and graph.outputs[0].kind == "node"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()), "no hooks left behind"


@pytest.mark.slow
def test_resnet18_residual_edges():
    model, x = torchvision_model("resnet18")
    graph = pc.trace(model, (x,))
    add = graph.node("layer1.0/add#0")
    assert [ref.name for ref in add.inputs] == ["layer1.0.bn2/batch_norm#0", "maxpool/max_pool2d#0"]
    relu = graph.node("layer1.0.relu/relu#1")  # the block's ReLU module is called twice
    assert relu.inputs[0].name == "layer1.0/add#0"
    assert {n.site for n, _ in graph.consumers(pc.TensorRef("node", "maxpool/max_pool2d#0"))} == {
        "layer1.0.conv1/conv2d#0", "layer1.0/add#0"}
    assert graph.node("conv1/conv2d#0").option("stride") == (2, 2)
    with pytest.raises(UnknownOpError, match="no site 'nope'"):
        graph.node("nope")


@pytest.mark.slow
def test_traces_huggingface_bert():
    model, ids, mask = tiny_bert()
    graph = pc.trace(model, (ids,), {"attention_mask": mask})
    ops = {n.op for n in graph}
    assert {"linear", "embedding", "layer_norm", "add"} <= ops
    assert dict(graph.inputs)["0"].dtype == torch.long
    assert dict(graph.inputs)["attention_mask"].dtype == torch.long
    linears = [n for n in graph if n.op == "linear"]
    assert len(linears) == 2 * 6 + 1
    # a ModelOutput (an OrderedDict subclass) still yields its tensors as the graph's outputs
    assert [ref.name for ref in graph.outputs] == [
        "encoder.layer.1.output.LayerNorm/layer_norm#0", "pooler.activation/tanh#0"]  # q, k, v, attention out, intermediate, output per layer; pooler
