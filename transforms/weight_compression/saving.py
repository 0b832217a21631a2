"""A compressed model on disk: its packed ``state_dict`` in one safetensors file, beside the
HuggingFace config when the model has one.

``save_compressed(model, directory)`` writes ``directory/purecomp_weights.safetensors``: every tensor
of ``model.state_dict()`` once (tied weights and buffers shared between modules are stored once and
recorded as aliases) and the ``_extra_state`` of each compressed module (its format) as JSON, with
the crash-safe writer of ``purecomp.checkpoint``. ``load_compressed(directory)`` rebuilds a
HuggingFace model from the saved config (no weights are downloaded or read besides this file) and
loads the packed state into it, bit for bit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor, nn

from purecomp.checkpoint import load_record, save_record
from purecomp.errors import StateError

from .api import load_compressed_state_dict
from .fq_lora import refuse_unstripped

WEIGHTS_FILE = "purecomp_weights.safetensors"
FORMAT = "purecomp-compressed-model-1"


def _storage_key(t: Tensor) -> tuple[int, int, tuple[int, ...], str]:
    return t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), str(t.dtype)


def save_compressed(model: nn.Module, directory: str | Path) -> Path:
    """Write ``model``'s packed state (and ``model.config`` when it has ``save_pretrained``) to
    ``directory``; returns the weights file."""
    refuse_unstripped(model, "save_compressed")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: list[Tensor] = []
    entries: dict[str, Any] = {}
    first: dict[tuple, str] = {}
    for key, value in model.state_dict().items():
        if isinstance(value, Tensor):
            seen = first.setdefault(_storage_key(value), key)
            if seen != key:
                entries[key] = {"alias": seen}
            else:
                entries[key] = {"tensor": len(tensors)}
                tensors.append(value)
        else:
            entries[key] = {"extra": value}
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "save_pretrained"):
        config.save_pretrained(directory)
    record = {"structure": {"format": FORMAT, "entries": entries}, "tensors": tensors}
    return save_record(directory / WEIGHTS_FILE, record)


def read_compressed_state_dict(directory: str | Path) -> dict[str, Any]:
    """The ``state_dict`` ``save_compressed`` wrote (aliases point at the same tensor again)."""
    path = Path(directory) / WEIGHTS_FILE
    if not path.exists():
        raise StateError(f"{str(directory)!r} holds no {WEIGHTS_FILE}; expected a folder written by save_compressed")
    record, _, _ = load_record(path)
    structure = record.get("structure") if isinstance(record.get("structure"), dict) else {}
    if structure.get("format") != FORMAT:
        raise StateError(f"{str(path)!r} is not a compressed model (format {structure.get('format')!r}); "
                         f"expected {FORMAT!r}")
    tensors = record["tensors"]
    out: dict[str, Any] = {}
    for key, entry in structure["entries"].items():
        if "tensor" in entry:
            out[key] = tensors[entry["tensor"]]
        elif "extra" in entry:
            out[key] = entry["extra"]
    for key, entry in structure["entries"].items():
        if "alias" in entry:
            out[key] = out[entry["alias"]]
    return out


def load_compressed(directory: str | Path, model: nn.Module | None = None) -> nn.Module:
    """The compressed model saved in ``directory``: loaded into ``model`` (the same float
    architecture) or, without one, into a HuggingFace causal LM built from the saved config."""
    state_dict = read_compressed_state_dict(directory)
    if model is None:
        try:
            from transformers import AutoConfig, AutoModelForCausalLM
        except ImportError as exc:
            raise StateError(f"loading {str(directory)!r} without a model needs transformers ({exc}); "
                             "expected transformers installed, or pass the model") from None
        if not (Path(directory) / "config.json").exists():
            raise StateError(f"{str(directory)!r} has no config.json to rebuild the model from; pass the model")
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory))
    load_compressed_state_dict(model, state_dict)
    return model.eval()
