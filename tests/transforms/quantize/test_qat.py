"""QAT through purecomp.apply: gradients reach every weight and every quantizer parameter; purity;
torch.func transforms."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import purecomp as pc
from purecomp.transforms.quantize import LogScaleSymmetricQuantizer

from models import torchvision_model


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    ).eval()


def init_quantization(model, x, **kw):
    graph = pc.trace(model, (x,))
    method = pc.quantization(**kw)
    params = dict(model.named_parameters())
    state = method.init(graph, params, [x])
    return graph, method, params, state


@pytest.mark.slow
@pytest.mark.parametrize("act_mode", ["symmetric", "asymmetric"])
def test_qat_step_on_resnet18_gives_gradients_to_every_weight_and_scale(act_mode):
    model, x = torchvision_model("resnet18")
    model.train()
    graph, method, params, state = init_quantization(
        model, x, weights=dict(per_channel=True), activations=dict(mode=act_mode, bits=8)
    )
    quantizer_params = pc.trainable(state)
    assert len(quantizer_params) == len(state.weights) + (2 if act_mode == "asymmetric" else 1) * len(state.activations)
    opt = torch.optim.SGD(list(params.values()) + quantizer_params, lr=0.01)
    logits = pc.apply(model, method, params, state, x)
    loss = nn.functional.cross_entropy(logits, torch.tensor([1, 2]))
    loss.backward()
    for name, p in params.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # a model in train mode is calibrated in train mode, so its weights train log(scale)
    assert all(isinstance(q, LogScaleSymmetricQuantizer) for q in state.weights.values())
    for name, q in state.weights.items():
        assert q.log_scale.grad is not None and q.log_scale.grad.abs().sum() > 0, name
    for key, q in state.activations.items():
        grads = [q.scale.grad] if act_mode == "symmetric" else [q.input_low.grad, q.input_range.grad]
        assert all(g is not None for g in grads), key
        assert sum(g.abs().sum() for g in grads) > 0, key
    before = [p.detach().clone() for p in quantizer_params]
    opt.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, quantizer_params))


@pytest.mark.slow
def test_apply_is_pure_and_quantizes():
    model, x = torchvision_model("resnet18")
    graph, method, params, state = init_quantization(model, x)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        fp32 = model(x)
    int8 = pc.apply(model, method, params, state, x)
    again = pc.apply(model, method, params, state, x)
    assert torch.equal(int8, again)
    assert not torch.equal(int8, fp32) and torch.allclose(int8, fp32, atol=0.25 * float(fp32.abs().max()))
    assert all(torch.equal(snapshot[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(x), fp32), "the model runs unchanged afterwards"


def test_weight_transform_and_sites_are_what_apply_uses():
    model = small_cnn()
    x = torch.randn(4, 1, 8, 8)
    graph, method, params, state = init_quantization(model, x, activations=dict(mode="asymmetric"))
    qparams = method.params(params, state)
    for name, q in state.weights.items():
        assert torch.equal(qparams[name], q(params[name]))
    assert set(method.sites(state)) == set(state.activations)
    # only the first conv's input: apply with nothing but the input quantizer equals quantizing x by hand
    only_input = pc.Compression(
        init=method.init, params=lambda p, s: dict(p), sites=lambda s: {"input:0": s.activations["input:0"]},
        loss=method.loss, step=method.step,
    )
    expected = model(state.activations["input:0"](x))
    assert torch.equal(pc.apply(model, only_input, params, state, x), expected)


def test_chain_applies_members_in_order_and_steps_all():
    model = small_cnn()
    x = torch.randn(4, 1, 8, 8)
    graph = pc.trace(model, (x,))
    w8 = pc.quantization(weights=dict(bits=8), activations=dict(bits=8))
    w4 = pc.quantization(weights=dict(bits=4), activations=dict(bits=4))
    method = pc.chain(w8, w4)
    params = dict(model.named_parameters())
    state = method.init(graph, params, [x])
    assert isinstance(state, tuple) and len(state) == 2
    name = "0.weight"
    expected = state[1].weights[name](state[0].weights[name](params[name]))
    assert torch.equal(method.params(params, state)[name], expected)
    assert method.step(state, pc.Progress(step=1)) == state
    assert float(method.loss(params, state)) == 0.0


def _loss_fn(model, method):
    def loss(leaves_params, leaves_state, spec_params, spec_state, x, y):
        params = pc.struct.tree_unflatten(spec_params, leaves_params)
        state = pc.struct.tree_unflatten(spec_state, leaves_state)
        return nn.functional.cross_entropy(pc.apply(model, method, params, state, x), y)

    return loss


def test_torch_func_grad_and_per_sample_vmap_match_eager_autograd():
    from torch.func import grad, vmap

    model = small_cnn()
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 1])
    graph, method, params, state = init_quantization(model, x, activations=dict(mode="asymmetric"))
    p_leaves, p_spec = pc.struct.tree_flatten(params)
    s_leaves, s_spec = pc.struct.tree_flatten(state)
    loss = _loss_fn(model, method)

    eager = loss(p_leaves, s_leaves, p_spec, s_spec, x, y)
    eager_grads = torch.autograd.grad(eager, p_leaves + s_leaves)
    p_det = [t.detach() for t in p_leaves]
    s_det = [t.detach() for t in s_leaves]
    g_params, g_state = grad(loss, argnums=(0, 1))(p_det, s_det, p_spec, s_spec, x, y)
    for a, b in zip(eager_grads, list(g_params) + list(g_state)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    def one(p, s, xi, yi):
        return loss(p, s, p_spec, s_spec, xi[None], yi[None])

    per_sample = vmap(grad(one, argnums=(0, 1)), in_dims=(None, None, 0, 0), randomness="same")(p_det, s_det, x, y)
    for i in range(len(x)):
        single = grad(one, argnums=(0, 1))(p_det, s_det, x[i], y[i])
        for a, b in zip(list(single[0]) + list(single[1]), list(per_sample[0]) + list(per_sample[1])):
            torch.testing.assert_close(a, b[i], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_apply_compiles_with_fullgraph():
    model = small_cnn()
    x = torch.randn(4, 1, 8, 8)
    graph, method, params, state = init_quantization(model, x)
    expected = pc.apply(model, method, params, state, x)
    run = pc.compile_apply(model, method, fullgraph=True)
    torch.testing.assert_close(run(params, state, x), expected)
    x2 = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(run(params, state, x2), pc.apply(model, method, params, state, x2))
