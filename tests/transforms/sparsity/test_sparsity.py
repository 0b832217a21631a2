"""Sparsity: exact magnitude levels, RB training and reproducibility, stacking with INT8, configs."""

from __future__ import annotations

import onnx
import pytest
import torch
from torch import nn

import purecomp as pc
from purecomp import export
from purecomp.errors import ConfigError, StateError
from purecomp.transforms.sparsity import RBSparsityState, magnitude_masks

from models import torchvision_model


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 36, 10)).eval()


def zeros(t: torch.Tensor) -> int:
    return int((t == 0).sum())


@pytest.mark.parametrize("mode", ["global", "local"])
@pytest.mark.parametrize("kind", ["abs", "normed_abs"])
@pytest.mark.parametrize("level", [0.0, 0.3, 0.5, 0.77])
def test_magnitude_masks_meet_the_level_exactly(mode, kind, level):
    torch.manual_seed(1)
    params = {"a": torch.randn(7, 5), "b": torch.randn(3, 4, 3, 3) * 5, "c": torch.ones(6, 2)}  # c: all ties
    masks = magnitude_masks(params, list(params), level, kind, mode)
    if mode == "global":
        total = sum(p.numel() for p in params.values())
        assert sum(zeros(m) for m in masks.values()) == round(level * total)
    else:
        for name, p in params.items():
            assert zeros(masks[name]) == round(level * p.numel())
    for name, p in params.items():  # the zeroed weights are the least important
        kept, dropped = p[masks[name] == 1].abs(), p[masks[name] == 0].abs()
        if mode == "local" and kept.numel() and dropped.numel():
            assert dropped.max() <= kept.min()


def test_magnitude_follows_its_schedule_and_needs_params_to_move():
    model = small_net()
    x = torch.randn(4, 1, 8, 8)
    graph = pc.trace(model, (x,))
    method = pc.magnitude_sparsity(pc.schedules.multistep([1, 2], [0.2, 0.4, 0.6]), freeze_epoch=3)
    params = dict(model.named_parameters())
    state = method.init(graph, params)
    assert sorted(state.masks) == ["0.weight", "3.weight"]
    assert state.level == 0.2
    with pytest.raises(StateError, match="pass the current weights"):
        method.step(state, pc.Progress(epoch=1))
    state = method.step(state, pc.Progress(epoch=2), params)
    total = sum(m.numel() for m in state.masks.values())
    assert sum(zeros(m) for m in state.masks.values()) == round(0.6 * total)
    out = method.params(params, state)
    assert all(zeros(out[n]) >= zeros(m) for n, m in state.masks.items())
    frozen = method.step(state, pc.Progress(epoch=3), params)
    assert frozen.frozen and method.step(frozen, pc.Progress(epoch=9), params) is frozen


def _rb_train(seed: int, steps: int = 150):
    torch.manual_seed(0)
    model = small_net().train()
    data = [(torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))) for _ in range(4)]
    graph = pc.trace(model, (data[0][0],))
    method = pc.rb_sparsity(0.5, seed=seed)
    params = dict(model.named_parameters())
    state = method.init(graph, params)
    weights = torch.optim.Adam(params.values(), lr=1e-3)
    logits = torch.optim.SGD(pc.trainable(state), lr=1.0, momentum=0.9)
    gates_seen = []
    for i in range(steps):
        x, y = data[i % len(data)]
        loss = nn.functional.cross_entropy(pc.apply(model, method, params, state, x), y) + 2000 * method.loss(params, state)
        weights.zero_grad()
        logits.zero_grad()
        loss.backward()
        weights.step()
        logits.step()
        if i < 3:
            from purecomp.transforms.sparsity.rb import sample_gates

            gates_seen.append({k: v.detach().clone() for k, v in sample_gates(state).items()})
        state = method.step(state, pc.Progress(step=i + 1), params)
    return model, method, params, state, gates_seen


def test_rb_reaches_the_target_level_and_is_reproducible():
    model, method, params, state, gates = _rb_train(seed=3)
    assert isinstance(state, RBSparsityState)
    assert abs(state.expected_density() - 0.5) <= 0.02
    det = state.gates()
    total = sum(m.numel() for m in det.values())
    level = sum(zeros(m) for m in det.values()) / total
    assert abs(level - 0.5) <= 0.02
    _, _, _, state_again, gates_again = _rb_train(seed=3)
    for a, b in zip(gates, gates_again):
        assert all(torch.equal(a[k], b[k]) for k in a)
    for k in state.logits:
        assert torch.equal(state.logits[k], state_again.logits[k])
    _, _, _, _, gates_other = _rb_train(seed=4, steps=3)
    assert any(not torch.equal(gates[0][k], gates_other[0][k]) for k in gates[0])


def test_rb_gates_are_deterministic_in_eval_and_frozen_after_the_freeze_epoch():
    model = small_net()
    x = torch.randn(4, 1, 8, 8)
    graph = pc.trace(model, (x,))
    method = pc.rb_sparsity(0.5, seed=0, freeze_epoch=2)
    params = dict(model.named_parameters())
    state = method.init(graph, params)
    with torch.no_grad():
        for s in state.logits.values():
            s.normal_()
    model.train()
    a = pc.apply(model, method, params, state, x)
    b = pc.apply(model, method, params, method.step(state, pc.Progress(step=1)), x)
    assert not torch.equal(a, b), "training gates are resampled every step"
    model.eval()
    assert torch.equal(pc.apply(model, method, params, state, x),
                       pc.apply(model, method, params, method.step(state, pc.Progress(step=1)), x))
    frozen = method.step(state, pc.Progress(epoch=2))
    assert frozen.frozen and float(method.loss(params, frozen)) == 0.0
    later = method.step(frozen, pc.Progress(epoch=3))
    assert all(torch.equal(frozen.frozen_masks[k], later.frozen_masks[k]) for k in frozen.frozen_masks)


def test_const_sparsity_keeps_existing_zeros():
    model = small_net()
    with torch.no_grad():
        model[0].weight[0] = 0
    graph = pc.trace(model, (torch.randn(2, 1, 8, 8),))
    method = pc.const_sparsity()
    params = dict(model.named_parameters())
    state = method.init(graph, params)
    with torch.no_grad():
        model[0].weight.add_(1.0)  # training would move the zeros
    assert zeros(method.params(params, state)["0.weight"][0]) == 9


@pytest.mark.slow
def test_sparsity_stacks_with_int8_on_resnet18_and_both_reach_the_export(tmp_path):
    model, x = torchvision_model("resnet18")
    model.train()
    graph = pc.trace(model, (x,))
    config = pc.load_config({
        "compression": [
            {"algorithm": "magnitude_sparsity", "sparsity_init": 0.3,
             "params": {"schedule": "multistep", "multistep_steps": [1], "multistep_sparsity_levels": [0.3, 0.5]}},
            {"algorithm": "quantization", "weights": {"per_channel": True}, "initializer": {"range": {"num_init_samples": 2}}},
        ]
    })
    method = config.method()
    params = dict(model.named_parameters())
    state = method.init(graph, params, [x])
    opt = torch.optim.SGD(list(params.values()) + pc.trainable(state), lr=1e-3)
    for epoch in range(2):
        loss = nn.functional.cross_entropy(pc.apply(model, method, params, state, x), torch.tensor([1, 2]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        state = method.step(state, pc.Progress(epoch=epoch + 1), params)
    sparse_state, quant_state = state
    assert sparse_state.level == 0.5
    # the mask applies before weight quantization: masked weights stay exactly 0
    w = method.params(params, state)["layer1.0.conv1.weight"]
    assert torch.equal(w[sparse_state.masks["layer1.0.conv1.weight"] == 0], torch.zeros(int(zeros(sparse_state.masks["layer1.0.conv1.weight"]))))
    model.eval()
    path = export.to_onnx(model, method, params, state, (x,), tmp_path / "sparse_int8.onnx")
    proto = onnx.load(str(path))
    ints = [onnx.numpy_helper.to_array(i) for i in proto.graph.initializer
            if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 4]
    assert len(ints) == 20
    total = sum(a.size for a in ints)
    assert sum(int((a == 0).sum()) for a in ints) / total >= 0.49
    assert any(n.op_type == "QuantizeLinear" for n in proto.graph.node)
    table = pc.statistics(graph, state)
    assert table["sparsity"].rows[-1]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert len(table["quantizers"]) > 20


@pytest.mark.parametrize(
    "section, path, message",
    [
        ({"algorithm": "magnitude_sparsity", "params": {"sparsity_target": 1.0}}, r"compression.params.sparsity_target", r"\[0, 1\)"),
        ({"algorithm": "rb_sparsity", "sparsity_init": -0.1}, r"compression.sparsity_init", r"\[0, 1\)"),
        ({"algorithm": "rb_sparsity", "params": {"sparsity_target_epoch": 10, "sparsity_freeze_epoch": 5}},
         r"compression.params.sparsity_freeze_epoch", "before the target is reached"),
        ({"algorithm": "magnitude_sparsity", "params": {"schedule": "cosine"}}, r"compression.params.schedule", "expected one of"),
        ({"algorithm": "magnitude_sparsity", "params": {"schedule": "adaptive"}}, r"compression.params.schedule", "rb_sparsity"),
        ({"algorithm": "magnitude_sparsity", "weight_importance": "l3"}, r"compression.weight_importance", "expected one of"),
        ({"algorithm": "rb_sparsity", "params": {"warmup": 3}}, r"compression.params.warmup", "unknown key"),
        ({"algorithm": "magnitude_sparsity", "params": {"schedule": "multistep", "multistep_steps": [2],
                                                         "multistep_sparsity_levels": [0.1]}},
         r"compression.params.multistep_sparsity_levels", "expected 2 levels"),
    ],
)
def test_bad_sparsity_configs_raise(section, path, message):
    with pytest.raises(ConfigError, match=rf"^{path}.*{message}"):
        pc.load_config({"compression": section})


def test_sparsity_config_keys_build_the_schedules():
    config = pc.load_config({"compression": {
        "algorithm": "rb_sparsity", "sparsity_init": 0.1, "seed": 7,
        "params": {"schedule": "polynomial", "power": 1, "concave": False, "sparsity_target": 0.6,
                   "sparsity_target_epoch": 4, "sparsity_freeze_epoch": 6,
                   "update_per_optimizer_step": True, "steps_per_epoch": 10}}})
    model = small_net()
    graph = pc.trace(model, (torch.randn(2, 1, 8, 8),))
    method = config.method()
    state = method.init(graph, dict(model.named_parameters()))
    assert state.seed == 7 and state.level == pytest.approx(0.1)
    state = method.step(state, pc.Progress(step=20, epoch=2))
    assert state.level == pytest.approx(0.35)
    assert method.step(state, pc.Progress(step=60, epoch=6)).frozen
