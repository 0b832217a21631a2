"""``pc.compress_weights(..., dataset=..., awq=, scale_estimation=, gptq=)`` end to end on a small
``LlamaForCausalLM`` built from a config: each data-aware option lowers the summed output error of
the 4-bit layers on held-out text, NNCF's rules for the options, and the stored AWQ input scale."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import purecomp as pc
from purecomp.errors import CalibrationError, ConfigError, StateError
from purecomp.transforms.weight_compression import CompressedLinear, load_compressed_state_dict
from purecomp.transforms.weight_compression.layer_inputs import InputAccumulator
from tests.llm import tiny_llama

OPTIONS = {
    "awq": dict(awq=True),
    "scale_estimation": dict(scale_estimation=True),
    "gptq": dict(gptq=True),
    "awq+scale_estimation": dict(awq=True, scale_estimation=True),
    "gptq+scale_estimation": dict(gptq=True, scale_estimation=True),
    "awq+gptq": dict(awq=True, gptq=True),
}


def text_tokens(topics: tuple[str, ...], length: int, count: int) -> list[torch.Tensor]:
    """``count`` windows of ``length`` byte tokens (vocabulary 256) of English text: chapters of the
    Python reference shipped with every Python (``pydoc_data.topics``)."""
    import pydoc_data.topics as docs

    data = "\n\n".join(docs.topics[t] for t in topics).encode("utf-8", "replace")
    ids = torch.tensor(list(data), dtype=torch.long)
    return [ids[i * length:(i + 1) * length].unsqueeze(0) for i in range(count)]


CALIBRATION = text_tokens(("compound",), 32, 24)
HELD_OUT = text_tokens(("execmodel", "import"), 32, 12)


def llm_like() -> nn.Module:
    """hidden 64, 2 layers, random weights; two channels of every norm weight scaled by 20, so the
    linears see a few large input channels, as LLM activations do."""
    model = tiny_llama(hidden=64, layers=2, seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight"):
                p[[5, 40]] *= 20
    return model


def float_inputs(model: nn.Module, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every linear's input rows on ``batches`` in the float model (forward pre-hooks)."""
    rows: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=n: rows.setdefault(name, []).append(
        args[0].detach().reshape(-1, args[0].shape[-1]))) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for ids in batches:
            model(ids)
    for h in hooks:
        h.remove()
    return {name: torch.cat(r) for name, r in rows.items()}


def four_bit_error(reference: nn.Module, compressed: nn.Module, inputs: dict[str, torch.Tensor]) -> float:
    """``sum over 4-bit layers ||X (W - W')^T||^2`` on the float model's inputs ``X``."""
    total = 0.0
    for name, module in compressed.named_modules():
        if isinstance(module, CompressedLinear) and module.mode.startswith("int4"):
            w = reference.get_submodule(name).weight.detach()
            total += float(((inputs[name] @ (w - module.weight).T) ** 2).sum())
    return total


@pytest.fixture(scope="module")
def reference() -> tuple[nn.Module, dict[str, torch.Tensor], float]:
    model = llm_like()
    inputs = float_inputs(model, HELD_OUT)
    rtn = pc.compress_weights(copy.deepcopy(model), mode="int4_sym", group_size=32, dataset=CALIBRATION)
    return model, inputs, four_bit_error(model, rtn, inputs)


@pytest.mark.parametrize("option", list(OPTIONS))
def test_each_data_aware_option_lowers_the_held_out_layer_error(reference, option: str) -> None:
    model, inputs, e_rtn = reference
    compressed = pc.compress_weights(copy.deepcopy(model), mode="int4_sym", group_size=32, dataset=CALIBRATION,
                                     **OPTIONS[option])
    e = four_bit_error(model, compressed, inputs)
    assert e < e_rtn, (option, e, e_rtn)
    scaled = [m for m in compressed.modules() if isinstance(m, CompressedLinear) and m.input_scale is not None]
    assert bool(scaled) == option.startswith("awq")  # AWQ found outlier channels worth scaling
    with torch.no_grad():
        logits = compressed(HELD_OUT[0]).logits
    assert torch.isfinite(logits).all()


def test_awq_input_scale_is_applied_and_stored() -> None:
    model = llm_like()
    compressed = pc.compress_weights(copy.deepcopy(model), mode="int4_asym", group_size=32, dataset=CALIBRATION,
                                     awq=True, advanced_parameters={"awq_params": {"percent_to_apply": 1.0}})
    layer = next(m for m in compressed.modules() if isinstance(m, CompressedLinear) and m.input_scale is not None)
    x = torch.randn(3, layer.in_features)
    packed = layer.packed
    unscaled = type(packed)(packed.data, packed.scale, packed.zero_point, packed.mode, packed.group_size, packed.shape)
    # the integers encode W diag(s); the layer computes (x / s) Q(W diag(s))^T
    torch.testing.assert_close(layer(x), (x * layer.input_scale) @ unscaled.dequantize().T, rtol=1e-5, atol=1e-6)
    # state_dict round trip into a float model, and into a module without an input scale
    fresh = llm_like()
    load_compressed_state_dict(fresh, compressed.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(HELD_OUT[0]).logits, compressed(HELD_OUT[0]).logits)
    plain_layer = CompressedLinear(unscaled)
    with pytest.raises(StateError, match="AWQ input scale"):
        plain_layer.load_state_dict(layer.state_dict())
    assert pc.statistics(None, pc.transforms.weight_compression.state_from_model(compressed))


def test_the_pure_method_gives_the_same_weights() -> None:
    model = llm_like()
    graph = pc.trace(model, (CALIBRATION[0],))
    params = dict(model.named_parameters())
    method = pc.weight_compression("int4_sym", group_size=32, awq=True, scale_estimation=True)
    state = method.init(graph, params, [(ids,) for ids in CALIBRATION], calibration_mode="eval")
    compressed = pc.compress_weights(copy.deepcopy(model), mode="int4_sym", group_size=32, dataset=CALIBRATION,
                                     awq=True, scale_estimation=True)
    weights = method.params(params, state)
    for name, module in compressed.named_modules():
        if isinstance(module, CompressedLinear):
            torch.testing.assert_close(weights[f"{name}.weight"], module.weight)


def test_calibration_statistics_share_one_input() -> None:
    """q, k and v (and gate, up) read one tensor: their statistics are gathered once and equal
    those of an independent accumulation of the hooked inputs."""
    from purecomp.transforms.weight_compression.method import collect_inputs

    model = llm_like()
    graph = pc.trace(model, (CALIBRATION[0],))
    from purecomp.init_context import InitContext

    context = InitContext.start(graph, dict(model.named_parameters()), [(ids,) for ids in CALIBRATION[:4]],
                                calibration_mode="eval")
    from purecomp.transforms.weight_compression import layers as layer_search

    linears = [layer for layer in layer_search.from_graph(graph, graph.sites) if layer.kind == "linear"]
    stats = collect_inputs(context, linears, 4)
    assert stats["model.layers.0.self_attn.q_proj.weight"] is stats["model.layers.0.self_attn.v_proj.weight"]
    assert stats["model.layers.0.mlp.gate_proj.weight"] is stats["model.layers.0.mlp.up_proj.weight"]
    rows = float_inputs(model, CALIBRATION[:4])
    acc = InputAccumulator()
    acc.add(rows["model.layers.1.mlp.down_proj"])
    expected = acc.result()
    got = stats["model.layers.1.mlp.down_proj.weight"]
    assert got.tokens == expected.tokens == 4 * 32
    torch.testing.assert_close(got.gram, expected.gram, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(got.magnitude, expected.magnitude)


def test_nncf_rules_for_the_data_aware_options() -> None:
    model = llm_like()
    for key in ("scale_estimation", "gptq"):  # NNCF quantize_model.py: they need a dataset
        with pytest.raises(ConfigError, match="dataset"):
            pc.compress_weights(copy.deepcopy(model), mode="int4_sym", group_size=32, **{key: True})
    with pytest.raises(ConfigError, match="data-free AWQ"):
        pc.compress_weights(copy.deepcopy(model), mode="int4_sym", group_size=32, awq=True)
    for key in ("awq", "scale_estimation", "gptq"):  # NNCF: INT8 modes take none of them
        with pytest.raises(ConfigError, match="int8_asym does not take"):
            pc.compress_weights(copy.deepcopy(model), mode="int8_asym", dataset=CALIBRATION, **{key: True})
    with pytest.raises(ConfigError, match="expected True, False or None"):
        pc.compress_weights(copy.deepcopy(model), mode="int4_sym", dataset=CALIBRATION, gptq="yes")
    with pytest.raises(ConfigError, match="advanced_parameters.gptq_params.damp"):
        pc.compress_weights(copy.deepcopy(model), mode="int4_sym", group_size=32, dataset=CALIBRATION, gptq=True,
                            advanced_parameters={"gptq_params": {"damp": 0.1}})
    with pytest.raises(ConfigError, match="algorithm"):
        pc.weight_compression("int4_sym", gptq=True, algorithm=lambda w, c, i: None)


def test_a_layer_the_data_never_reaches_is_named() -> None:
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Linear(32, 32)
            self.unused = nn.Linear(32, 32)

        def forward(self, x: torch.Tensor, head: int = 0) -> torch.Tensor:
            return self.used(x) if head == 0 else self.unused(x)

    model = TwoHeads()
    graph = pc.trace(model, (torch.randn(2, 32),), {"head": 1})
    method = pc.weight_compression("int4_sym", group_size=16, all_layers=True, gptq=True)
    with pytest.raises(CalibrationError, match="unused"):
        method.init(graph, dict(model.named_parameters()), [(torch.randn(2, 32),) for _ in range(3)],
                    calibration_mode="eval")


def test_awq_state_round_trips_through_save_state(tmp_path) -> None:
    model = llm_like()
    graph = pc.trace(model, (CALIBRATION[0],))
    params = dict(model.named_parameters())
    method = pc.weight_compression("int4_sym", group_size=32, awq=True)
    state = method.init(graph, params, [(ids,) for ids in CALIBRATION], calibration_mode="eval")
    assert any(p.input_scale is not None for p in state.weights.values())
    loaded = pc.load_state(pc.save_state(tmp_path / "state.safetensors", state))
    for name, packed in state.weights.items():
        other = loaded.weights[name].input_scale
        assert (other is None) == (packed.input_scale is None)
        if other is not None:
            assert torch.equal(other, packed.input_scale)
    before, after = method.params(params, state), method.params(params, loaded)
    assert all(torch.equal(before[k], after[k]) for k in before)
