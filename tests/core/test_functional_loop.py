"""examples/functional_loop.py: the torch.func loop trains without torch.optim or .backward(), its
updates equal hand-computed references, a step leaves its inputs untouched, and the exported
ONNX model agrees with pc.apply."""

from __future__ import annotations

import ast
import math
import sys
from pathlib import Path

import pytest
import torch

import purecomp as pc

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
sys.path.insert(0, str(EXAMPLES))

import functional_loop as fl  # noqa: E402
from digits_demo import sparse_int8_method  # noqa: E402

from common import digits_cnn  # noqa: E402


@pytest.fixture(scope="module")
def setup():
    """The digits CNN with the demo's INT8 + sparsity state calibrated on random images."""
    torch.manual_seed(0)
    model = digits_cnn()
    batches = [(torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))) for _ in range(2)]
    method = sparse_int8_method(3)
    params = dict(model.named_parameters()) | {k: v.clone() for k, v in model.named_buffers()}
    model.eval()
    state = method.init(pc.trace(model, (batches[0][0],)), params, batches)
    model.train()
    return model, method, params, state, batches


def test_source_has_no_optimizer_object_or_backward():
    tree = ast.parse((EXAMPLES / "functional_loop.py").read_text())
    attributes = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    imported = {a.name for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom)) for a in node.names}
    modules = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not {"optim", "backward", "autograd", "zero_grad"} & attributes, attributes
    assert not {"optim", "torch.optim"} & (imported | modules)


def test_one_sgd_step_equals_params_minus_lr_times_autograd_grad(setup):
    model, method, params, state, batches = setup
    x, y = batches[0]
    s = fl.split(model, params, state)
    assert len(s.weights) > s.n_params, "the quantizer ranges are trainable leaves too"
    grads, _ = torch.func.grad_and_value(fl.make_loss(model, method, s), has_aux=True)(s.weights, s.buffers, x, y)
    new, _ = fl.sgd_update(s.weights, grads, None, 0.1)

    # reference: eager autograd on leaves that require grad, the same loss written out again
    leaves = [w.clone().requires_grad_(True) for w in s.weights]
    buffers = {k: v.clone() for k, v in s.buffers.items()}
    p, st = s.params(leaves, buffers), s.state(leaves)
    loss = torch.nn.functional.cross_entropy(pc.apply(model, method, p, st, x), y) + method.loss(p, st)
    ref_grads = torch.autograd.grad(loss, leaves)
    for w, g, n in zip(s.weights, ref_grads, new):
        torch.testing.assert_close(n, w - 0.1 * g, rtol=1e-5, atol=1e-6)
    assert any(float(g.abs().max()) > 0 for g in ref_grads[s.n_params:]), "ranges get gradients"


def test_first_adam_step_moves_each_weight_by_lr_times_sign_of_grad():
    w = [torch.tensor([1.0, -2.0, 3.0])]
    g = [torch.tensor([0.5, -4.0, 1e-3])]
    new, opt = fl.adam_update(w, g, fl.adam_init(w), lr=0.01)
    # m̂ = g, v̂ = g², so the step is lr * g / (|g| + eps)
    torch.testing.assert_close(new[0], w[0] - 0.01 * g[0] / (g[0].abs() + 1e-8))
    assert opt.t == 1 and torch.equal(opt.m[0], 0.1 * g[0])


def test_step_does_not_modify_its_inputs(setup):
    model, method, params, state, batches = setup
    s = fl.split(model, params, state)
    before = [w.clone() for w in s.weights], {k: v.clone() for k, v in s.buffers.items()}
    step = torch.func.grad_and_value(fl.make_loss(model, method, s), has_aux=True)
    _, (_, (_, new_buffers)) = step(s.weights, s.buffers, *batches[0])
    for a, b in zip(before[0], s.weights):
        assert torch.equal(a, b)
    for k in before[1]:
        assert torch.equal(before[1][k], s.buffers[k])
    assert not torch.equal(new_buffers["1.running_mean"], s.buffers["1.running_mean"]), "BN stats are returned"


def test_main_trains_without_torch_optim_and_onnx_agrees(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the functional loop must not create an optimizer or call backward")

    monkeypatch.setattr(torch.optim.Optimizer, "__init__", forbidden)
    monkeypatch.setattr(torch.Tensor, "backward", forbidden)
    monkeypatch.setattr(torch.autograd, "backward", forbidden)
    result = fl.main(["--epochs", "1", "--qat-epochs", "1", "--max-steps", "12", "--lr", "1e-3"])
    fp32_losses, losses = result["fp32_losses"], result["losses"]
    assert len(fp32_losses) == 12 and len(losses) == 12
    assert all(math.isfinite(v) for v in fp32_losses + losses)
    assert sum(fp32_losses[-4:]) < sum(fp32_losses[:4]), fp32_losses
    assert sum(losses[-4:]) < sum(losses[:4]), losses
    assert abs(result["sparsity"] - 0.5) < 0.02
    assert result["argmax_agreement"] >= 0.99 and result["max_abs_diff"] < 0.05, result["max_abs_diff"]
    assert abs(result["onnx"] - result["compressed"]) <= 1.0
