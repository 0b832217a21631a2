"""``pc.compress_weights`` and the ``pc.weight_compression`` method on a small ``LlamaForCausalLM``
built from a config: NNCF's layer rules (embeddings and LM head in the backup precision, tied
weights, ``all_layers``), the ratio and the sensitivity order, the data-aware metrics against an
independent computation, fidelity of INT8, the functional path, checkpoints, and the errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import purecomp as pc
from purecomp.errors import CalibrationError, ConfigError, NoEffectWarning, ScopeError
from purecomp.transforms.weight_compression import (
    CompressedEmbedding,
    CompressedLinear,
    grid,
    install,
    load_compressed_state_dict,
    state_from_model,
)
from tests.llm import tiny_llama, token_batches


def modes_of(model: nn.Module) -> dict[str, str]:
    """Module name -> ``mode`` (``float`` for a plain Linear / Embedding)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, (CompressedLinear, CompressedEmbedding)):
            out[name] = module.mode
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            out[name] = "float"
    return out


def linears(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


IDS = token_batches(1, length=12, seed=5)[0]


@pytest.mark.parametrize("mode", ["int8_asym", "int8_sym"])
def test_int8_compresses_every_layer_and_keeps_the_logits(mode: str) -> None:
    model = tiny_llama()
    reference = logits(model, IDS)
    assert pc.compress_weights(model, mode=mode) is model  # in place, like NNCF
    assert set(modes_of(model).values()) == {mode}
    assert all(m.group_size == m.weight_shape[1] for m in model.modules() if isinstance(m, CompressedLinear))
    out = logits(model, IDS)
    assert (out - reference).abs().max() < 0.02 * reference.abs().max()
    assert (out.argmax(-1) == reference.argmax(-1)).float().mean() > 0.9


@pytest.mark.parametrize("mode", ["int4_asym", "int4_sym", "nf4"])
def test_4bit_keeps_embeddings_and_lm_head_in_backup(mode: str) -> None:
    model = tiny_llama()
    pc.compress_weights(model, mode=mode)
    modes = modes_of(model)
    assert modes.pop("model.embed_tokens") == "int8_asym" and modes.pop("lm_head") == "int8_asym"
    assert set(modes.values()) == {mode}
    assert {m.group_size for m in model.modules() if isinstance(m, CompressedLinear) and m.mode == mode} == {128}


def test_all_layers_puts_embeddings_and_lm_head_in_4_bits() -> None:
    model = tiny_llama()
    pc.compress_weights(model, mode="int4_sym", all_layers=True)
    assert set(modes_of(model).values()) == {"int4_sym"}


def test_tied_embedding_and_lm_head_share_one_backup_weight() -> None:
    model = tiny_llama(tie_word_embeddings=True)
    reference = logits(model, IDS)
    pc.compress_weights(model, mode="int4_asym", group_size=64)
    assert model.lm_head.packed_weight is model.model.embed_tokens.packed_weight
    modes = modes_of(model)
    assert modes.pop("model.embed_tokens") == "int8_asym" and modes.pop("lm_head") == "int8_asym"
    assert set(modes.values()) == {"int4_asym"}  # every other linear, the last one included (it was tied)
    assert torch.isfinite(logits(model, IDS)).all() and logits(model, IDS).shape == reference.shape


def ratio_defining_share(model: nn.Module, mode: str) -> float:
    sizes = {n: m.weight_shape[0] * m.weight_shape[1] for n, m in model.named_modules()
             if isinstance(m, CompressedLinear) and n != "lm_head"}
    return sum(v for n, v in sizes.items() if modes_of(model)[n] == mode) / sum(sizes.values())


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.6, 0.8])
def test_ratio_counts_weights_and_takes_the_least_sensitive_layers(ratio: float) -> None:
    model = tiny_llama(layers=3)
    originals = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    pc.compress_weights(model, mode="int4_sym", ratio=ratio)
    modes = modes_of(model)
    share = ratio_defining_share(model, "int4_sym")
    largest = max(w.numel() for n, w in originals.items() if n != "lm_head")
    total = sum(w.numel() for n, w in originals.items() if n != "lm_head")
    assert share < ratio or ratio == 0 and share == 0
    assert share > ratio - largest / total - 1e-9
    # data-free: the 4-bit layers are those with the LARGEST 8-bit error (lowest 1 / error score)
    errors = {n: grid.quantization_error(w) for n, w in originals.items() if n != "lm_head"}
    four = [errors[n] for n in errors if modes[n] == "int4_sym"]
    eight = [errors[n] for n in errors if modes[n] == "int8_asym"]
    if four and eight:
        assert min(four) >= max(eight)


def test_backup_none_keeps_the_rest_in_float() -> None:
    model = tiny_llama()
    pc.compress_weights(model, mode="int4_asym", ratio=0.5, backup_mode="none")
    modes = modes_of(model)
    assert modes["model.embed_tokens"] == "float" and modes["lm_head"] == "float"
    assert set(modes.values()) == {"float", "int4_asym"} and list(modes.values()).count("int4_asym") >= 1


def test_ignored_scope() -> None:
    model = tiny_llama()
    pc.compress_weights(model, mode="int4_sym", ignored_scope=pc.IgnoredScope(
        names=["model.layers.0.mlp.down_proj"], patterns=["layers\\.1\\.self_attn\\.[qk]_proj"], types=["Embedding"]))
    modes = modes_of(model)
    assert modes["model.layers.0.mlp.down_proj"] == "float"
    assert modes["model.layers.1.self_attn.q_proj"] == modes["model.layers.1.self_attn.k_proj"] == "float"
    assert modes["model.embed_tokens"] == "float"
    assert modes["model.layers.1.self_attn.v_proj"] == "int4_sym" and modes["lm_head"] == "int8_asym"
    with pytest.raises(ScopeError, match="no_such_layer"):
        pc.compress_weights(tiny_llama(), mode="int4_sym", ignored_scope=pc.IgnoredScope(names=["no_such_layer"]))


def test_group_size_fallback_modes() -> None:
    with pytest.raises(ConfigError, match=r"group size 96 does not divide.*down_proj \(256 input channels\)"):
        pc.compress_weights(tiny_llama(), mode="int4_asym", group_size=96)
    model = tiny_llama()
    pc.compress_weights(model, mode="int4_asym", group_size=96, advanced_parameters={"group_size_fallback_mode": "adjust"})
    sizes = {n: m.group_size for n, m in model.named_modules() if isinstance(m, CompressedLinear) and m.mode == "int4_asym"}
    assert set(sizes.values()) == {128, 256}  # 128 & -128 and 256 & -256: the largest power of two dividing them
    model = tiny_llama()
    pc.compress_weights(model, mode="int4_asym", group_size=96, advanced_parameters={"group_size_fallback_mode": "ignore"})
    assert all(mode == "float" for n, mode in modes_of(model).items() if n not in ("model.embed_tokens", "lm_head"))


def independent_activation_stats(model: nn.Module, batches: list[torch.Tensor], metric: str) -> dict[str, float]:
    """The data-aware statistic of each linear's input, from forward pre-hooks (not purecomp's calibration)."""
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: seen.setdefault(n, []).append(args[0].detach()))
             for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for ids in batches:
            model(ids)
    for h in hooks:
        h.remove()
    out = {}
    for name, xs in seen.items():
        if metric == "max_activation_variance":
            out[name] = sum(float(x.double().var(dim=-2, unbiased=False).max()) for x in xs) / len(xs)
        else:  # hessian_input_activation, NNCF's HAWQAggregator recursion
            h = 0.0
            for x in xs:
                h = (h + float((x.double() ** 2).sum())) / x.numel()
            out[name] = 2 * h / len(xs)
    return out


@pytest.mark.parametrize("metric", [None, "hessian_input_activation"])
def test_data_aware_sensitivity_orders_layers_as_computed_independently(metric: str | None) -> None:
    model = tiny_llama(layers=3)
    batches = token_batches(6)
    reference = copy.deepcopy(model)
    pc.compress_weights(model, mode="int4_asym", ratio=0.5, dataset=pc.Dataset(batches), sensitivity_metric=metric,
                        subset_size=4)
    name = metric or "max_activation_variance"  # NNCF's default with a dataset
    act = independent_activation_stats(reference, batches[:4], name)
    scores = {}
    for n, m in reference.named_modules():
        if isinstance(m, nn.Linear) and n != "lm_head":
            w = m.weight.detach()
            if name == "hessian_input_activation":
                scores[n] = grid.quantization_error(w, reduction="frobenius") * act[n]
            else:
                scores[n] = act[n] / (grid.quantization_error(w) + grid.EPS)
    modes = modes_of(model)
    four = [scores[n] for n in scores if modes[n] == "int4_asym"]
    eight = [scores[n] for n in scores if modes[n] == "int8_asym"]
    assert four and eight and max(four) <= min(eight)  # the 4-bit set is a prefix of the ascending order


def test_dataset_as_plain_iterable_of_dicts() -> None:
    model = tiny_llama()
    data = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)} for ids in token_batches(3)]
    pc.compress_weights(model, mode="int4_sym", ratio=0.7, dataset=data)
    assert "int4_sym" in modes_of(model).values() and "int8_asym" in modes_of(model).values()


def test_int8_with_dataset_warns_that_it_is_unused() -> None:
    with pytest.warns(NoEffectWarning, match="dataset"):
        pc.compress_weights(tiny_llama(), mode="int8_asym", dataset=token_batches(2))


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    (dict(mode="int3"), ConfigError, r"mode: unknown weight compression mode 'int3'; expected one of \['int8_asym'"),
    (dict(mode="int4_sym", ratio=1.5), ConfigError, r"ratio: expected a share of the layers in \[0, 1\], got 1.5"),
    (dict(mode="int4_sym", ratio=-0.1), ConfigError, "ratio"),
    (dict(mode="int8_asym", ratio=0.5), ConfigError, "ratio: int8_asym compresses every layer per output channel"),
    (dict(mode="int8_asym", group_size=64), ConfigError, "group_size"),
    (dict(mode="int8_sym", all_layers=True), ConfigError, "all_layers"),
    (dict(mode="int4_sym", group_size=0), ConfigError, "group_size: expected a positive number"),
    (dict(mode="int4_sym", awq=True), ConfigError, "awq: purecomp's AWQ searches.*pass a dataset"),
    (dict(mode="int4_sym", scale_estimation=True), ConfigError, "scale_estimation: .*pass a dataset"),
    (dict(mode="int4_sym", gptq=True), ConfigError, "gptq: .*pass a dataset"),
    (dict(mode="int4_sym", ratio=0.5, sensitivity_metric="hessian_input_activation"), ConfigError,
     "sensitivity_metric: hessian_input_activation is data-aware: it needs a dataset"),
    (dict(mode="int4_sym", sensitivity_metric="fisher"), ConfigError,
     r"unknown metric 'fisher'; expected one of \['weight_quantization_error', 'hessian_input_activation'"),
    (dict(mode="int4_sym", backup_mode="int2"), ConfigError, "backup_mode"),
    (dict(mode="int4_sym", subset_size=0), ConfigError, "subset_size"),
    (dict(mode="int4_sym", advanced_parameters={"group_size_fallback_mode": "guess"}), ConfigError,
     "group_size_fallback_mode"),
])
def test_errors(kwargs: dict, error: type, match: str) -> None:
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        pc.compress_weights(model, **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched


def test_dataset_of_the_wrong_structure() -> None:
    with pytest.raises(CalibrationError, match="cannot run on a calibration batch"):
        pc.compress_weights(tiny_llama(), mode="int4_sym", ratio=0.5, dataset=[torch.randn(1, 16, 3)])
    with pytest.raises(CalibrationError, match="iterable"):
        pc.compress_weights(tiny_llama(), mode="int4_sym", ratio=0.5, dataset=42)


def test_not_a_module() -> None:
    with pytest.raises(ConfigError, match="model: expected a torch.nn.Module"):
        pc.compress_weights({"w": torch.zeros(2)})


def test_functional_method_agrees_with_the_compressed_modules(tmp_path) -> None:
    model = tiny_llama()
    graph = pc.trace(model, (IDS,))
    params = dict(model.named_parameters())
    method = pc.weight_compression("int4_asym", group_size=64, ratio=0.8)
    state = method.init(graph, params)
    functional = pc.apply(model, method, params, state, IDS).logits
    assert set(modes_of(model).values()) == {"float"}  # pc.apply leaves the model untouched
    compressed = pc.compress_weights(copy.deepcopy(model), mode="int4_asym", group_size=64, ratio=0.8)
    torch.testing.assert_close(functional, logits(compressed, IDS), rtol=0, atol=1e-5)
    report = pc.statistics(graph, state)["weight compression"]
    rows = {row["precision"]: row for row in report.rows}
    assert rows["int4_asym, group size 64"]["% ratio-defining"] < 80
    assert rows["int8_asym, per-channel"]["layers"] + rows["int4_asym, group size 64"]["layers"] == 16
    # the state survives a checkpoint and installs into a fresh float model
    loaded = pc.load_state(pc.save_state(tmp_path / "wc.safetensors", state))
    torch.testing.assert_close(pc.apply(model, method, params, loaded, IDS).logits, functional, rtol=0, atol=0)
    fresh = install(copy.deepcopy(model), loaded)
    torch.testing.assert_close(logits(fresh, IDS), logits(compressed, IDS), rtol=0, atol=0)


def test_compressed_model_state_dict_loads_into_a_float_model() -> None:
    model = tiny_llama(tie_word_embeddings=True)
    fresh = copy.deepcopy(model)
    pc.compress_weights(model, mode="int4_sym", group_size=64)
    sd = model.state_dict()
    assert not any(k.endswith(".weight") and v.is_floating_point() and v.dim() == 2 for k, v in sd.items())
    load_compressed_state_dict(fresh, sd)
    assert torch.equal(logits(fresh, IDS), logits(model, IDS))
    assert fresh.lm_head.packed_weight is fresh.model.embed_tokens.packed_weight  # tied again
    state = state_from_model(fresh)  # 14 linears + the embedding the LM head shares
    assert len(state.weights) == 15 and "model.embed_tokens.weight" in state.weights
    assert "lm_head.weight" not in state.weights and state.float_weights == {}
