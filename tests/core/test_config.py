"""Config -> Compression, and a specific error for every bad config."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import purecomp as pc
from purecomp.errors import ConfigError, InputInfoError, ScopeError


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    ).eval()


def quant(**section):
    return {"input_info": {"sample_size": [2, 1, 8, 8]}, "compression": {"algorithm": "quantization", **section}}


def test_config_file_builds_the_same_method_as_code(tmp_path):
    cfg = quant(weights={"mode": "symmetric", "bits": 4, "per_channel": True},
                activations={"mode": "asymmetric", "bits": 6},
                initializer={"range": {"type": "min_max", "num_init_samples": 4}})
    path = tmp_path / "int.json"
    path.write_text(json.dumps(cfg))
    config = pc.load_config(path)
    model = small_cnn()
    graph = config.trace(model)
    data = [torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    params = dict(model.named_parameters())
    from_file = config.method().init(graph, params, data)
    by_code = pc.quantization(weights=dict(bits=4, per_channel=True), activations=dict(mode="asymmetric", bits=6),
                              range_init=pc.RangeInit(type="min_max", num_init_samples=4)).init(graph, params, data)
    assert set(from_file.weights) == set(by_code.weights) and set(from_file.activations) == set(by_code.activations)
    for a, b in zip(pc.struct.tree_leaves(from_file), pc.struct.tree_leaves(by_code)):
        assert torch.equal(a, b)
    assert all(q.bits == 4 and q.axis == 0 for q in from_file.weights.values())
    assert all(q.bits == 6 and q.mode == "asymmetric" for q in from_file.activations.values())


@pytest.mark.parametrize(
    "config, path, message",
    [
        (quant(weights={"bitz": 8}), "compression.weights.bitz", "unknown key"),
        ({"compression": {"algorithm": "quantization"}, "epochs": "3"}, "epochs", "expected integer"),
        (quant(weights={"bits": "8"}), "compression.weights.bits", "expected integer"),
        (quant(weights={"bits": 9}), "compression.weights.bits", r"\[2, 8\]"),
        (quant(activations={"bits": 1}), "compression.activations.bits", r"\[2, 8\]"),
        (quant(weights={"mode": "asym"}), "compression.weights.mode", "expected one of"),
        ({"compression": {"algorithm": "magic"}}, "compression.algorithm", "unknown algorithm 'magic'"),
        ({"compression": [{"algorithm": "quantization"}, {"algorithm": "quantization", "ignored_scopes": 3}]},
         r"compression\[1\].ignored_scopes", "expected"),
        (quant(initializer={"range": {"type": "max"}}), "compression.initializer.range.type", "expected one of"),
        (quant(initializer={"range": {"num_init_samples": -1}}), "compression.initializer.range.num_init_samples", "expected a value"),
        (quant(initializer={"range": {"params": {"min_percentile": 90, "max_percentile": 10}}}),
         "compression.initializer.range.params", "min_percentile < max_percentile"),
        (quant(activations={"per_channel": True}), "compression.activations.per_channel", "not supported"),
        ({"input_info": {"sample_size": [1, "3"]}, "compression": {"algorithm": "quantization"}},
         r"input_info.sample_size\[1\]", "expected integer"),
        ({"compression": {}}, "compression", "algorithm"),
        ({"compression": {"algorithm": "quantization"}, "accuracy_aware_training": {}},
         "accuracy_aware_training", "not implemented"),
    ],
)
def test_bad_configs_raise_with_their_json_path(config, path, message):
    with pytest.raises(ConfigError, match=rf"^{path}.*{message}" if path else message):
        pc.load_config(config)


def test_scope_that_matches_no_site_raises_with_its_path():
    model = small_cnn()
    config = pc.load_config(quant(ignored_scopes=["1", "layer9"]))
    graph = config.trace(model)
    with pytest.raises(ScopeError, match=r"compression.ignored_scopes\[1\]: 'layer9' matches no site"):
        config.method().init(graph, dict(model.named_parameters()), [torch.randn(2, 1, 8, 8)])
    config = pc.load_config({"compression": [{"algorithm": "quantization", "target_scopes": ["{re}conv[9"]}]})
    with pytest.raises(ScopeError, match=r"compression\[0\].target_scopes\[0\]: invalid regular expression"):
        config.method().init(graph, dict(model.named_parameters()), [torch.randn(2, 1, 8, 8)])


def test_input_info_that_does_not_fit_the_model_raises():
    config = pc.load_config({"input_info": {"sample_size": [2, 3, 8, 8]}, "compression": {"algorithm": "quantization"}})
    with pytest.raises(InputInfoError, match=r"input_info: the model cannot run on inputs of shape \[\(2, 3, 8, 8\)\]"):
        config.trace(small_cnn())
    config = pc.load_config({"compression": {"algorithm": "quantization"}})
    with pytest.raises(InputInfoError, match="input_info: missing"):
        config.trace(small_cnn())


def test_missing_or_broken_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        pc.load_config(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        pc.load_config(bad)


def test_precision_plan_must_name_quantizers_and_valid_bits():
    model = small_cnn()
    x = torch.randn(2, 1, 8, 8)
    graph = pc.trace(model, (x,))
    params = dict(model.named_parameters())
    state = pc.quantization(precision={"0.weight": 4, "input:0": 6}).init(graph, params, [x])
    assert state.weights["0.weight"].bits == 4 and state.weights["3.weight"].bits == 8
    assert state.activations["input:0"].bits == 6
    with pytest.raises(ConfigError, match="'nope' is not a quantizer"):
        pc.quantization(precision={"nope": 4}).init(graph, params, [x])
    with pytest.raises(ConfigError, match="bits"):
        pc.quantization(precision={"0.weight": 12})


def test_calibration_data_is_required_and_checked():
    model = small_cnn()
    x = torch.randn(2, 1, 8, 8)
    graph = pc.trace(model, (x,))
    with pytest.raises(pc.errors.CalibrationError, match="needs calibration data"):
        pc.quantization().init(graph, dict(model.named_parameters()), None)
    with pytest.raises(pc.errors.CalibrationError, match="yielded no batch"):
        pc.quantization().init(graph, dict(model.named_parameters()), [])
    with pytest.raises(pc.errors.CalibrationError, match="batch of type str"):
        pc.quantization().init(graph, dict(model.named_parameters()), ["abc"])
