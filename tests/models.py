"""Real architectures for model-level tests (random weights, no downloads)."""

from __future__ import annotations

import torch
import torchvision
from torch import nn

TORCHVISION = {
    "resnet18": 64,
    "resnet50": 64,
    "mobilenet_v2": 64,
    "mobilenet_v3_small": 64,
    "inception_v3": 96,
    "squeezenet1_1": 64,
    "efficientnet_b0": 64,
}


def torchvision_model(name: str, num_classes: int = 10) -> tuple[nn.Module, torch.Tensor]:
    """An eval-mode torchvision model built with ``weights=None`` and a fitting input batch."""
    torch.manual_seed(0)
    kwargs = {"aux_logits": False, "init_weights": False} if name == "inception_v3" else {}
    model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes, **kwargs).eval()
    size = TORCHVISION[name]
    return model, torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


def tiny_bert():
    """A HuggingFace BertModel from a small config, and (input_ids, attention_mask)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    )
    model = BertModel(config).eval()
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    return model, ids, torch.ones(2, 16, dtype=torch.long)


# small HuggingFace encoders (random weights) for transformer tests
SMALL = dict(vocab_size=64, hidden_size=32, num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)


def small_encoder(family: str, num_labels: int | None = None) -> torch.nn.Module:
    """A 2-layer encoder of ``family`` with random weights (a classifier when ``num_labels``)."""
    import transformers

    torch.manual_seed(0)
    if family == "bert":
        config = transformers.BertConfig(num_hidden_layers=2, **SMALL)
    elif family == "roberta":
        config = transformers.RobertaConfig(num_hidden_layers=2, pad_token_id=1, **SMALL)
    else:
        config = transformers.DistilBertConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                               max_position_embeddings=64)
    if num_labels is None:
        return transformers.AutoModel.from_config(config).eval()
    config.num_labels = num_labels
    return transformers.AutoModelForSequenceClassification.from_config(config)


def padded_batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask}
