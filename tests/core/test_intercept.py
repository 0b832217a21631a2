"""Call-site interception (purecomp.intercept, purecomp.apply): site names
``<scope>/<op>#<index>``, transform keys ``:in<k>`` / ``:out<j>`` / ``input:<name>``, functional
and in-place ops, hooks and the mode present only for the duration of one call, and apply leaving
the model untouched."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import purecomp as pc
from purecomp.apply import call_with_sites
from purecomp.intercept import Interceptor, ScopeStack, site_name


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.act = nn.ReLU()

    def forward(self, x, y):
        a = torch.add(x, y)  # add#0
        b = F.relu(a)  # relu#0
        c = a + b  # add#1
        c += x  # add#2 (in place)
        return self.act(self.lin(c))


class Outer(nn.Module):
    """``block`` is called twice: its op indices keep counting through the second call."""

    def __init__(self) -> None:
        super().__init__()
        self.block = Block()
        self.head = nn.Linear(4, 2)

    def forward(self, x, y):
        h = self.block(x, y)
        h = self.block(h, x)
        h = h * 2  # root scope: mul#0
        return self.head(h)


OUTER_SITES = [
    "block/add#0", "block/relu#0", "block/add#1", "block/add#2", "block.lin/linear#0", "block.act/relu#0",
    "block/add#3", "block/relu#1", "block/add#4", "block/add#5", "block.lin/linear#1", "block.act/relu#1",
    "mul#0", "head/linear#0",
]


def outer():
    torch.manual_seed(0)
    return Outer().eval()


def no_hooks(model: nn.Module) -> bool:
    return not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def method_with_sites(sites, weight=None) -> pc.Compression:
    return pc.Compression(
        init=lambda context: (),
        params=lambda p, s: {k: weight(k, v) if weight else v for k, v in p.items()},
        sites=lambda s: dict(sites),
        loss=lambda p, s: torch.zeros(()),
        step=lambda s, progress, params=None: s,
    )


def run(model, sites, *args, **kwargs):
    return pc.apply(model, method_with_sites(sites), dict(model.named_parameters()), (), *args, **kwargs)


def record_calls(model, *args):
    calls = []
    scopes = ScopeStack(model)
    with torch.no_grad(), scopes.attached(), Interceptor(scopes, recorder=lambda *call: calls.append(call)):
        model(*args)
    return calls


def reference_block(block, x, y):
    a = x + y
    c = a + torch.relu(a) + x
    return torch.relu(block.lin(c))


def test_site_name_format():
    assert site_name("layer1.0", "add", 0) == "layer1.0/add#0"
    assert site_name("", "conv2d", 3) == "conv2d#3", "the root scope has no prefix"


def test_functional_inplace_and_nested_calls_are_named_with_increasing_indices():
    model = outer()
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    calls = record_calls(model, x, y)
    assert [c[0] for c in calls] == OUTER_SITES
    # (site, kind, scope, index) agree with each other
    for site, kind, scope, index, *_ in calls:
        assert site == site_name(scope, kind, index)
    assert pc.trace(model, (x, y)).sites == tuple(OUTER_SITES)
    assert no_hooks(model)


def test_in_and_out_keys_transform_exactly_one_call():
    model = outer()
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    block = model.block
    with torch.no_grad():
        plain = model(x, y)
        assert torch.allclose(run(model, {}, x, y), plain)
        # torch.add's second tensor argument in the first block call only
        got = run(model, {"block/add#0:in1": torch.zeros_like}, x, y)
        h = reference_block(block, x, torch.zeros_like(y))
        assert torch.allclose(got, model.head(2 * reference_block(block, h, x)))
        # the in-place add of the second call: its output
        got = run(model, {"block/add#5:out0": lambda t: t * 10}, x, y)
        h = reference_block(block, x, y)
        a = h + x
        second = torch.relu(block.lin(10 * (a + torch.relu(a) + h)))
        assert torch.allclose(got, model.head(2 * second))
        # F.relu's input, the root-scope mul's output
        got = run(model, {"block/relu#1:in0": lambda t: -t, "mul#0:out0": lambda t: t + 1}, x, y)
        a = h + x
        second = torch.relu(block.lin(a + torch.relu(-a) + h))
        assert torch.allclose(got, model.head(2 * second + 1))
        # in1 of F.linear is the weight: a site transform can reach it
        got = run(model, {"head/linear#0:in1": torch.zeros_like}, x, y)
        assert torch.allclose(got, model.head.bias.expand(3, 2))
    assert no_hooks(model)


def test_out_index_counts_tensors_of_a_multi_output_op():
    class Split(nn.Module):
        def forward(self, x):
            first, second = torch.split(x, 2, dim=1)
            return first * second

    x = torch.arange(8.0).reshape(2, 4)
    got = run(Split(), {"split#0:out1": lambda t: t + 100, "mul#0:in0": lambda t: -t}, x)
    assert torch.equal(got, -x[:, :2] * (x[:, 2:] + 100))


def test_input_sites_by_position_keyword_and_nested_name():
    class Model(nn.Module):
        def forward(self, x, pair, *, scale):
            return x + pair[0] * pair[1] + scale

    x, p0, p1, s = (torch.full((2,), v) for v in (1.0, 2.0, 3.0, 4.0))
    model = Model()
    assert torch.equal(run(model, {}, x, (p0, p1), scale=s), x + p0 * p1 + s)
    got = run(model, {"input:0": lambda t: t * 10, "input:1.1": lambda t: t - 3, "input:scale": torch.neg},
              x, (p0, p1), scale=s)
    assert torch.equal(got, 10 * x + p0 * (p1 - 3) - s)
    assert torch.equal(x, torch.full((2,), 1.0)), "the caller's tensors are not modified"
    assert {name for name, _ in pc.trace(model, (x, (p0, p1)), {"scale": s}).inputs} == {"0", "1.0", "1.1", "scale"}


def test_repeated_applies_restart_the_count():
    model = outer()
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    sites = {"block/add#0:out0": lambda t: t * 0}
    with torch.no_grad():
        first = run(model, sites, x, y)
        second = run(model, sites, x, y)
    assert torch.equal(first, second)


def test_a_loop_over_one_submodule_and_root_ops():
    class Loop(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.step = nn.Linear(3, 3)

        def forward(self, x):
            for _ in range(3):
                x = torch.tanh(self.step(x))
            return x

    torch.manual_seed(0)
    model = Loop()
    x = torch.randn(2, 3)
    assert pc.trace(model, (x,)).sites == (
        "step/linear#0", "tanh#0", "step/linear#1", "tanh#1", "step/linear#2", "tanh#2")
    with torch.no_grad():
        got = run(model, {"tanh#1:out0": lambda t: t * 0}, x)
        assert torch.allclose(got, torch.tanh(model.step(torch.zeros(2, 3))))


def test_hooks_and_mode_are_gone_after_a_call_even_when_a_site_raises():
    model = outer()
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    hooks_inside = []

    def look(t):
        hooks_inside.append(not no_hooks(model))
        return t

    run(model, {"block/add#1:out0": look}, x, y)
    assert hooks_inside == [True]
    assert no_hooks(model) and torch._C._len_torch_function_stack() == 0

    def fail(t):
        raise RuntimeError("site failed")

    with pytest.raises(RuntimeError, match="site failed"):
        run(model, {"block.lin/linear#1:in0": fail}, x, y)
    assert no_hooks(model) and torch._C._len_torch_function_stack() == 0
    # a user's own hook is left in place
    handle = model.head.register_forward_hook(lambda m, a, o: o)
    run(model, {"mul#0:out0": lambda t: t}, x, y)
    assert len(model.head._forward_hooks) == 1 and sum(len(m._forward_hooks) for m in model.modules()) == 1
    handle.remove()


def test_input_sites_alone_attach_no_hooks_and_no_mode():
    model = outer()
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    seen = []

    def look(t):
        seen.append(no_hooks(model) and torch._C._len_torch_function_stack() == 0)
        return t

    with torch.no_grad():
        out = call_with_sites(model, dict(model.named_parameters()), {"input:0": look}, (x, y), {})
        assert torch.allclose(out, model(x, y))
    assert seen == [True]


def resnet18():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval()


def test_resnet18_sites_include_the_residual_add_and_the_twice_called_relu():
    model = resnet18()
    graph = pc.trace(model, (torch.randn(2, 3, 32, 32),))
    sites = set(graph.sites)
    for layer, blocks in (("layer1", 2), ("layer2", 2), ("layer3", 2), ("layer4", 2)):
        for i in range(blocks):
            assert f"{layer}.{i}/add#0" in sites and f"{layer}.{i}/add#1" not in sites
            assert {f"{layer}.{i}.relu/relu#0", f"{layer}.{i}.relu/relu#1"} <= sites
    assert {"conv1/conv2d#0", "maxpool/max_pool2d#0", "flatten#0", "fc/linear#0"} <= sites
    assert "layer2.0.downsample.0/conv2d#0" in sites
    assert no_hooks(model)


def test_resnet18_residual_add_input_transform_matches_a_hand_run():
    model = resnet18()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got = run(model, {"layer1.0/add#0:in1": torch.zeros_like}, x)  # the identity branch of `out += identity`
        h = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        block = model.layer1[0]
        h = block.relu(block.bn2(block.conv2(block.relu(block.bn1(block.conv1(h))))))
        h = model.layer4(model.layer3(model.layer2(model.layer1[1](h))))
        expected = model.fc(torch.flatten(model.avgpool(h), 1))
        assert torch.allclose(got, expected, atol=1e-5)
        assert not torch.allclose(got, model(x), atol=1e-3)


def test_apply_leaves_the_model_untouched():
    model = resnet18()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = model(x)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    params = {**dict(model.named_parameters()), **buffers}
    method = method_with_sites({"layer1.0/add#0:out0": lambda t: t * 0.5, "input:0": lambda t: t + 1},
                               weight=lambda k, v: v * 0.9 if k.endswith("weight") and v.dim() == 4 else v)
    out = pc.apply(model, method, params, (), x)
    out.sum().backward()
    assert model.training, "the training flag is kept"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "no parameter or buffer changed"
    assert not torch.equal(buffers["bn1.running_mean"], before["bn1.running_mean"]), \
        "running statistics update the buffers passed in params"
    assert model.conv1.weight.grad is not None, "gradients reach the passed parameters"
    assert no_hooks(model) and torch._C._len_torch_function_stack() == 0
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), reference), "the model runs as before"
