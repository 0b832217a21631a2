"""NNCF-format configs (issue 19, item 2): what NNCF accepts loads, builds, trains and exports;
each translated key is honoured; keys purecomp cannot honour warn (no effect) or raise (they
would change results). The configs are written inline in NNCF's own spelling."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torchvision
from torch import nn

import purecomp as pc
from purecomp.compression import Progress
from purecomp.errors import ConfigError, NoEffectWarning, ScopeError
from purecomp.scopes import from_nncf_name, from_nncf_regex, key_matches

INPUT = {"sample_size": [2, 3, 32, 32]}
NNCF_ROOT = {  # keys NNCF's sample configs carry for their own scripts
    "model": "resnet18", "pretrained": False, "input_info": INPUT, "num_classes": 10, "batch_size": 2,
    "workers": 4, "epochs": 1, "multiprocessing_distributed": False, "weight_decay": 1e-4,
    "preprocessing": {"mean": [0.5, 0.5, 0.5]}, "model_params": {"width": 1}, "checkpoint_save_dir": "/tmp/x",
    "optimizer": {"type": "Adam", "base_lr": 1e-3, "schedule_type": "plateau"},
    "export_to_ir_via_onnx": True, "no_strip_on_export": True,
}


def resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=10)


def batches(n: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.rand(2, 3, 32, 32, generator=gen), torch.randint(0, 10, (2,), generator=gen)) for _ in range(n)]


def criterion(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out, y)


def eval_fn(model_apply, loader) -> float:
    with torch.no_grad():
        return -float(sum(criterion(model_apply(x), y) for x, y in loader))


def config(compression, **root):
    data = {**copy.deepcopy(NNCF_ROOT), **root}
    if compression is not None:
        data["compression"] = compression
    return data


def build(data, model=None):
    cfg = pc.register_default_init_args(pc.Config.from_dict(data), batches(), criterion, autoq_eval_fn=eval_fn)
    return pc.create_compressed_model(model or resnet(), cfg)


# ---------------------------------------------------------------- every family, end to end

NO_BN = {"batchnorm_adaptation": {"num_bn_adaptation_samples": 0}}
FAMILIES = {
    "quantization": {"algorithm": "quantization", "preset": "mixed", "initializer": {"range": {"num_init_samples": 4}},
                     "ignored_scopes": "{re}fc", "validate_scopes": True},
    "quantization_per_channel": {"algorithm": "quantization", "weights": {"mode": "symmetric", "per_channel": True},
                                 "activations": {"mode": "asymmetric"},
                                 "initializer": {"range": {"type": "mixed_min_max"}, **NO_BN}},
    "hawq": {"algorithm": "quantization", "initializer": {"precision": {
        "type": "hawq", "bits": [4, 8], "num_data_points": 4, "iter_number": 2, "tolerance": 1e-1,
        "compression_ratio": 1.5}, **NO_BN}},
    "autoq": {"algorithm": "quantization", "initializer": {"precision": {
        "type": "autoq", "bits": [4, 8], "iter_number": 2, "compression_ratio": 0.15, "eval_subset_ratio": 1.0,
        "warmup_iter_number": 1}, **NO_BN}},
    "manual": {"algorithm": "quantization", "initializer": {"precision": {"bitwidth_per_scope": [
        [4, "ResNet/Sequential[layer1]/BasicBlock[0]/NNCFConv2d[conv1]/conv2d_0|WEIGHT"],
        [4, "ResNet/ReLU[relu]/relu__0|OUTPUT"], [8, "/nncf_model_input_0|OUTPUT"]]}, **NO_BN}},
    "magnitude_sparsity": {"algorithm": "magnitude_sparsity", "sparsity_init": 0.1, "params": {
        "schedule": "polynomial", "sparsity_target": 0.5, "sparsity_target_epoch": 2, "sparsity_freeze_epoch": 3,
        "weight_importance": "abs", "sparsity_level_setting_mode": "global"}},
    "rb_sparsity": {"algorithm": "rb_sparsity", "sparsity_init": 0.05, "params": {
        "schedule": "multistep", "multistep_steps": [1], "multistep_sparsity_levels": [0.1, 0.3]}},
    "const_sparsity": {"algorithm": "const_sparsity", "ignored_scopes": ["ResNet/NNCFLinear[fc]"]},
    "filter_pruning": {"algorithm": "filter_pruning", "pruning_init": 0.1, "params": {
        "schedule": "exponential", "pruning_target": 0.4, "pruning_steps": 2, "filter_importance": "geometric_median",
        "all_weights": False, "prune_first_conv": False, "prune_downsample_convs": False}},
    "binarization": {"algorithm": "binarization", "mode": "xnor", "params": {
        "batch_multiplier": 1, "activations_quant_start_epoch": 0, "weights_quant_start_epoch": 0},
        "ignored_scopes": ["{re}ResNet/NNCFLinear\\[fc\\]/.*", "ResNet/NNCFConv2d[conv1]/conv2d_0"]},
    "stack": [{"algorithm": "rb_sparsity", "params": {"sparsity_target": 0.3, "sparsity_target_epoch": 1,
                                                      "sparsity_freeze_epoch": 2}},
              {"algorithm": "quantization", "initializer": {"range": {"num_init_samples": 4}}}],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_nncf_config_loads_builds_trains_and_exports(name, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoEffectWarning)
        ctrl, module = build(config(FAMILIES[name]))
    module.train()
    opt = torch.optim.SGD(module.parameters(), lr=1e-3)
    x, y = batches(1)[0]
    loss = criterion(module(x), y) + ctrl.loss()
    loss.backward()
    opt.step()
    ctrl.scheduler.step()
    ctrl.scheduler.epoch_step()
    assert torch.isfinite(loss)
    module.eval()
    path = ctrl.export_model(tmp_path / "model.onnx")
    assert path.exists() and path.stat().st_size > 0


# ---------------------------------------------------------------- the root object


def test_root_allows_extra_keys_and_no_compression():
    cfg = pc.Config.from_dict(config(None))  # NNCF's FP32 baseline configs have no compression section
    assert cfg.compression_config().algorithms == []
    assert cfg.compression_config().num_bn_adaptation_samples == 0
    ctrl, module = build(config(None))
    x = batches(1)[0][0]
    model = resnet().eval()
    module.eval()
    torch.testing.assert_close(module(x), model(x))


def test_root_keys_that_change_results_raise_and_the_others_warn():
    with pytest.raises(ConfigError, match="^accuracy_aware_training: .*not implemented"):
        pc.Config.from_dict(config({"algorithm": "quantization"}, accuracy_aware_training={"mode": "early_exit"}))
    with pytest.raises(ConfigError, match="^compression_lr_multiplier: "):
        pc.Config.from_dict(config({"algorithm": "quantization"}, compression_lr_multiplier=10))
    with pytest.warns(NoEffectWarning, match="disable_shape_matching.*no effect"):
        pc.Config.from_dict(config({"algorithm": "quantization"}, disable_shape_matching=True))


def test_bn_adaptation_runs_only_when_asked():
    """purecomp keeps BatchNorm adaptation off by default (NNCF: 2000 samples; docs/config.md)."""
    cc = pc.Config.from_dict(config({"algorithm": "magnitude_sparsity"})).compression_config()
    assert cc.num_bn_adaptation_samples == 0
    asked = {"algorithm": "quantization", "initializer": {"batchnorm_adaptation": {"num_bn_adaptation_samples": 64}}}
    assert pc.Config.from_dict(config(asked)).compression_config().num_bn_adaptation_samples == 64
    cc = pc.Config.from_dict(config({"algorithm": "quantization", "initializer": NO_BN})).compression_config()
    assert cc.num_bn_adaptation_samples == 0


# ---------------------------------------------------------------- scopes


@pytest.fixture(scope="module")
def graph():
    return pc.trace(resnet().eval(), (torch.rand(1, 3, 32, 32),))


def quantized_weights(section, graph):
    method = pc.config.load_config(config(section)).method()
    state = method.init(graph, dict(resnet().named_parameters()), [batches(1)[0][0]])
    return set(state.weights)


def test_re_patterns_search_like_nncf(graph):
    base = {"algorithm": "quantization", "initializer": {"range": {"num_init_samples": 2}}}
    everything = quantized_weights(base, graph)
    # "{re}conv1" matches part of a name (re.search); as one string, not a list (NNCF allows it)
    left = quantized_weights({**base, "ignored_scopes": "{re}conv1"}, graph)
    assert left == {w for w in everything if "conv1" not in w}
    assert "layer1.0.conv2.weight" in left and "layer1.0.conv1.weight" not in left and "conv1.weight" not in left


def test_nncf_internal_names_translate(graph):
    assert from_nncf_name("ResNet/Sequential[layer1]/BasicBlock[0]/NNCFConv2d[conv1]/conv2d_0") == \
        "layer1.0.conv1/conv2d#0"
    assert from_nncf_name("ResNet/ReLU[relu]/relu__0|OUTPUT") == "relu/relu#0:out0"
    assert from_nncf_name("ResNet/NNCFLinear[fc]/linear_0|WEIGHT") == "fc.weight"
    assert from_nncf_name("/nncf_model_input_0|OUTPUT") == "input:0"
    assert from_nncf_name("Inception3/__iadd___1") == "add#1"
    assert from_nncf_name("layer1.0.conv1") is None
    assert from_nncf_regex(r"ResNet/NNCFLinear\[fc\]/.*") == "^fc[./].*"
    assert key_matches("ResNet/NNCFLinear[fc]/linear_0|WEIGHT", "fc.weight")
    base = {"algorithm": "quantization", "initializer": {"range": {"num_init_samples": 2}}}
    left = quantized_weights({**base, "ignored_scopes": [
        "ResNet/Sequential[layer1]/BasicBlock[0]/NNCFConv2d[conv1]/conv2d_0", r"{re}ResNet/NNCFLinear\[fc\]/.*"]},
        graph)
    assert "layer1.0.conv1.weight" not in left and "fc.weight" not in left and "layer1.0.conv2.weight" in left


def test_untranslatable_name_names_the_nearest_sites(graph):
    with pytest.raises(ScopeError, match=r"ignored_scopes\[0\].*read as NNCF's name for 'layer9.0.conv1/conv2d#0'"
                                         r".*the nearest are \['layer\d.0.conv1/conv2d#0'"):
        quantized_weights({"algorithm": "quantization",
                           "ignored_scopes": ["ResNet/Sequential[layer9]/BasicBlock[0]/NNCFConv2d[conv1]/conv2d_0"]},
                          graph)


def test_validate_scopes_false_allows_patterns_that_match_nothing(graph):
    section = {"algorithm": "quantization", "initializer": {"range": {"num_init_samples": 2}},
               "ignored_scopes": ["nowhere", "{re}conv1"], "validate_scopes": False}
    left = quantized_weights(section, graph)
    assert "layer1.0.conv1.weight" not in left and "layer1.0.conv2.weight" in left
    with pytest.raises(ScopeError, match="nowhere"):
        quantized_weights({**section, "validate_scopes": True}, graph)


# ---------------------------------------------------------------- algorithm keys


def test_filter_importance_is_nncf_name_and_changes_which_filters_go(graph):
    params = dict(resnet().named_parameters())

    def masks(**p):
        section = {"algorithm": "filter_pruning", "params": {"schedule": "baseline", "pruning_target": 0.5, **p}}
        state = pc.config.load_config(config(section)).method().init(graph, params, [batches(1)[0][0]])
        return {k: v.clone() for k, v in state.masks.items()}

    l1, l1_alias, gm = masks(filter_importance="L1"), masks(weight_importance="L1"), \
        masks(filter_importance="geometric_median")
    assert l1.keys() == gm.keys() and all(torch.equal(l1[k], l1_alias[k]) for k in l1)
    assert any(not torch.equal(l1[k], gm[k]) for k in l1)
    with pytest.raises(ConfigError, match=r"params\.all_weights"):
        masks(all_weights=True)
    with pytest.raises(ConfigError, match=r"params\.filter_importance: given twice"):
        masks(filter_importance="L1", weight_importance="L2")


def test_polynomial_power_defaults_to_nncf_0_9():
    from purecomp.transforms.sparsity.from_config import schedule_from_config

    section = {"algorithm": "magnitude_sparsity", "params": {"sparsity_target": 0.5, "sparsity_target_epoch": 10,
                                                             "sparsity_freeze_epoch": 10}}
    schedule, _, _ = schedule_from_config(section, "")
    nncf = pc.schedules.polynomial(0.0, 0.5, 10, 0.9)
    old = pc.schedules.polynomial(0.0, 0.5, 10, 3.0)
    at = Progress(epoch=3)
    assert schedule(at) == pytest.approx(nncf(at)) and schedule(at) != pytest.approx(old(at))


def test_magnitude_keys_inside_params_are_honoured(graph):
    params = dict(resnet().named_parameters())

    def masks(section):
        state = pc.config.load_config(config(section)).method().init(graph, params, [batches(1)[0][0]])
        return state.masks

    base = {"algorithm": "magnitude_sparsity", "sparsity_init": 0.5}
    inside = masks({**base, "params": {"weight_importance": "abs", "sparsity_level_setting_mode": "local"}})
    alias = masks({**base, "weight_importance": "abs", "sparsity_level_setting_mode": "local"})
    default = masks(base)  # normed_abs, global
    assert all(torch.equal(inside[k], alias[k]) for k in inside)
    assert any(not torch.equal(inside[k], default[k]) for k in inside)
    with pytest.raises(ConfigError, match=r"params\.weight_importance: given twice"):
        masks({**base, "weight_importance": "abs", "params": {"weight_importance": "normed_abs"}})


def test_quantization_defaults_and_preset(graph):
    from purecomp.transforms.quantize.from_config import range_init_from_config

    assert range_init_from_config({"algorithm": "quantization"}, "").type == "mixed_min_max"
    method = pc.config.load_config(config({"algorithm": "quantization", "preset": "mixed"})).method()
    state = method.init(graph, dict(resnet().named_parameters()), [batches(1)[0][0]])
    assert {q.mode for q in state.activations.values()} == {"asymmetric"}
    assert {q.mode for q in state.weights.values()} == {"symmetric"}


def test_mixed_min_max_is_nncf_definition():
    from purecomp.transforms.quantize.range_init import RangeInit, TensorStatistics

    stats = TensorStatistics()
    stats.observe(torch.tensor([[-1.0, 2.0], [-3.0, 4.0]]))  # two samples
    stats.observe(torch.tensor([[0.0, 6.0], [-5.0, 0.0]]))
    init = RangeInit(type="mixed_min_max")
    low, high = stats.range(init, asymmetric=True)
    assert low.item() == pytest.approx((-1 - 3 + 0 - 5) / 4) and high.item() == pytest.approx((2 + 4 + 6 + 0) / 4)
    low, _ = stats.range(init, asymmetric=False)
    assert low.item() == -5.0


def test_precision_section_nncf_keys():
    from purecomp.transforms.mixed_precision.from_config import precision_from_config
    from purecomp.transforms.mixed_precision.hawq import Manual

    manual = precision_from_config({"bitwidth_per_scope": [[4, "layer1"]]}, "p.", None)  # no type: manual
    assert isinstance(manual, Manual)
    with pytest.warns(NoEffectWarning, match=r"p\.num_data_points.*type 'autoq' does not read it"):
        precision_from_config({"type": "autoq", "num_data_points": 10}, "p.", type("C", (), {"validate_only": True}))
    hawq = precision_from_config({"type": "hawq"}, "p.", type("C", (), {"criterion": criterion}))
    assert hawq.options.bitwidth_assignment_mode == "liberal"
    with pytest.raises(ConfigError, match=r"p\.traces_per_layer_path"):
        precision_from_config({"type": "hawq", "traces_per_layer_path": "t.pt"}, "p.", None)


@pytest.mark.parametrize("section, key", [
    ({"algorithm": "binarization", "params": {"batch_multiplier": 2}}, r"compression\.params\.batch_multiplier"),
    ({"algorithm": "quantization", "export_to_onnx_standard_ops": True}, r"compression\.export_to_onnx_standard_ops"),
    ({"algorithm": "quantization", "overflow_fix": "enable"}, r"compression\.overflow_fix"),
    ({"algorithm": "quantization", "params": {"activations_quant_start_epoch": 0, "weights_quant_start_epoch": 0,
                                             "base_lr": 1e-3}}, r"compression\.params\.base_lr"),
    ({"algorithm": "quantization", "initializer": {"precision": {"type": "hawq", "dump_init_precision_data": True}}},
     r"compression\.initializer\.precision\.dump_init_precision_data"),
    ({"algorithm": "filter_pruning", "params": {"legr_params": {"generations": 2}}}, r"compression\.params\.legr_params"),
])
def test_keys_without_effect_warn_naming_the_key(section, key):
    with pytest.warns(NoEffectWarning, match=rf"{key}: accepted for NNCF compatibility but has no effect"):
        pc.Config.from_dict(config(section))


@pytest.mark.parametrize("section, path", [
    ({"algorithm": "quantization", "scope_overrides": {"activations": {"{re}conv": {"bits": 4}}}},
     "compression.scope_overrides"),
    ({"algorithm": "quantization", "compression_lr_multiplier": 2}, "compression.compression_lr_multiplier"),
    ({"algorithm": "quantization", "params": {"activations_quant_start_epoch": 2}},
     "compression.params.activations_quant_start_epoch"),
    ({"algorithm": "quantization", "activations": {"ignored_scopes": ["x"]}}, "compression.activations.ignored_scopes"),
    ({"algorithm": "quantization", "initializer": {"range": [{"type": "min_max", "target_scopes": ["x"]}]}},
     "compression.initializer.range"),
    ({"algorithm": "filter_pruning", "params": {"interlayer_ranking_type": "learned_ranking"}},
     "compression.params.interlayer_ranking_type"),
    ({"algorithm": "rb_sparsity", "params": {"sparsity_level_setting_mode": "local"}},
     "compression.params.sparsity_level_setting_mode"),
])
def test_keys_that_change_results_raise(section, path):
    with pytest.raises(ConfigError) as info:
        pc.Config.from_dict(config(section))
    assert info.value.path == path
