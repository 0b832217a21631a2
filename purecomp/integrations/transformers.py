"""purecomp for HuggingFace transformers encoders: a Trainer script gains compression by
swapping ``Trainer`` for ``CompressionTrainer`` and passing a config.

```python
from purecomp.integrations.transformers import CompressionTrainer
trainer = CompressionTrainer(model=model, args=args, train_dataset=train, compression_config=config)
trainer.train(); trainer.save_model("out"); trainer.export_onnx("out/model.onnx")
```

Placement (``TRANSFORMER_TARGET_SCOPES``): weights of every linear and embedding; inputs of
every linear and of both attention matmuls; nothing on integer inputs, masks, residual adds,
softmax or layer-norm internals. See ``hf_compress`` and docs/transformers.md.
"""

from __future__ import annotations

from .hf_compress import (
    FFN_SCOPES,
    GROUPED_SCOPES,
    LABEL_KEYS,
    NUM_GROUPS,
    STATE_FILE,
    TRANSFORMER_TARGET_SCOPES,
    ActivationOptions,
    TransformerController,
    batches_on,
    create_compressed_transformer,
    export_onnx,
    float_activations,
    grouped_activations,
    load_compressed_transformer,
    model_inputs,
    positional_inputs,
    read_compression_state,
    save_compression_state,
    trace_transformer,
    transformer_config,
    transformer_quantization,
    use_eager_attention,
)
from .hf_trainer import CompressionCallback, CompressionTrainer

__all__ = [
    "FFN_SCOPES",
    "GROUPED_SCOPES",
    "LABEL_KEYS",
    "NUM_GROUPS",
    "STATE_FILE",
    "TRANSFORMER_TARGET_SCOPES",
    "ActivationOptions",
    "CompressionCallback",
    "CompressionTrainer",
    "TransformerController",
    "batches_on",
    "create_compressed_transformer",
    "export_onnx",
    "float_activations",
    "grouped_activations",
    "load_compressed_transformer",
    "model_inputs",
    "positional_inputs",
    "read_compression_state",
    "save_compression_state",
    "trace_transformer",
    "transformer_config",
    "transformer_quantization",
    "use_eager_attention",
]
