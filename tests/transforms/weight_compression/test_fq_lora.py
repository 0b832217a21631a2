"""INT4 QAT with LoRA adapters (compression_format="fq_lora"): the start equals the PTQ model, the
fold equals a NumPy reference, distillation lowers the loss, and the stripped model exports."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import purecomp as pc
from purecomp.distillation import kl_distillation_loss
from purecomp.errors import ConfigError
from purecomp.transforms.weight_compression import (
    CompressedLinear,
    LoRAQuantizedLinear,
    compress_weights,
    lora_parameters,
)

pytest.importorskip("transformers")


def tiny_llama() -> torch.nn.Module:
    """hidden 64, 2 layers, vocabulary 128, weights drawn wider than HF's default (std 0.02) so that the
    logits are far from uniform and 4-bit rounding changes them measurably."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         initializer_range=0.1)
    return LlamaForCausalLM(config).eval()


def batches(count: int, seed: int, vocab: int = 128, length: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (2, length), generator=g) for _ in range(count)]


@pytest.mark.parametrize("mode", ["int4_sym", "int4_asym"])
def test_qat_model_starts_as_the_ptq_model_and_trains_only_scales_and_adapters(mode):
    teacher = tiny_llama()
    ptq = compress_weights(copy.deepcopy(teacher), mode=mode, group_size=32)
    qat = compress_weights(copy.deepcopy(teacher), mode=mode, group_size=32, compression_format="fq_lora",
                           advanced_parameters={"lora_adapter_rank": 4})
    lora = [m for m in qat.modules() if isinstance(m, LoRAQuantizedLinear)]
    assert len(lora) == sum(isinstance(m, CompressedLinear) and m.mode == mode for m in ptq.modules()) > 0
    trainable = {n for n, p in qat.named_parameters() if p.requires_grad}
    assert trainable and all(n.rpartition(".")[2] in ("log_scale_factor", "lora_A", "lora_B") for n in trainable)
    assert {id(p) for p in lora_parameters(qat)} == {id(p) for p in qat.parameters() if p.requires_grad}
    ids = batches(1, 0)[0]
    with torch.no_grad():
        torch.testing.assert_close(qat(ids).logits, ptq(ids).logits, rtol=0, atol=1e-5)


def numpy_fold(base: np.ndarray, a: np.ndarray, b: np.ndarray, scale16: np.ndarray, zero: np.ndarray | None,
               qmin: int, qmax: int, group: int) -> np.ndarray:
    merged = (base.astype(np.float64) + b.astype(np.float64) @ a.astype(np.float64)).astype(np.float32)
    out, width = merged.shape
    w = merged.reshape(out, width // group, group)
    s = scale16.astype(np.float32)[..., None]
    z = 0 if zero is None else zero.astype(np.float32)[..., None]
    k = np.clip(np.round(w / s + z), qmin, qmax)
    return ((k - z) * s).reshape(out, width)


@pytest.mark.parametrize(("mode", "qmin", "qmax"), [("int4_sym", -8, 7), ("int4_asym", 0, 15)])
def test_fold_then_requantize_equals_the_numpy_reference(mode, qmin, qmax):
    model = compress_weights(tiny_llama(), mode=mode, group_size=32, compression_format="fq_lora",
                             advanced_parameters={"lora_adapter_rank": 4})
    layer = next(m for m in model.modules() if isinstance(m, LoRAQuantizedLinear))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a trained state: adapters and a moved scale
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.05)
        layer.log_scale_factor.copy_(0.1 * torch.rand(layer.log_scale_factor.shape, generator=g))
    folded = layer.to_compressed()
    scale16 = layer.scale.detach().to(torch.float16).numpy()
    zero = None if layer.zero_point is None else layer.zero_point.numpy()
    expected = numpy_fold(layer.base_weight.numpy(), layer.lora_A.detach().numpy(), layer.lora_B.detach().numpy(),
                          scale16, zero, qmin, qmax, layer.group_size)
    np.testing.assert_allclose(folded.weight.numpy(), expected, rtol=0, atol=1e-6)
    assert folded.mode == mode and folded.packed_weight.dtype == torch.uint8  # packed INT4 again
    # the folded layer holds the QAT layer's weight (the forward already rounds the scale to float16)
    with torch.no_grad():
        torch.testing.assert_close(folded.weight, layer.weight(), rtol=0, atol=1e-6)


def test_distillation_with_lora_lowers_the_loss_and_the_stripped_model_exports(tmp_path):
    ort = pytest.importorskip("onnxruntime")  # noqa: F841
    from purecomp.transforms.weight_compression.export_onnx import (
        CausalLMWithCache,
        export_compressed,
        session,
    )

    torch.manual_seed(0)
    teacher = tiny_llama()
    student = compress_weights(copy.deepcopy(teacher), mode="int4_sym", group_size=32, compression_format="fq_lora",
                               advanced_parameters={"lora_adapter_rank": 8})
    train = batches(8, 1)  # random tokens have nothing to generalize: the loss is measured on what it trains on

    def loss_on(data: list[torch.Tensor]) -> float:
        with torch.no_grad():
            return float(sum(kl_distillation_loss(student(ids).logits, teacher(ids).logits) for ids in data))

    before = loss_on(train)
    optimizer = torch.optim.Adam(lora_parameters(student), lr=2e-3)
    student.train()
    for step in range(120):
        ids = train[step % len(train)]
        with torch.no_grad():
            target = teacher(ids).logits
        loss = kl_distillation_loss(student(ids).logits, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    student.eval()
    after = loss_on(train)
    assert after < 0.6 * before, (before, after)  # 0.185 -> 0.060 when written
    stripped = pc.strip(student)
    assert not any(isinstance(m, LoRAQuantizedLinear) for m in stripped.modules())
    assert loss_on(train) == pytest.approx(after, rel=1e-4)  # folding keeps what training won
    path = export_compressed(stripped, tmp_path / "folded.onnx")
    wrapper = CausalLMWithCache(stripped)
    args = wrapper.example_inputs(batch=1, sequence=6, past=0)
    with torch.no_grad():
        expected = wrapper(*args)[0].numpy()
    got = session(path, threads=1).run(["logits"], {n: a.numpy() for n, a in zip(wrapper.input_names(), args)})[0]
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-5 * np.abs(expected).max())


def test_saving_or_exporting_an_unstripped_model_is_refused(tmp_path):
    from purecomp.errors import StateError
    from purecomp.transforms.weight_compression import save_compressed
    from purecomp.transforms.weight_compression.export_onnx import export_compressed

    model = compress_weights(tiny_llama(), mode="int4_sym", group_size=32, compression_format="fq_lora",
                             advanced_parameters={"lora_adapter_rank": 4})
    with pytest.raises(StateError, match="purecomp.strip"):
        save_compressed(model, tmp_path / "saved")
    with pytest.raises(StateError, match="purecomp.strip"):
        export_compressed(model, tmp_path / "model.onnx")


def test_fq_lora_refuses_bad_options_by_name():
    with pytest.raises(ConfigError, match="compression_format"):
        compress_weights(tiny_llama(), mode="int8_asym", compression_format="fq_lora")
    with pytest.raises(ConfigError, match="compression_format"):
        compress_weights(tiny_llama(), mode="int4_sym", group_size=32, compression_format="fq")
    with pytest.raises(ConfigError, match="lora_adapter_rank"):
        compress_weights(tiny_llama(), mode="int4_sym", group_size=32, compression_format="fq_lora",
                         advanced_parameters={"lora_adapter_rank": 0})


class TokenWindows(torch.utils.data.Dataset):
    def __init__(self, windows: list[torch.Tensor]) -> None:
        self.windows = [w for batch in windows for w in batch]

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.windows[i]}


def test_compression_trainer_distills_an_fq_lora_model_and_checkpoints_it(tmp_path):
    from transformers import TrainingArguments

    from purecomp.integrations.hf_trainer import CompressionTrainer

    torch.manual_seed(0)
    teacher = tiny_llama()
    student = compress_weights(copy.deepcopy(teacher), mode="int4_sym", group_size=32, compression_format="fq_lora",
                               advanced_parameters={"lora_adapter_rank": 8})
    train = batches(8, 1)

    def loss_on(model) -> float:
        with torch.no_grad():
            return float(sum(kl_distillation_loss(model(ids).logits, teacher(ids).logits) for ids in train))

    before = loss_on(student)
    frozen = {n: p.detach().clone() for n, p in student.named_parameters() if not p.requires_grad}
    args = TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=2, max_steps=120,
                             learning_rate=2e-3, lr_scheduler_type="constant", logging_steps=40, save_steps=120,
                             report_to=[], use_cpu=True, seed=0, weight_decay=0.0)
    trainer = CompressionTrainer(student, args, compression_config=None, teacher_model=teacher,
                                 train_dataset=TokenWindows(train))
    trainer.train()
    student.eval()
    after = loss_on(student)
    assert after < 0.6 * before, (before, after)
    assert all(torch.equal(p, frozen[n]) for n, p in student.named_parameters() if n in frozen)  # only LoRA trained
    # the checkpoint holds the adapters: a fresh fq_lora model loads it and computes the same logits
    trainer.save_model(str(tmp_path / "saved"))
    again = compress_weights(copy.deepcopy(teacher), mode="int4_sym", group_size=32, compression_format="fq_lora",
                             advanced_parameters={"lora_adapter_rank": 8})
    from safetensors.torch import load_file

    again.load_state_dict(load_file(str(tmp_path / "saved" / "model.safetensors")), strict=False)
    ids = train[0]
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, student(ids).logits, rtol=0, atol=1e-5)
    with pytest.raises(ConfigError, match="compression_config"):
        CompressionTrainer(tiny_llama(), args, compression_config=None, teacher_model=teacher,
                           train_dataset=TokenWindows(batches(2, 1)))


def test_kl_distillation_loss_averages_over_the_masked_positions_only():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    log_s, log_t = student.log_softmax(-1).double(), teacher.log_softmax(-1).double()
    per_token = (log_t.exp() * (log_t - log_s)).sum(-1)  # KL(p_t || p_s) per position
    expected = float(per_token[mask.bool()].mean())
    assert float(kl_distillation_loss(student, teacher, mask=mask)) == pytest.approx(expected, rel=1e-5)
    assert float(kl_distillation_loss(student, teacher)) == pytest.approx(float(per_token.mean()), rel=1e-5)


def test_compression_trainer_distillation_loss_is_not_scaled_by_gradient_accumulation(tmp_path):
    from transformers import TrainingArguments

    from purecomp.integrations.hf_trainer import CompressionTrainer

    class WithLabels(TokenWindows):
        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": self.windows[i], "labels": self.windows[i]}

    teacher = tiny_llama()
    student = compress_weights(copy.deepcopy(teacher), mode="int4_sym", group_size=32, compression_format="fq_lora",
                               advanced_parameters={"lora_adapter_rank": 4})
    data = batches(2, 1)
    with torch.no_grad():
        direct = float(sum(kl_distillation_loss(student(ids).logits, teacher(ids).logits) for ids in data)) / 2
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             max_steps=1, learning_rate=1e-9, logging_steps=1, report_to=[], use_cpu=True,
                             save_strategy="no")
    trainer = CompressionTrainer(student, args, compression_config=None, teacher_model=teacher,
                                 train_dataset=WithLabels(data))
    trainer.train()
    logged = next(entry["loss"] for entry in trainer.state.log_history if "loss" in entry)
    assert float(logged) == pytest.approx(direct, rel=0.05)  # twice as large before the fix
