"""``CompressionTrainer``: a ``transformers.Trainer`` that trains a compressed model.

Per step the loss is ``task_loss + ctrl.loss()`` (the compression loss: RB density
loss, 0 for quantization); the compression scheduler follows NNCF's calls,
``epoch_step()`` at each epoch's start and ``step()`` before each optimizer step.
``save_model`` writes the HuggingFace model (``save_pretrained``: the trained FP32
weights, loadable with ``from_pretrained``) and ``STATE_FILE`` beside it (quantizer
ranges, masks, schedule position); ``load_compressed_transformer`` restores both.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from purecomp.api import CompressedModule, CompressionController, Config
from purecomp.checkpoint import save_torch
from purecomp.distillation import kl_distillation_loss
from purecomp.errors import CalibrationError, ConfigError, StateError

from .hf_compress import (
    NUM_GROUPS,
    STATE_FILE,
    ActivationOptions,
    batches_on,
    create_compressed_transformer,
    export_onnx,
    model_inputs,
    read_compression_state,
    save_compression_state,
)

log = logging.getLogger(__name__)


class CompressionCallback(TrainerCallback):
    """Steps ``ctrl.scheduler``: ``epoch_step()`` on epoch begin, ``step()`` on step begin."""

    def __init__(self, ctrl: CompressionController) -> None:
        self.ctrl = ctrl

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # ``state.epoch`` is the number of epochs done; a run resumed mid-epoch re-enters an epoch
        # whose ``epoch_step`` the restored scheduler has already taken
        if self.ctrl.scheduler.current_epoch < int(state.epoch + 1e-6):
            self.ctrl.scheduler.epoch_step()

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.ctrl.scheduler.step()


def _save_tensors(model: nn.Module, out: Path) -> None:
    """``model.safetensors`` with every tensor of ``model.state_dict()`` (each its own copy: tied
    buffers are written twice) and the HuggingFace config beside it. Non-tensor entries (a
    compressed layer's ``_extra_state`` format record) are left out: ``save_pretrained`` refuses
    them."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()
               if isinstance(v, torch.Tensor)}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "save_pretrained"):
        config.save_pretrained(out)


class CompressionTrainer(Trainer):
    """``Trainer`` plus compression: ``CompressionTrainer(..., compression_config=config)``.

    ``compression_config=None`` trains a model compressed beforehand as it is (its trainable
    compressed layers, e.g. ``compress_weights(..., compression_format="fq_lora")``; only the
    parameters that require grad train); ``teacher_model`` (the float model) replaces the task
    loss by distillation on the logits at ``distillation_temperature``.

    ``compression_config``: an NNCF-style config (``purecomp.Config`` or a dict). The model is
    traced on the first training batch and initialized (range init, ...) on training batches,
    unless ``compression_state`` (a ``STATE_FILE`` path or a directory holding one) restores a
    saved state. ``eager_attention`` switches the model to eager attention so the attention
    matmuls can be quantized; ``float_activation_scopes`` (e.g. ``FFN_SCOPES``) keeps the inputs of
    those linears in float (``float_activations``), and ``grouped_activation_scopes`` (e.g.
    ``GROUPED_SCOPES``, up to ``num_groups`` groups) quantizes them per channel group
    (``ActivationOptions``; saved with the state and restored with it). After construction ``self.model`` is the ``CompressedModule``;
    ``self.compression_ctrl`` is the controller.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        args: Any = None,
        *,
        compression_config: Config | Mapping[str, Any] | None,
        compression_state: str | Path | None = None,
        teacher_model: nn.Module | None = None,
        distillation_temperature: float = 1.0,
        eager_attention: bool = True,
        float_activation_scopes: Sequence[str] = (),
        grouped_activation_scopes: Sequence[str] = (),
        num_groups: int = NUM_GROUPS,
        **kwargs: Any,
    ) -> None:
        if model is None:
            raise CalibrationError("CompressionTrainer needs a model (model_init is not supported)")
        if teacher_model is not None and not isinstance(teacher_model, nn.Module):
            raise ConfigError("teacher_model", f"expected a torch.nn.Module, got {type(teacher_model).__name__}")
        if not isinstance(distillation_temperature, (int, float)) or distillation_temperature <= 0:
            raise ConfigError("distillation_temperature", f"expected a number > 0, got {distillation_temperature!r}")
        self.teacher_model = teacher_model
        self.distillation_temperature = float(distillation_temperature)
        if teacher_model is not None:
            self.loss_is_scaled_for_ga = False  # the distillation loss is a per-batch mean: the Trainer divides it
        if compression_config is None:
            self._init_precompressed(model, args, compression_state, kwargs)
            return
        super().__init__(model=model, args=args, **kwargs)
        device = next(model.parameters()).device
        options = ActivationOptions(tuple(float_activation_scopes), tuple(grouped_activation_scopes), num_groups)
        if compression_state is not None:
            path = Path(compression_state)
            saved, example = read_compression_state(path / STATE_FILE if path.is_dir() else path)
            example = {k: v.to(device) for k, v in example.items()}
            data = None
            if options == ActivationOptions():  # not given: those the state was saved with
                options = saved["activation_options"]
            elif options != saved["activation_options"]:
                raise ConfigError("compression_state", f"the state was saved with {saved['activation_options']}, "
                                  f"but the trainer was given {options}; expected the same activation options")
        else:
            if self.train_dataset is None:
                raise CalibrationError("CompressionTrainer needs train_dataset to initialize compression "
                                       "(or compression_state to restore one)")
            loader = self.get_train_dataloader()
            data = batches_on(loader, device)
            first = next(data)
            example, saved = first, None
            data = itertools.chain([first], data)
        self.compression_ctrl, compressed = create_compressed_transformer(
            model, compression_config, example, data=data, compression_state=saved,
            eager_attention=eager_attention, float_activation_scopes=options.float_scopes,
            grouped_activation_scopes=options.grouped_scopes, num_groups=options.num_groups,
        )
        self._trace_batch = {k: v.detach().cpu() for k, v in model_inputs(example).items()}
        # the Trainer reads the inner model's forward signature (columns) and loss kwargs; both stay
        # as computed above from the HuggingFace model
        self._set_signature_columns_if_needed()
        self.model = self.model_wrapped = compressed.to(device)
        self.add_callback(CompressionCallback(self.compression_ctrl))
        if self.teacher_model is not None:
            self.teacher_model.to(device).eval()

    def _init_precompressed(self, model: nn.Module, args: Any, compression_state: Any, kwargs: dict) -> None:
        """No config: ``model`` was compressed already and trains as it is (its trainable compressed
        layers, those with a ``to_compressed()`` method, e.g. ``compress_weights(...,
        compression_format="fq_lora")``); no controller, no state file."""
        if compression_state is not None:
            raise ConfigError("compression_state", "a compression state belongs to a compression_config; expected "
                              "None without one")
        if not any(callable(getattr(m, "to_compressed", None)) for m in model.modules()):
            raise ConfigError("compression_config", "None needs a model compressed already, with trainable compressed "
                              "layers (a to_compressed() method, e.g. compress_weights(..., compression_format="
                              "'fq_lora')); expected a config or such a model")
        super().__init__(model=model, args=args, **kwargs)
        self.compression_ctrl = None
        if self.teacher_model is not None:
            self.teacher_model.to(next(model.parameters()).device).eval()

    @property
    def compressed_module(self) -> CompressedModule:
        if self.compression_ctrl is None:
            raise ConfigError("compressed_module", "this trainer was built without a compression_config; the model "
                              "is self.model")
        return self.compression_ctrl.module

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        """The Trainer's task loss, or with ``teacher_model`` the distillation loss
        ``T^2 KL(p_teacher || p_student)`` on the logits (``purecomp.distillation``), plus
        ``ctrl.loss()`` while training."""
        if self.teacher_model is not None:
            outputs = model(**inputs)
            with torch.no_grad():
                teacher = self.teacher_model(**inputs)
            loss = kl_distillation_loss(outputs.logits, teacher.logits, self.distillation_temperature,
                                        mask=inputs.get("attention_mask"))
            result = (loss, outputs) if return_outputs else loss
        else:
            result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                          num_items_in_batch=num_items_in_batch)
        if not model.training or self.compression_ctrl is None:
            return result
        loss, outputs = result if return_outputs else (result, None)
        loss = loss + self.compression_ctrl.loss().to(loss.device)
        return (loss, outputs) if return_outputs else loss

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        """No weight decay on compression parameters (quantizer ranges, RB logits...)."""
        return [n for n in super().get_decay_parameter_names(model) if not n.startswith("compression.")]

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """``save_pretrained`` of the HuggingFace model, ``STATE_FILE``, the tokenizer and the args."""
        out = Path(output_dir if output_dir is not None else self.args.output_dir)
        if not self.args.should_save:
            return
        out.mkdir(parents=True, exist_ok=True)
        if self.compression_ctrl is None:  # a compressed model trained as it is: its own state_dict
            _save_tensors(self.model, out)
        else:
            self.compressed_module.model.save_pretrained(out)
            save_compression_state(self.compression_ctrl, out / STATE_FILE, self._trace_batch)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(out)
        save_torch(out / "training_args.bin", self.args)
        log.info("saved the model and its compression state to %s", out)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Resume: the HuggingFace weights from ``model.safetensors``, then the compression state."""
        self._load_compressed(Path(resume_from_checkpoint))

    def _load_best_model(self) -> None:
        self._load_compressed(Path(self.state.best_model_checkpoint))

    def _load_compressed(self, directory: Path) -> None:
        from safetensors.torch import load_file

        inner = self.model if self.compression_ctrl is None else self.compressed_module.model
        weights = directory / "model.safetensors"
        if not weights.is_file():
            raise StateError(f"{str(directory)!r} has no model.safetensors; expected a CompressionTrainer checkpoint")
        result = inner.load_state_dict(load_file(str(weights), device=str(self.args.device)), strict=False)
        tied = set(getattr(inner, "all_tied_weights_keys", None) or getattr(inner, "_tied_weights_keys", None) or ())
        # without a config, compressed layers describe their format in _extra_state, which the live
        # modules already hold (_save_tensors writes tensors only)
        missing = [k for k in result.missing_keys
                   if k not in tied and not (self.compression_ctrl is None and k.endswith("_extra_state"))]
        if missing or result.unexpected_keys:
            raise StateError(f"{weights} does not fit the model: missing {missing[:5]}, "
                             f"unexpected {result.unexpected_keys[:5]}")
        if self.compression_ctrl is not None:
            saved, _ = read_compression_state(directory / STATE_FILE)
            self.compression_ctrl.load_compression_state(saved)

    def export_onnx(self, path: str | Path, example_batch: Mapping[str, Any] | None = None) -> Path:
        """ONNX (QDQ) of the compressed model on ``example_batch`` (default: the tracing batch)."""
        batch = example_batch if example_batch is not None else self._trace_batch
        inner = self.compressed_module.model
        was = next(inner.parameters()).device
        self.compressed_module.to("cpu")
        try:
            cpu_batch = {k: v.cpu() for k, v in model_inputs(batch).items()}
            return export_onnx(self.compression_ctrl, path, cpu_batch)
        finally:
            self.compressed_module.to(was)
