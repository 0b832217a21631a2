"""Filter pruning: dependency groups, criteria against numpy, schedules, configs, and physical
removal that computes exactly what the masked model computes (PyTorch and onnxruntime)."""

from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import purecomp as pc
from purecomp import export, schedules
from purecomp.errors import ConfigError, ScopeError, StateError
from purecomp.transforms.prune import (
    FilterPruningState,
    channel_groups,
    class_importance,
    filter_importance,
    prune_order,
    removed_counts,
    select_pruned,
    total_flops,
)

from models import torchvision_model


def conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    )


class UNet(nn.Module):
    """Two-level UNet: ConvTranspose2d up on one level, bilinear interpolate + 1x1 conv on the other."""

    def __init__(self, classes: int = 2) -> None:
        super().__init__()
        self.enc1, self.enc2, self.bottom = (
            conv_block(3, 16),
            conv_block(16, 32),
            conv_block(32, 64),
        )
        self.pool = nn.MaxPool2d(2)
        self.up2 = nn.ConvTranspose2d(64, 32, 2, stride=2)
        self.dec2 = conv_block(64, 32)
        self.up1 = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False), nn.Conv2d(32, 16, 1)
        )
        self.dec1 = conv_block(32, 16)
        self.head = nn.Conv2d(16, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        b = self.bottom(self.pool(e2))
        d2 = self.dec2(torch.cat([self.up2(b), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        return self.head(d1)


def randomize_batchnorms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm affine parameters and running statistics (so removal errors show)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=gen) * 0.4 - 0.2)
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=gen) * 0.4 - 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return model


def _graph(model: nn.Module, x: torch.Tensor):
    return pc.trace(model, (x,))


# ------------------------------------------------------------------ criteria


def _numpy_importance(w: np.ndarray, criterion: str) -> np.ndarray:
    rows = w.reshape(w.shape[0], -1).astype(np.float64)
    if criterion == "L1":
        return np.abs(rows).sum(axis=1)
    if criterion == "L2":
        return np.sqrt((rows**2).sum(axis=1))
    n = rows.shape[0]
    return np.array([sum(np.linalg.norm(rows[i] - rows[j]) for j in range(n)) for i in range(n)])


@pytest.mark.parametrize("criterion", ["L1", "L2", "geometric_median"])
def test_filter_importance_matches_numpy(criterion):
    w = torch.randn(12, 5, 3, 3, generator=torch.Generator().manual_seed(3))
    ours = filter_importance(w, 0, criterion).double().numpy()
    np.testing.assert_allclose(ours, _numpy_importance(w.numpy(), criterion), rtol=1e-5)


def test_geometric_median_selection_matches_brute_force():
    """The filters pruned by FPGM are those with the smallest summed distance to all others."""
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 10, 3), nn.ReLU(), nn.Conv2d(10, 2, 1)
    ).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        w = model[2].weight
        w.copy_(torch.randn_like(w))
        w[3] = w[[0, 1, 2]].mean(0)  # filters near the geometric median
        w[7] = w[[4, 5, 6]].mean(0) * 0.9
    graph = _graph(model, torch.randn(1, 3, 9, 9))
    method = pc.filter_pruning(0.3, criterion="geometric_median", prune_first_conv=True)
    params = dict(model.named_parameters())
    state = method.init(graph, params)
    groups = state.groups
    g = next(i for i, grp in enumerate(groups.groups) if grp.layers == ("2.weight",))
    pruned_filters = sorted(groups.groups[g].classes[c].filters[0].start for c in state.pruned[g])
    rows = w.detach().numpy().reshape(10, -1).astype(np.float64)
    sums = np.array([sum(np.linalg.norm(rows[i] - rows[j]) for j in range(10)) for i in range(10)])
    # 30% of the 14 prunable channels (4 + 10): 4 classes; in layer 2 the smallest-sum filters go
    scores = class_importance(params, groups.groups[g].classes, "geometric_median").numpy()
    np.testing.assert_allclose(scores, sums / sums.mean(), rtol=1e-5)
    expected_order = list(np.argsort(sums))
    assert pruned_filters == sorted(expected_order[: len(pruned_filters)])
    assert len(pruned_filters) >= 1


def test_class_importance_averages_layer_normalized_filters():
    """A residual class's importance is the mean of its producers' normalized importances."""
    model, x = torchvision_model("resnet18")
    graph = _graph(model, x)
    groups = channel_groups(graph, prune_downsample_convs=True, prune_first_conv=True)
    params = dict(model.named_parameters())
    stage = next(g for g in groups.groups if "layer2.0.downsample.0.weight" in g.layers)
    assert set(stage.layers) == {
        "layer2.0.conv2.weight",
        "layer2.0.downsample.0.weight",
        "layer2.1.conv2.weight",
    }
    scores = class_importance(params, stage.classes, "L1")
    norms = {name: filter_importance(params[name], 0, "L1") for name in stage.layers}
    c = 5
    expected = np.mean([float(norms[n][c] / norms[n].mean()) for n in stage.layers])
    assert float(scores[c]) == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------ groups


def test_resnet18_groups_tie_residual_stages_and_skip_first_and_downsample_convs():
    model, x = torchvision_model("resnet18")
    groups = channel_groups(_graph(model, x))
    prunable = [groups.groups[i].layers for i in groups.prunable]
    assert prunable == [
        ("layer1.0.conv1.weight",),
        ("layer1.1.conv1.weight",),
        ("layer2.1.conv1.weight",),
        ("layer3.1.conv1.weight",),
        ("layer4.1.conv1.weight",),
    ]
    reasons = dict(groups.unsafe())
    assert any(
        "first conv" in r
        for r in reasons[("conv1.weight", "layer1.0.conv2.weight", "layer1.1.conv2.weight")]
    )
    assert any("downsampling" in r for r in reasons[("layer2.0.conv1.weight",)])
    assert any("model output" in r for r in reasons[("fc.weight",)])
    everything = channel_groups(
        _graph(model, x), prune_first_conv=True, prune_downsample_convs=True
    )
    assert len(everything.prunable) == len(everything.groups) - 1  # only the classifier stays


class _Mixer(nn.Module):
    """Ops that make channels unsafe: a channel split, a softmax over channels, an SE gate."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = (
            nn.Conv2d(3, 8, 3, padding=1),
            nn.Conv2d(3, 8, 3, padding=1),
            nn.Conv2d(8, 8, 1),
        )
        self.se, self.d = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)
        self.e, self.head = nn.Conv2d(8, 6, 1), nn.Linear(6 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.a(x))
        left, right = a.chunk(2, dim=1)  # unknown op: a's channels are unsafe
        b = torch.softmax(self.b(x), dim=1)  # softmax over channels: unsafe
        c = self.c(torch.cat([left, right], 1) + b)
        gate = torch.sigmoid(self.se(c.mean((2, 3), keepdim=True)))  # SE gate: mean over space
        d = self.d(c * gate)
        e = torch.nn.functional.adaptive_avg_pool2d(self.e(d), 2)
        return self.head(e.flatten(1))


def test_unknown_ops_make_channels_unsafe_and_gates_stay_safe():
    model = _Mixer().eval()
    groups = channel_groups(_graph(model, torch.randn(2, 3, 8, 8)), prune_first_conv=True)
    status = {g.layers: (g.prunable, g.reasons) for g in groups.groups}
    assert not status[("a.weight",)][0] and "chunk" in status[("a.weight",)][1][0]
    assert not status[("b.weight",)][0]
    assert status[("c.weight", "se.weight")][
        0
    ]  # the SE gate's conv is tied to the channels it scales
    assert status[("d.weight",)][0]
    assert status[("e.weight",)][0]  # flatten -> linear: column blocks
    e_group = next(g for g in groups.groups if g.layers == ("e.weight",))
    consumer = [s for s in e_group.classes[2].slots if s.role == "consumer"]
    assert [(s.param, s.axis, s.start, s.stop) for s in consumer] == [("head.weight", 1, 8, 12)]


def test_a_channel_that_is_not_zero_at_its_consumer_is_unsafe():
    class AddConst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.sigmoid(self.a(x)))  # sigmoid(0) = 0.5 reaches b

    groups = channel_groups(
        _graph(AddConst().eval(), torch.randn(1, 3, 4, 4)), prune_first_conv=True
    )
    a = next(g for g in groups.groups if g.layers == ("a.weight",))
    assert not a.prunable and "not provably zero" in a.reasons[0]


def test_results_that_no_op_reads_count_as_outputs():
    """HuggingFace returns a ModelOutput (its tensors are model outputs): they stay unpruned;
    attention projections are reshaped into heads (unsafe), the feed-forward blocks are pruned."""
    from models import tiny_bert

    model, ids, mask = tiny_bert()
    groups = channel_groups(pc.trace(model, (ids, mask)))
    prunable = [groups.groups[i].layers for i in groups.prunable]
    assert prunable == [
        ("encoder.layer.0.intermediate.dense.weight",),
        ("encoder.layer.1.intermediate.dense.weight",),
    ]
    pooler = dict(groups.unsafe())[("pooler.dense.weight",)]
    assert any("model output" in r or "read by no op" in r for r in pooler)
    method = pc.filter_pruning(
        0.5
    )  # the feed-forward blocks (linear -> gelu -> linear) shrink exactly
    graph = pc.trace(model, (ids, mask))
    params = dict(model.named_parameters())
    state = method.init(graph, params)
    masked = pc.apply(model, method, params, state, ids, mask)
    small = export.materialize(model, method, params, state, graph)
    out = small(ids, mask)
    assert small.model.encoder.layer[0].intermediate.dense.out_features < 64
    for key in ("last_hidden_state", "pooler_output"):
        assert torch.allclose(out[key], masked[key], atol=1e-5)


def test_a_mean_over_channels_is_unsafe():
    class ChannelMean(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.a(x)
            return self.b(y - y.mean(1, keepdim=True))

    groups = channel_groups(
        _graph(ChannelMean().eval(), torch.randn(1, 3, 5, 5)), prune_first_conv=True
    )
    a = next(g for g in groups.groups if g.layers == ("a.weight",))
    assert not a.prunable and "reduces over channels" in a.reasons[0]


def test_scopes_exclude_producers_and_unknown_scopes_raise():
    model, x = torchvision_model("resnet18")
    graph = _graph(model, x)
    groups = channel_groups(graph, ignored_scopes=["layer1"])
    assert [groups.groups[i].layers[0] for i in groups.prunable][0] == "layer2.1.conv1.weight"
    with pytest.raises(ScopeError, match=r"ignored_scopes\[0\]"):
        channel_groups(graph, ignored_scopes=["nothing_here"])


# ------------------------------------------------------------------ method and schedules


def test_level_is_met_over_prunable_channels_keeping_one_per_group():
    model, x = torchvision_model("mobilenet_v2")
    graph = _graph(model, x)
    params = dict(model.named_parameters())
    groups = channel_groups(graph)
    total = sum(len(groups.groups[g].classes) for g in groups.prunable)
    for level in (0.3, 0.5, 0.999):  # at 0.999 the one-channel-per-group floor binds
        pruned = select_pruned(groups, params, level, "L2")
        removed = sum(len(p) for p in pruned)
        for g in groups.prunable:
            assert len(pruned[g]) < len(groups.groups[g].classes)
        assert removed == min(round(level * total), total - len(groups.prunable))
    assert round(0.999 * total) > total - len(groups.prunable)


def test_masks_zero_filters_biases_and_batchnorms_and_step_needs_params():
    model = randomize_batchnorms(UNet().eval())
    x = torch.randn(1, 3, 16, 16)
    graph = _graph(model, x)
    method = pc.filter_pruning(
        schedules.pruning_exponential(0.1, 0.5, num_init_steps=1, pruning_steps=3)
    )
    params = dict(model.named_parameters())
    state = method.init(graph, params)
    assert (
        isinstance(state, FilterPruningState) and state.level == 0.0 and not state.pruned_classes()
    )
    with pytest.raises(StateError, match="pass the current weights"):
        method.step(state, pc.Progress(epoch=1))
    state = method.step(state, pc.Progress(epoch=1), params)
    assert state.level == pytest.approx(0.1)
    state = method.step(state, pc.Progress(epoch=3), params)
    assert state.level == pytest.approx(0.5)
    out = method.params(params, state)
    g, c = state.pruned_classes()[0]
    for slot in state.groups.groups[g].classes[c].slots:
        if slot.role == "stat":  # running statistics are buffers, not parameters
            continue
        zeroed = out[slot.param].narrow(slot.axis, slot.start, slot.stop - slot.start)
        if slot.role in ("filter", "bias", "member", "norm"):
            assert not zeroed.any(), slot
        else:
            assert zeroed.any(), slot  # consumer inputs are kept while training
    keep_bn = pc.filter_pruning(0.5, prune_batch_norms=False).init(graph, params)
    assert "enc2.1.weight" in state.masks and "enc2.1.weight" not in keep_bn.masks


def test_pruning_schedules():
    p = lambda e: pc.Progress(epoch=e)  # noqa: E731
    base = schedules.pruning_baseline(0.4, num_init_steps=2)
    assert [base(p(e)) for e in range(4)] == [0.0, 0.0, 0.4, 0.4]
    expo = schedules.pruning_exponential(0.2, 0.6, num_init_steps=1, pruning_steps=5)
    levels = [expo(p(e)) for e in range(8)]
    assert levels[0] == 0.0 and levels[1] == pytest.approx(0.2) and levels[5] == pytest.approx(0.6)
    assert all(a <= b + 1e-12 for a, b in zip(levels[1:], levels[2:]))
    density = [1 - v for v in levels[1:6]]  # constant ratio: exponential decay of the density
    ratios = [b / a for a, b in zip(density, density[1:])]
    assert max(ratios) == pytest.approx(min(ratios))
    for init in (0.0, 0.2):
        a, b, k = schedules.exponential_with_bias_coefficients(init, 0.5, 16)
        assert a + b == pytest.approx(init)
        assert a * math.exp(-k * 16) + b == pytest.approx(0.5)
        assert a * math.exp(-k * 2) + b == pytest.approx(0.375)
    # init above 5/7 target (NNCF accepts it): NNCF's curvature, still from init to target, rising
    a, b, k = schedules.exponential_with_bias_coefficients(0.45, 0.5, 16)
    y = math.exp(k * 2)
    assert y / 3 + y**-7 == pytest.approx(4 / 3) and y > 1.2
    high = schedules.pruning_exponential_with_bias(0.45, 0.5, pruning_steps=16)
    levels = [high(p(e)) for e in range(20)]
    assert levels[0] == pytest.approx(0.45) and levels[16] == pytest.approx(0.5) and levels[19] == 0.5
    assert all(x <= y + 1e-12 for x, y in zip(levels, levels[1:]))


@pytest.mark.parametrize(
    "section, path, message",
    [
        ({"params": {"pruning_target": 1.0}}, r"compression.params.pruning_target", ""),
        (
            {"pruning_init": 0.6, "params": {"pruning_target": 0.5}},
            r"compression.pruning_init",
            "<= pruning_target",
        ),
        ({"params": {"schedule": "cosine"}}, r"compression.params.schedule", "expected one of"),
        (
            {"params": {"weight_importance": "L3"}},
            r"compression.params.weight_importance",
            "expected one of",
        ),
        (
            {"params": {"pruning_flops_target": 0.3, "pruning_target": 0.3}},
            r"compression.params.pruning_flops_target",
            "not both",
        ),
        ({"params": {"pruning_flops_target": 1.5}}, r"compression.params.pruning_flops_target", ""),
        (
            {"params": {"interlayer_ranking_type": "learned_ranking"}},
            r"compression.params.interlayer_ranking_type",
            "not implemented",
        ),
        ({"params": {"pruning_steps": 0}}, r"compression.params.pruning_steps", ""),
        ({"params": {"warmup": 3}}, r"compression.params.warmup", "unknown key"),
        ({"prune_first_conv": True}, r"compression.prune_first_conv", "unknown key"),
    ],
)
def test_bad_pruning_configs_raise(section, path, message):
    with pytest.raises(ConfigError, match=rf"^{path}.*{message}"):
        pc.load_config({"compression": {"algorithm": "filter_pruning", **section}})


def test_config_builds_the_method():
    config = pc.load_config(
        {
            "compression": {
                "algorithm": "filter_pruning",
                "pruning_init": 0.1,
                "params": {
                    "schedule": "exponential_with_bias",
                    "pruning_target": 0.4,
                    "num_init_steps": 1,
                    "pruning_steps": 4,
                    "weight_importance": "geometric_median",
                    "prune_first_conv": True,
                    "prune_downsample_convs": True,
                    "prune_batch_norms": True,
                    "interlayer_ranking_type": "unweighted_ranking",
                },
                "ignored_scopes": ["layer4"],
            }
        }
    )
    model, x = torchvision_model("resnet18")
    graph = _graph(model, x)
    method = config.method()
    params = dict(model.named_parameters())
    state = method.init(graph, params)
    assert state.level == 0.0
    state = method.step(state, pc.Progress(epoch=5), params)
    assert state.level == pytest.approx(0.4)
    layers = {layer for g in state.groups.prunable for layer in state.groups.groups[g].layers}
    assert "conv1.weight" in layers and not any(name.startswith("layer4") for name in layers)
    assert method.step(state, pc.Progress(epoch=6), params).frozen
    table = pc.statistics(graph, state)["pruning"]
    assert (
        table.rows[-1]["pruned"]
        == len(state.pruned_classes())
        == round(0.4 * table.rows[-1]["channels"])
    )


def test_flops_target_removes_at_least_that_fraction_of_flops():
    model, x = torchvision_model("resnet18")
    x = x[:1]
    graph = _graph(model, x)
    config = pc.load_config(
        {
            "compression": {
                "algorithm": "filter_pruning",
                "params": {"schedule": "baseline", "pruning_flops_target": 0.3},
            }
        }
    )
    method = config.method()
    params = dict(model.named_parameters())
    state = method.init(graph, params)
    small = export.materialize(model, method, params, state, graph=graph)
    before, after = pc.model_cost(model, x)["flops"], pc.model_cost(small, x)["flops"]
    assert total_flops(state.costs, {}) == before  # the analytic count is FlopCounterMode's
    assert total_flops(state.costs, removed_counts(state.groups, state.pruned_classes())) == after
    assert after <= 0.7 * before
    order = prune_order(state.groups, params, "L2")
    k = len(state.pruned_classes())
    assert sorted(order[:k]) == sorted(state.pruned_classes())
    assert total_flops(state.costs, removed_counts(state.groups, order[: k - 1])) > 0.7 * before


# ------------------------------------------------------------------ physical removal


def _check_removal(
    model: nn.Module, x: torch.Tensor, level: float, tmp_path, onnx: bool = True, **options
) -> dict:
    graph = _graph(model, x)
    method = pc.filter_pruning(level, criterion="geometric_median", **options)
    params = dict(model.named_parameters())
    state = method.init(graph, params)
    assert state.pruned_classes()
    masked = pc.apply(model, method, params, state, x).detach()
    small = export.materialize(model, method, params, state, graph=graph)
    out = small(x)
    scale = masked.abs().max().clamp(min=1e-6)
    assert float((out - masked).abs().max() / scale) < 1e-4
    cost = pc.pruning_cost(model, small, x)
    params_row, flops_row = cost.rows
    assert params_row["after"] < params_row["before"] and flops_row["after"] < flops_row["before"]
    removed = sum(len(p) for p in state.pruned)
    total = sum(len(state.groups.groups[g].classes) for g in state.groups.prunable)
    assert removed == round(level * total)
    if onnx:
        path = export.to_onnx(model, method, params, state, (x,), tmp_path / "pruned.onnx")
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        assert float(np.abs(got - masked.numpy()).max() / scale) < 1e-4
    return {"params": params_row["ratio"], "flops": flops_row["ratio"]}


def test_unet_channels_are_removed_exactly(tmp_path):
    model = randomize_batchnorms(UNet().eval())
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for level in (0.3, 0.5):
        ratios = _check_removal(model, x, level, tmp_path)
        assert ratios["params"] < 1 - level  # conv weights lose inputs and outputs
    groups = channel_groups(_graph(model, x))
    assert groups.groups[
        [g.layers for g in groups.groups].index(("up2.weight",))
    ].prunable  # transposed conv


class _VggMlp(nn.Module):
    """conv -> BN -> ReLU -> view(N, -1) -> Linear -> BatchNorm1d -> ReLU -> Linear: column blocks of 9."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0, self.conv = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 12, 3, padding=1)
        self.bn = nn.BatchNorm2d(12)
        self.fc1, self.bn1, self.fc2 = nn.Linear(12 * 9, 20), nn.BatchNorm1d(20), nn.Linear(20, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(torch.relu(self.conv0(x)))))
        x = nn.functional.max_pool2d(x, 2).view(x.shape[0], -1)
        return self.fc2(torch.relu(self.bn1(self.fc1(x))))


def test_flatten_into_linear_and_linear_layers_are_removed_exactly(tmp_path):
    model = randomize_batchnorms(_VggMlp().eval())
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    _check_removal(model, x, 0.5, tmp_path)
    graph = _graph(model, x)
    state = pc.filter_pruning(0.5).init(graph, dict(model.named_parameters()))
    small = export.materialize(
        model, pc.filter_pruning(0.5), dict(model.named_parameters()), state, graph
    )
    kept_conv = small.model.conv.out_channels
    assert small.model.fc1.in_features == kept_conv * 9  # (bn1 is folded into fc1 by materialize)
    assert small.model.fc2.in_features == small.model.fc1.out_features
    assert small.model.fc1.out_features < 20 and kept_conv < 12


_SMALL_MODELS = {"unet": (UNet, (1, 3, 16, 16)), "vgg_mlp": (_VggMlp, (2, 3, 6, 6))}


@settings(max_examples=12, deadline=None)
@given(
    name=st.sampled_from(sorted(_SMALL_MODELS)),
    level=st.floats(0.0, 0.98),
    criterion=st.sampled_from(["L1", "L2", "geometric_median"]),
    seed=st.integers(0, 2**16),
    flags=st.tuples(st.booleans(), st.booleans(), st.booleans()),
)
def test_removal_equals_masking_at_any_level(name, level, criterion, seed, flags):
    torch.manual_seed(seed)
    build, shape = _SMALL_MODELS[name]
    model = randomize_batchnorms(build().eval(), seed)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    graph = _graph(model, x)
    method = pc.filter_pruning(
        level,
        criterion=criterion,
        prune_first_conv=flags[0],
        prune_downsample_convs=flags[1],
        prune_batch_norms=flags[2],
    )
    params = dict(model.named_parameters())
    state = method.init(graph, params)
    masked = pc.apply(model, method, params, state, x).detach()
    out = export.materialize(model, method, params, state, graph=graph)(x)
    assert float((out - masked).abs().max()) <= 1e-4 * float(masked.abs().max()) + 1e-6


def test_pruning_chains_with_per_channel_int8():
    torch.manual_seed(0)
    model = randomize_batchnorms(
        nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 4, 1),
        ).eval()
    )
    x = torch.randn(2, 3, 8, 8)
    graph = _graph(model, x)
    method = pc.chain(pc.filter_pruning(0.5), pc.quantization(weights=dict(per_channel=True)))
    params = dict(model.named_parameters())
    state = method.init(graph, params, [x])
    masked = pc.apply(model, method, params, state, x).detach()
    small = export.materialize(model, method, params, state, graph=graph)
    assert small.model[3].weight.shape[0] == 8 and small.model[6].weight.shape[1] == 8
    step = masked.abs().max() / 127
    assert float((small(x) - masked).abs().max()) <= float(4 * step)


@pytest.mark.slow
def test_resnet18_stages_are_removed_exactly_with_first_and_downsample_convs(tmp_path):
    model, x = torchvision_model("resnet18")
    randomize_batchnorms(model)
    graph = _graph(model, x)
    method = pc.filter_pruning(0.5, prune_first_conv=True, prune_downsample_convs=True)
    params = dict(model.named_parameters())
    state = method.init(graph, params)
    masked = pc.apply(model, method, params, state, x).detach()
    small = export.materialize(model, method, params, state, graph=graph)
    assert float((small(x) - masked).abs().max() / masked.abs().max()) < 1e-4
    assert (
        small.model.conv1.out_channels < 64
        and small.model.layer2[0].downsample[0].out_channels < 128
    )
    assert (
        small.model.layer1[1].conv2.out_channels == small.model.conv1.out_channels
    )  # the stage stays tied


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["resnet18", "resnet50", "mobilenet_v2", "densenet121", "mobilenet_v3_small"]
)
def test_torchvision_models_shrink_exactly(name, tmp_path):
    if name == "densenet121":
        torch.manual_seed(0)
        model = torchvision.models.densenet121(weights=None, num_classes=10).eval()
        x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    else:
        model, x = torchvision_model(name)
    randomize_batchnorms(model)
    for level in (0.3, 0.5):
        ratios = _check_removal(
            model,
            x,
            level,
            tmp_path,
            onnx=name in ("resnet18", "mobilenet_v2", "mobilenet_v3_small"),
        )
        assert ratios["params"] < 1 and ratios["flops"] < 1


# ------------------------------------------------------------------ statistics per group


def _overlap(
    state: FilterPruningState, shapes: dict[str, tuple[int, ...]], costs
) -> tuple[int, int]:
    """Parameters and FLOPs that two groups both remove: a weight that loses ``r_out`` filters to
    one group and ``r_in`` input channels to another shares ``r_out * r_in`` slices."""
    removed = removed_counts(state.groups, state.pruned_classes())
    params = sum(
        removed.get((n, 0), 0) * removed.get((n, 1), 0) * math.prod(s[2:])
        for n, s in shapes.items()
        if len(s) >= 2
    )
    flops = sum(
        c.unit * removed.get((c.param, c.out_axis), 0) * removed.get((c.param, c.in_axis), 0)
        for c in costs
    )
    return params, int(flops)


@pytest.mark.slow
@pytest.mark.parametrize(
    "everything", [False, True], ids=["defaults", "first_and_downsample_convs"]
)
def test_group_statistics_match_flop_counter_and_the_materialized_model(everything):
    """Each group's row is what removing only its channels saves, measured on a materialized
    model with FlopCounterMode; the (all) row is the fully pruned model; per-group savings add
    up to the total, except the slices of a weight that two groups cut (counted in both)."""
    from purecomp.struct import replace
    from purecomp.transforms.prune import layer_costs

    model, x = torchvision_model("resnet18")
    x = x[:1]
    graph = _graph(model, x)
    method = pc.filter_pruning(0.5, prune_first_conv=everything, prune_downsample_convs=everything)
    params = dict(model.named_parameters())
    state = method.init(graph, params)
    *rows, total = pc.statistics(graph, state)["pruning"].rows
    assert len(rows) == len(state.groups.prunable) and total["group"] == "(all)"
    base = pc.model_cost(model, x)
    small = pc.model_cost(
        export.materialize(model, method, params, state), x
    )  # no graph: no BN folding
    assert (total["params before"], total["params after"]) == (base["params"], small["params"])
    assert (total["FLOPs before"], total["FLOPs after"]) == (base["flops"], small["flops"])
    for row in rows:
        g = row["group"]
        only = replace(state, pruned=tuple(p if i == g else () for i, p in enumerate(state.pruned)))
        one = pc.model_cost(export.materialize(model, method, params, only), x)
        assert row["pruned"] == len(state.pruned[g]) > 0
        assert row["params before"] - row["params after"] == base["params"] - one["params"] > 0
        assert row["FLOPs before"] - row["FLOPs after"] == base["flops"] - one["flops"] > 0
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    shared_params, shared_flops = _overlap(state, shapes, layer_costs(graph))
    assert (shared_params > 0) == everything
    saved_params = sum(r["params before"] - r["params after"] for r in rows)
    saved_flops = sum(r["FLOPs before"] - r["FLOPs after"] for r in rows)
    assert saved_params - shared_params == base["params"] - small["params"]
    assert saved_flops - shared_flops == base["flops"] - small["flops"]
    assert "FLOPs after" in str(pc.statistics(graph, state))


# ------------------------------------------------------------------ prune_batch_norms=False


def _batchnorm_constants_case(model: nn.Module, x: torch.Tensor, level: float, **options):
    """Masked output, materialized model and state with batch norms left unmasked."""
    graph = _graph(model, x)
    method = pc.filter_pruning(level, prune_batch_norms=False, **options)
    params = dict(model.named_parameters())
    state = method.init(graph, params)
    masked = pc.apply(model, method, params, state, x).detach()
    return masked, export.materialize(model, method, params, state, graph=graph), state


@pytest.mark.slow
@pytest.mark.parametrize(
    "everything", [False, True], ids=["defaults", "first_and_downsample_convs"]
)
def test_unmasked_batchnorm_constants_are_folded_on_resnet18(everything, tmp_path):
    """Pruned channels carry beta - mu gamma / sigma through ReLU into 3x3 zero-padded convs (and
    the residual stages); the export folds it (ones channel) and equals the masked model."""
    from purecomp.export.prune_constants import OnesChannelConv2d, carries_constants

    model, x = torchvision_model("resnet18")
    randomize_batchnorms(model)
    masked, small, state = _batchnorm_constants_case(
        model, x, 0.5, prune_first_conv=everything, prune_downsample_convs=everything
    )
    assert carries_constants(state) and not state.masks.keys() & {
        "layer1.0.bn1.weight",
        "layer1.0.bn1.bias",
    }
    assert isinstance(small.model.layer1[0].conv2, OnesChannelConv2d)
    assert small.model.layer1[0].conv2.in_channels == small.model.layer1[0].conv1.out_channels + 1
    assert float((small(x) - masked).abs().max() / masked.abs().max()) < 1e-4
    dropped = export.materialize(
        model,
        pc.filter_pruning(0.5, prune_batch_norms=False),
        dict(model.named_parameters()),
        replace_masks_only(state),
    )
    assert (
        float((dropped(x) - masked).abs().max() / masked.abs().max()) > 1e-3
    )  # the constants matter
    if everything:
        path = export.to_onnx(
            model,
            pc.filter_pruning(
                0.5, prune_batch_norms=False, prune_first_conv=True, prune_downsample_convs=True
            ),
            dict(model.named_parameters()),
            state,
            (x,),
            tmp_path / "resnet18_bn_constants.onnx",
        )
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        assert float(np.abs(got - masked.numpy()).max() / masked.abs().max()) < 1e-4


def replace_masks_only(state: FilterPruningState) -> FilterPruningState:
    """The same pruned channels, but a state that claims batch norms were zeroed (so export removes
    the channels without folding their constants): the wrong export, for contrast."""
    from purecomp.struct import replace

    return replace(state, prune_batch_norms=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobilenet_v2", "unet", "vgg_mlp"])
def test_unmasked_batchnorm_constants_are_folded(name, tmp_path):
    """Depthwise convs (masked rows stop the constant), ConvTranspose and bilinear upsampling
    (UNet), flatten -> linear column blocks and BatchNorm1d before a linear (bias fold)."""
    if name == "mobilenet_v2":
        model, x = torchvision_model(name)
    else:
        build, shape = _SMALL_MODELS[name]
        model, x = build().eval(), torch.randn(shape, generator=torch.Generator().manual_seed(3))
    randomize_batchnorms(model)
    for level in (0.3, 0.5):
        _check_removal(
            model, x, level, tmp_path, onnx=name != "mobilenet_v2", prune_batch_norms=False
        )


def test_a_constant_that_varies_at_its_consumer_is_refused():
    """A zero-padded average pool between batch norm and consumer makes the pruned channel's
    constant position-dependent: not foldable, so the export refuses."""

    class PaddedPool(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.bn, self.b = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.Conv2d(8, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = nn.functional.avg_pool2d(torch.relu(self.bn(self.a(x))), 3, stride=1, padding=1)
            return self.b(y)

    model = PaddedPool().eval()
    with torch.no_grad():
        model.bn.bias.fill_(0.5)
    x = torch.randn(2, 3, 6, 6)
    graph = _graph(model, x)
    method = pc.filter_pruning(0.5, prune_first_conv=True, prune_batch_norms=False)
    params = dict(model.named_parameters())
    state = method.init(graph, params)
    with pytest.raises(StateError, match=r"removed input \d+ of 'b' is not a constant"):
        export.materialize(model, method, params, state, graph)
    kept = pc.filter_pruning(0.5, prune_first_conv=True).init(
        graph, params
    )  # with prune_batch_norms: exact zeros
    small = export.materialize(
        model, pc.filter_pruning(0.5, prune_first_conv=True), params, kept, graph
    )
    masked = pc.apply(model, pc.filter_pruning(0.5, prune_first_conv=True), params, kept, x)
    assert torch.allclose(small(x), masked, atol=1e-5)
