"""Calibration modes (purecomp.calibration): what the model computes while observers record it.

``"train"`` (what InitContext's default ``"auto"`` picks for a model in train mode): BatchNorm
normalizes each batch with its own statistics, as a training step does, and the model is left exactly as it was (running statistics,
``num_batches_tracked``, train/eval flags, the global RNG). ``"eval"`` (``"auto"`` for a model in
eval mode): running statistics."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import purecomp as pc
from purecomp.calibration import CALIBRATION_MODES, run_observers
from purecomp.errors import CalibrationError

BN_OUT = "1/batch_norm#0:out0"
DROPOUT_OUT = "3/dropout#0:out0"
LINEAR_OUT = "6/linear#0:out0"
BN1D_OUT = "7/batch_norm#0:out0"


def model_and_data():
    """conv -> BN2d -> ReLU -> dropout -> pool -> linear -> BN1d; running statistics (fresh: mean 0,
    var 1) that do not describe the data (inputs shifted by 3 and scaled by 10)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Dropout(0.5),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 4), nn.BatchNorm1d(4))
    g = torch.Generator().manual_seed(1)
    data = [(3 + 10 * torch.randn(4, 1, 6, 6, generator=g), 0) for _ in range(3)]
    return model, data


def calibrate(model, data, mode=None, keys=(BN_OUT,), example=None):
    graph = pc.trace(model, (data[0][0][:2] if example is None else example,))
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    seen: dict[str, list] = {k: [] for k in keys}
    context = pc.InitContext.start(graph, params, data) if mode is None else \
        pc.InitContext.start(graph, params, data, calibration_mode=mode)
    rng = torch.get_rng_state()
    context.calibrate(list(keys), lambda key, x: seen[key].append(x.clone()), 12, "test")
    assert torch.equal(torch.get_rng_state(), rng)  # calibration draws nothing from the global stream
    return seen


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_the_default_follows_the_model_mode():
    """``"auto"``: a model in train mode (a fresh one) calibrates in train mode, one in eval mode
    (a trained model being evaluated) in eval mode; the context holds the resolved mode."""
    model, data = model_and_data()
    assert CALIBRATION_MODES == ("train", "eval")
    for training, expected in ((True, "train"), (False, "eval")):
        model.train(training)
        graph = pc.trace(model, (data[0][0][:2],))
        params = dict(model.named_parameters())
        assert pc.InitContext.start(graph, params, data).calibration_mode == expected
        assert pc.InitContext.start(graph, params, data, calibration_mode="auto").calibration_mode == expected
        for forced in CALIBRATION_MODES:
            assert pc.InitContext.start(graph, params, data, calibration_mode=forced).calibration_mode == forced


@pytest.mark.parametrize("training", [True, False])
def test_train_mode_normalizes_with_batch_statistics_and_changes_nothing(training):
    model, data = model_and_data()
    model.train(training)
    before = snapshot(model)
    flags = [m.training for m in model.modules()]
    seen = calibrate(model, data, "train", keys=(BN_OUT, DROPOUT_OUT))
    assert len(seen[BN_OUT]) == len(data)
    for x, (batch, _) in zip(seen[BN_OUT], data):
        conv = model[0](batch)
        expected = (conv - conv.mean((0, 2, 3), keepdim=True)) / torch.sqrt(
            conv.var((0, 2, 3), unbiased=False, keepdim=True) + model[1].eps)
        torch.testing.assert_close(x, expected, atol=1e-5, rtol=1e-5)
    # dropout is active, as in training: some activations are zeroed, the kept ones scaled by 2
    relu = [torch.relu(x) for x in seen[BN_OUT]]
    dropped = [(d == 0) & (r > 0) for d, r in zip(seen[DROPOUT_OUT], relu)]
    assert any(m.any() for m in dropped)
    for d, r, m in zip(seen[DROPOUT_OUT], relu, dropped):
        torch.testing.assert_close(d[~m], 2 * r[~m])
    # nothing of the model changed: buffers (running stats, num_batches_tracked), flags
    after = snapshot(model)
    for k, v in before.items():
        assert torch.equal(v, after[k]), k
    assert [m.training for m in model.modules()] == flags


def test_eval_mode_normalizes_with_running_statistics():
    model, data = model_and_data()
    before = snapshot(model)
    seen = calibrate(model, data, "eval", keys=(BN_OUT, DROPOUT_OUT))
    for x, (batch, _) in zip(seen[BN_OUT], data):
        expected = model[0](batch) / torch.sqrt(torch.tensor(1 + model[1].eps))  # mean 0, var 1
        torch.testing.assert_close(x, expected, atol=1e-4, rtol=1e-5)
    for d, x in zip(seen[DROPOUT_OUT], seen[BN_OUT]):
        torch.testing.assert_close(d, torch.relu(x))  # dropout off
    after = snapshot(model)
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert model.training  # restored


def test_train_mode_scales_differ_from_eval_on_fresh_running_statistics():
    """The failure the mode fixes: with fresh running statistics, eval-mode activations are on
    another scale (here ~30x) than the batch-normalized ones training computes."""
    model, data = model_and_data()
    train = torch.cat([x.flatten() for x in calibrate(model, data, "train")[BN_OUT]])
    evals = torch.cat([x.flatten() for x in calibrate(model, data, "eval")[BN_OUT]])
    assert train.std() == pytest.approx(1.0, abs=0.05)
    assert evals.abs().max() > 5 * train.abs().max()


def test_a_batch_of_one_uses_running_statistics_where_train_mode_cannot():
    model, data = model_and_data()
    single = [(x[:1], y) for x, y in data]
    with torch.no_grad():
        model[7].running_mean.fill_(0.5)
    before = snapshot(model)
    seen = calibrate(model, single, "train", keys=(LINEAR_OUT, BN1D_OUT), example=data[0][0])
    assert len(seen[BN1D_OUT]) == len(single)
    # BatchNorm1d saw one value per channel: it normalized with its running statistics
    for lin, x in zip(seen[LINEAR_OUT], seen[BN1D_OUT]):
        torch.testing.assert_close(x, (lin - 0.5) / torch.sqrt(torch.tensor(1 + model[7].eps)))
    assert all(torch.equal(v, snapshot(model)[k]) for k, v in before.items())
    assert model[7].training


def test_frozen_batchnorm_kept_in_eval_by_the_model_stays_in_eval():
    class Frozen(nn.Sequential):
        def train(self, mode: bool = True):
            super().train(mode)
            self[1].eval()  # a model that keeps its BatchNorm frozen in training
            return self

    torch.manual_seed(0)
    model = Frozen(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU())
    data = [(3 + 10 * torch.randn(4, 1, 6, 6), 0)]
    seen = calibrate(model, data, "train")
    expected = model[0](data[0][0]) / torch.sqrt(torch.tensor(1 + model[1].eps))
    torch.testing.assert_close(seen[BN_OUT][0], expected, atol=1e-4, rtol=1e-5)


def test_unknown_mode_is_refused():
    model, data = model_and_data()
    graph = pc.trace(model, (data[0][0][:2],))
    with pytest.raises(CalibrationError, match="calibration mode 'test'"):
        pc.InitContext.start(graph, dict(model.named_parameters()), data, calibration_mode="test")
    with pytest.raises(CalibrationError, match="calibration mode"):
        run_observers(model, dict(model.named_parameters()), dict, [BN_OUT], lambda k, x: None, data, 4,
                      "test", mode="training")


def test_per_call_mode_overrides_the_context():
    model, data = model_and_data()
    graph = pc.trace(model, (data[0][0][:2],))
    context = pc.InitContext.start(graph, dict(model.named_parameters()), data)
    seen = []
    context.calibrate([BN_OUT], lambda k, x: seen.append(x), 4, "test", mode="eval")
    expected = model[0](data[0][0]) / torch.sqrt(torch.tensor(1 + model[1].eps))
    torch.testing.assert_close(seen[0], expected, atol=1e-4, rtol=1e-5)


def _leaves(state) -> list[torch.Tensor]:
    return [t.detach().clone() for t in pc.trainable(state)]


def _differ(a: list, b: list) -> bool:
    return len(a) != len(b) or any(not torch.equal(x, y) for x, y in zip(a, b))


def test_init_and_the_front_door_pass_the_mode():
    model, data = model_and_data()
    graph = pc.trace(model, (data[0][0][:2],))
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    default = _leaves(pc.quantization().init(graph, params, data))
    by_mode = {m: _leaves(pc.quantization().init(graph, params, data, calibration_mode=m)) for m in CALIBRATION_MODES}
    assert not _differ(default, by_mode["train"])
    assert _differ(by_mode["train"], by_mode["eval"])

    config = {"input_info": {"sample_size": [2, 1, 6, 6]},
              "compression": {"algorithm": "quantization",
                              "initializer": {"batchnorm_adaptation": {"num_bn_adaptation_samples": 0}}}}
    front = {}
    for mode in CALIBRATION_MODES:
        ctrl, _ = pc.create_compressed_model(model_and_data()[0], config)
        ctrl.initialize(data, calibration_mode=mode)
        front[mode] = _leaves(ctrl.state)
    ctrl, _ = pc.create_compressed_model(model_and_data()[0], config)
    ctrl.initialize(data)  # the front door keeps eval mode unless asked (its samples' export checks assume it)
    assert not _differ(_leaves(ctrl.state), front["eval"])
    assert _differ(front["train"], front["eval"])
