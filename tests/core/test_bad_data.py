"""Bad data: every case gets a specific purecomp error or a documented, tested behaviour
(docs/reliability.md lists them and counts the cases).

NaN / inf in calibration batches, an empty loader, a loader of the wrong structure, inputs the
model refuses, constant and all-zero activations, an ``input_info`` that does not fit, a model
with nothing to compress, and QAT that diverges.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torchvision
from torch import nn

import purecomp as pc
from purecomp.errors import (
    CalibrationError,
    InputInfoError,
    NothingToCompressWarning,
    NumericalError,
)

INPUT = (2, 1, 8, 8)
QUANT = {"algorithm": "quantization", "initializer": {"range": {"num_init_samples": 4}}}
ADAPT = {"initializer": {"batchnorm_adaptation": {"num_bn_adaptation_samples": 4}}}  # these calibrate only here
SECTIONS = {
    "quantization": QUANT,
    "magnitude_sparsity": {"algorithm": "magnitude_sparsity", **ADAPT},
    "rb_sparsity": {"algorithm": "rb_sparsity", **ADAPT},
    "filter_pruning": {"algorithm": "filter_pruning", **ADAPT},
    "binarization": {"algorithm": "binarization"},
}


class Net(nn.Module):
    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x))) * self.scale
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean((2, 3)))


def compress(section, data, model=None, sample_size=INPUT):
    torch.manual_seed(0)
    config = pc.Config.from_dict({"input_info": {"sample_size": list(sample_size)}, "compression": section})
    ctrl, module = pc.create_compressed_model(model if model is not None else Net(), config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pc.errors.NoEffectWarning)
        ctrl.initialize(data)
    return ctrl, module


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def with_value(value: float) -> torch.Tensor:
    x = randn(*INPUT)
    x[1, 0, 3, 4] = value
    return x


# ----------------------------------------------------------------------------- NaN and inf


@pytest.mark.parametrize("name", sorted(SECTIONS))
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_nan_or_inf_in_calibration_data_raises_calibration_error(name, value):
    """Every method's init pass (range init, BN adaptation, binarization thresholds) refuses the
    batch, naming the pass, the batch and the input."""
    data = [(randn(*INPUT), torch.zeros(2, dtype=torch.long)), (with_value(value), torch.zeros(2, dtype=torch.long))]
    with pytest.raises(CalibrationError, match=r"calibration batch 1, input 0 holds 1 NaN or inf"):
        compress(SECTIONS[name], data)


def test_an_activation_that_overflows_inside_the_model_names_its_site():
    """Finite data, a model that overflows float32 after conv1: the error names the first site that
    saw inf (an activation quantizer's site), not just "the data"."""
    with pytest.raises(CalibrationError, match=r"site '.*' saw NaN or inf"):
        compress(QUANT, [randn(*INPUT)], model=Net(scale=1e38))


# ----------------------------------------------------------------------------- empty and malformed loaders


@pytest.mark.parametrize("name", ["quantization", "magnitude_sparsity", "binarization"])
def test_an_empty_loader_raises_calibration_error(name):
    with pytest.raises(CalibrationError, match="yielded no batch"):
        compress(SECTIONS[name], [])


def test_no_loader_at_all_raises_calibration_error():
    config = pc.Config.from_dict({"input_info": {"sample_size": list(INPUT)}, "compression": QUANT})
    ctrl, _ = pc.create_compressed_model(Net(), config)
    with pytest.raises(CalibrationError, match="needs a data loader"):
        ctrl.initialize()


@pytest.mark.parametrize("batch, match", [
    ("abc", "cannot take model inputs from a batch of type str"),
    (None, "batch of type NoneType"),
    (3.5, "batch of type float"),
    ({"y": randn(*INPUT)}, r"cannot run on a calibration batch \(y=Tensor\[2, 1, 8, 8\] float32\): TypeError"),
    (randn(2, 3, 8, 8), r"cannot run on a calibration batch \(Tensor\[2, 3, 8, 8\] float32\): RuntimeError"),
    (torch.ones(*INPUT, dtype=torch.long), r"\(Tensor\[2, 1, 8, 8\] int64\): RuntimeError"),
    ((randn(2, 1, 8),), r"\(Tensor\[2, 1, 8\] float32\)"),
], ids=["str", "none", "float", "wrong-keyword", "wrong-channels", "wrong-dtype", "wrong-rank"])
def test_a_loader_of_the_wrong_structure_raises_calibration_error(batch, match):
    with pytest.raises(CalibrationError, match=match):
        compress(QUANT, [batch])


# ----------------------------------------------------------------------------- collapsed ranges


@pytest.mark.parametrize("fill", [0.0, 3.0, -2.0], ids=["zeros", "constant", "negative-constant"])
@pytest.mark.parametrize("range_type", ["min_max", "mean_min_max", "threesigma", "percentile", "mixed_min_max"])
def test_constant_or_all_zero_activations_keep_a_valid_positive_scale(fill, range_type):
    """A range that collapses to one value keeps a positive, finite scale (or input range), the
    compressed model's output is finite, and a training step keeps it so."""
    section = {**QUANT, "activations": {"mode": "asymmetric"},
               "initializer": {"range": {"type": range_type, "num_init_samples": 4}}}
    x = torch.full(INPUT, fill)
    ctrl, module = compress(section, [x, x])
    for key, quantizer in ctrl.state.activations.items():
        width = quantizer.input_range if hasattr(quantizer, "input_range") else quantizer.scale
        assert bool(torch.isfinite(width).all()) and bool((width > 0).all()), (key, width)
    out = module(x)
    assert bool(torch.isfinite(out).all())
    loss = out.square().mean() + ctrl.loss()
    loss.backward()
    for p in module.parameters():
        assert p.grad is None or bool(torch.isfinite(p.grad).all())


def test_all_zero_weights_keep_a_valid_positive_weight_scale():
    model = Net()
    with torch.no_grad():
        model.conv2.weight.zero_()
    ctrl, module = compress(QUANT, [randn(*INPUT)], model=model)
    scale = ctrl.state.weights["conv2.weight"].scale
    assert bool(torch.isfinite(scale).all()) and bool((scale > 0).all())
    assert bool(torch.isfinite(module(randn(*INPUT))).all())


# ----------------------------------------------------------------------------- input_info


@pytest.mark.parametrize("sample_size", [(2, 3, 8, 8), (2, 1, 8), (2, 1, 2, 2, 2)], ids=["channels", "rank3", "rank5"])
def test_an_input_info_that_does_not_fit_raises_input_info_error(sample_size):
    with pytest.raises(InputInfoError, match=r"input_info: the model cannot run on inputs of shape"):
        compress(QUANT, [randn(*INPUT)], sample_size=sample_size)


# ----------------------------------------------------------------------------- nothing to compress


@pytest.mark.parametrize("name", ["quantization", "magnitude_sparsity", "rb_sparsity", "filter_pruning"])
def test_a_model_with_nothing_to_compress_warns_and_computes_the_same(name):
    """Documented behaviour: the wrapper builds, warns ``NothingToCompressWarning`` naming the
    methods, and computes what the model computes."""
    model = nn.Sequential(nn.ReLU(), nn.Flatten())
    x = randn(*INPUT)
    with pytest.warns(NothingToCompressWarning, match=name):
        _, module = compress(SECTIONS[name], [x], model=model)
    assert torch.equal(module(x), model(x))


def test_binarization_with_no_convolution_is_a_config_error():
    with pytest.raises(pc.errors.ConfigError, match="no conv2d is left to binarize"):
        compress(SECTIONS["binarization"], [randn(*INPUT)], model=nn.Sequential(nn.ReLU(), nn.Flatten()))


# ----------------------------------------------------------------------------- QAT that diverges


def qat(model, x, section, steps, make_bad):
    ctrl, module = compress(section, [x], model=model)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.01)
    for step in range(steps):
        if step % 2 == 0:
            ctrl.scheduler.epoch_step()
        ctrl.scheduler.step()
        out = module(make_bad(step, x))
        loss = out.square().mean() + ctrl.loss()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return ctrl


def test_qat_that_turns_ranges_into_nan_raises_numerical_error_at_the_next_step():
    bad = lambda step, x: with_value(math.nan) if step == 1 else x  # noqa: E731
    with pytest.raises(NumericalError, match=r"at step \d+, epoch \d+: state/weights/.*scale holds \d+ NaN or inf"):
        qat(Net(), randn(*INPUT), QUANT, 4, bad)


def test_nan_weights_under_sparsity_raise_numerical_error_at_the_epoch_step():
    """Magnitude sparsity has no trainable state leaf; the epoch step checks the weights."""
    bad = lambda step, x: with_value(math.inf) if step == 0 else x  # noqa: E731
    with pytest.raises(NumericalError, match=r"epoch 1: model/.* holds \d+ NaN or inf"):
        qat(Net(), randn(*INPUT), {"algorithm": "magnitude_sparsity"}, 4, bad)


def test_resnet18_qat_from_random_init_stays_finite_and_nan_is_caught():
    """torchvision resnet18 (weights=None) at 32x32: calibration with NaN names the batch; QAT on
    finite data keeps every scale finite and positive for a few steps."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    x = randn(4, 3, 32, 32)
    section = {**QUANT, "initializer": {"range": {"num_init_samples": 4}}}
    config = pc.Config.from_dict({"input_info": {"sample_size": [4, 3, 32, 32]}, "compression": section})
    bad = x.clone()
    bad[0, 0, 0, 0] = math.nan
    ctrl, module = pc.create_compressed_model(model, config)
    with pytest.raises(CalibrationError, match="calibration batch 0, input 0 holds 1 NaN"):
        ctrl.initialize([bad])
    ctrl.initialize([x])
    optimizer = torch.optim.SGD(module.parameters(), lr=0.01)
    y = torch.arange(4)
    for _ in range(3):
        ctrl.scheduler.step()
        loss = nn.functional.cross_entropy(module(x), y) + ctrl.loss()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for q in list(ctrl.state.weights.values()) + list(ctrl.state.activations.values()):
        width = q.input_range if hasattr(q, "input_range") else q.scale
        assert bool(torch.isfinite(width).all()) and bool((width > 0).all())
