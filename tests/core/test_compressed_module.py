"""The front door keeps optimizer identity: ``CompressedModule`` names state tensors by their
path in the state tree, keeps the same Parameter objects when the state's layout grows (RB
sparsity freezing its masks under quantization), resumes bit-exact, and refuses a change that
would silently detach a trainable tensor from its optimizer."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import purecomp as pc
from purecomp.compressed_module import CompressedModule, state_names
from purecomp.compression import Compression, chain
from purecomp.errors import StateError

CONFIG = {
    "input_info": {"sample_size": [2, 1, 8, 8]},
    "compression": [
        {"algorithm": "rb_sparsity", "sparsity_init": 0.02,
         "params": {"schedule": "polynomial", "sparsity_target": 0.3, "sparsity_target_epoch": 1,
                    "sparsity_freeze_epoch": 1}},
        {"algorithm": "quantization"},
    ],
}


def small_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def batches(n: int = 4, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, 1, 8, 8, generator=gen), torch.randint(0, 3, (2,), generator=gen)) for _ in range(n)]


def make(compression_state=None, seed: int = 0):
    config = pc.register_default_init_args(pc.Config.from_dict(CONFIG), batches(seed=99))
    return pc.create_compressed_model(small_model(seed), config, compression_state=compression_state)


def descend(opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    opt.zero_grad()
    loss.backward()
    opt.step()


def train_steps(ctrl, module, opt, data) -> None:
    for x, y in data:
        ctrl.scheduler.step()
        descend(opt, nn.functional.cross_entropy(module(x), y) + ctrl.loss())


def quantizer_params(module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in module.named_parameters() if n.startswith("compression.quantization.")}


def optimizer_holds(opt, tensor) -> bool:
    return any(p is tensor for group in opt.param_groups for p in group["params"])


def test_rb_sparsity_freeze_under_quantization_keeps_quantizer_parameters():
    data = batches()
    ctrl, module = make()
    opt = torch.optim.SGD(module.parameters(), lr=0.05)
    before = quantizer_params(module)
    assert before
    keys = list(module.state_dict())
    assert "compression.quantization.weights.0.weight.scale" in keys
    assert "compression.quantization.weights.3.weight.scale" in keys
    assert "compression.rb_sparsity.logits.0.weight" in keys
    assert not any(k.startswith("compression.rb_sparsity.frozen_masks.") for k in keys)

    ctrl.scheduler.epoch_step()  # epoch 0
    train_steps(ctrl, module, opt, data)
    ctrl.scheduler.epoch_step()  # epoch 1: the masks freeze, the state grows
    assert ctrl.state[0].frozen
    keys = list(module.state_dict())
    assert any(k.startswith("compression.rb_sparsity.frozen_masks.") for k in keys)
    after = quantizer_params(module)
    assert after.keys() == before.keys()
    for name, param in after.items():
        assert param is before[name], name
        assert optimizer_holds(opt, param), name
    snapshot = {n: p.detach().clone() for n, p in after.items()}

    train_steps(ctrl, module, opt, data)
    unchanged = [n for n, p in quantizer_params(module).items() if torch.equal(p, snapshot[n])]
    assert not unchanged, f"quantizer parameters not trained after the freeze: {unchanged}"
    ctrl.scheduler.epoch_step()  # epoch 2
    train_steps(ctrl, module, opt, data)
    for name, param in quantizer_params(module).items():
        assert param is before[name] and optimizer_holds(opt, param), name


def test_resume_after_freeze_is_bit_exact(tmp_path):
    data = batches()
    ctrl, module = make()
    opt = torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9)
    for _ in range(2):  # epoch 0, then the freeze epoch
        ctrl.scheduler.epoch_step()
        train_steps(ctrl, module, opt, data)
    assert ctrl.state[0].frozen

    torch.save(ctrl.get_compression_state(), tmp_path / "compression.pt")
    saved = torch.load(tmp_path / "compression.pt", weights_only=True)
    model_state = copy.deepcopy(module.state_dict())
    opt_state = copy.deepcopy(opt.state_dict())

    ctrl2, module2 = make(compression_state=saved, seed=1)
    module2.load_state_dict(model_state)
    opt2 = torch.optim.SGD(module2.parameters(), lr=0.05, momentum=0.9)
    opt2.load_state_dict(opt_state)
    assert [n for n, _ in module2.named_parameters()] == [n for n, _ in module.named_parameters()]
    assert list(module2.state_dict()) == list(module.state_dict())

    more = batches(seed=5)
    for c, m, o in ((ctrl, module, opt), (ctrl2, module2, opt2)):
        c.scheduler.epoch_step()
        train_steps(c, m, o, more)
    a, b = module.state_dict(), module2.state_dict()
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different


# ---------------------------------------------------------------- set_state on a toy method


def toy(name: str) -> Compression:
    return Compression(init=lambda context: {}, params=lambda params, state: dict(params),
                       sites=lambda state: {}, loss=lambda params, state: torch.zeros(()),
                       step=lambda state, progress, params=None: state, name=name)


def trainable(*shape: int) -> torch.Tensor:
    return torch.zeros(*shape, requires_grad=True)


def test_set_state_keeps_objects_adds_and_removes_paths():
    module = CompressedModule(nn.Linear(2, 2), toy("toy"))
    module.set_state({"scale": trainable(3), "mask": torch.ones(3), "n": 7})
    scale = dict(module.named_parameters())["compression.toy.scale"]
    assert "compression.toy.mask" in dict(module.named_buffers())
    assert "compression.toy.n" not in module.state_dict()  # non-tensor leaves are not registered

    module.set_state({"scale": torch.full((3,), 2.0, requires_grad=True), "extra": torch.ones(2), "n": 8})
    params = dict(module.named_parameters())
    assert params["compression.toy.scale"] is scale and torch.equal(scale, torch.full((3,), 2.0))
    buffers = dict(module.named_buffers())
    assert "compression.toy.extra" in buffers and "compression.toy.mask" not in buffers
    state = module.state
    assert state["scale"] is scale and state["n"] == 8

    module.set_state({"scale": scale, "extra": torch.ones(5), "n": 8})  # a buffer may change shape
    assert dict(module.named_buffers())["compression.toy.extra"].shape == (5,)

    # a detached tensor at a trainable path (RB logits at the freeze) keeps the trainable Parameter
    module.set_state({"scale": torch.full((3,), 3.0), "extra": torch.ones(5), "n": 8})
    assert dict(module.named_parameters())["compression.toy.scale"] is scale
    assert scale.requires_grad and torch.equal(scale, torch.full((3,), 3.0))


@pytest.mark.parametrize(
    "new, message",
    [
        ({"a": {"w": trainable(4)}}, r"compression\.toy\.a\.w: shape \(3,\) -> \(4,\)"),
        ({"a": {"w": torch.zeros(3, dtype=torch.float64, requires_grad=True)}}, r"compression\.toy\.a\.w: dtype"),
        ({"a": {}}, r"compression\.toy\.a\.w: the trainable tensor .* is gone"),
        ({"a": {"w": trainable(3)}, "b": trainable(2)}, r"compression\.toy\.b: not trainable -> trainable"),
    ],
    ids=["shape", "dtype", "gone", "buffer-to-parameter"],
)
def test_changes_that_detach_trainable_tensors_raise_naming_the_path(new, message):
    module = CompressedModule(nn.Linear(2, 2), toy("toy"))
    module.set_state({"a": {"w": trainable(3)}, "b": torch.ones(2)})
    before = dict(module.named_parameters()) | dict(module.named_buffers())
    with pytest.raises(StateError, match=message):
        module.set_state(new)
    after = dict(module.named_parameters()) | dict(module.named_buffers())
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in after)  # nothing changed


def test_chain_members_are_named_with_suffixes_for_repeats():
    method = chain(toy("quantization"), toy("rb_sparsity"), toy("quantization"))
    assert state_names(method, [(0, "weights", "conv1.weight", "scale"), (1, "logits", "0.weight"),
                                (2, "activations", "layer1.0/conv2d#0:in0", "scale")]) == [
        "quantization.weights.conv1.weight.scale",
        "rb_sparsity.logits.0.weight",
        "quantization_1.activations.layer1.0/conv2d#0:in0.scale",
    ]
    module = CompressedModule(nn.Linear(2, 2), method)
    state = ({"w": {"conv1.weight": trainable(1)}},
             {"training": torch.ones(1), "forward": trainable(1)},
             {"a": {"layer1.0/conv2d#0:in0": trainable(1)}})
    module.set_state(state)
    assert list(module.state_dict()) == [
        "model.weight", "model.bias",
        "compression.quantization.w.conv1.weight",
        "compression.rb_sparsity.forward",
        "compression.rb_sparsity.training",
        "compression.quantization_1.a.layer1.0/conv2d#0:in0",
    ]
    assert module.training is True  # a state name "training" does not shadow nn.Module's flag
    got = module.state
    assert got[1]["training"] is dict(module.named_buffers())["compression.rb_sparsity.training"]
    module(torch.zeros(1, 2))


def test_a_repeated_name_never_takes_another_members_name():
    method = chain(toy("q"), toy("q"), toy("q_1"))
    assert state_names(method, [(0, "x"), (1, "x"), (2, "x")]) == ["q.x", "q_2.x", "q_1.x"]


def test_single_method_is_named_by_the_method():
    assert state_names(toy("quantization"), [("weights", "fc.weight", "scale")]) == [
        "quantization.weights.fc.weight.scale"]
    module = CompressedModule(nn.Linear(2, 2), toy("quantization"))
    module.set_state({"weights": {"fc.weight": {"scale": trainable(())}}})
    assert "compression.quantization.weights.fc.weight.scale" in dict(module.named_parameters())


@pytest.mark.parametrize("state", [{"a.b": torch.ones(1), "a": {"b": torch.ones(1)}},
                                   {"a": torch.ones(1), "a.b": torch.ones(1)},
                                   {"a..b": torch.ones(1)}],
                         ids=["same-path", "tensor-and-container", "empty-segment"])
def test_path_collisions_raise(state):
    module = CompressedModule(nn.Linear(2, 2), toy("toy"))
    with pytest.raises(StateError, match="compression state"):
        module.set_state(state)
