"""Saving and loading compression state: JSON for the structure, tensors kept apart.

A state (structs, dicts, tuples, lists, tensors, plain values) is encoded as a JSON document
in which every tensor is replaced by ``{"$tensor": i}``, plus the list of tensors. Decoding
rebuilds only classes that are dataclasses defined inside ``purecomp`` (state structs and
their static settings): nothing else is imported or called, so a checkpoint cannot run
code. ``save_state`` / ``load_state`` write one safetensors file whose metadata holds the
JSON; ``encode_state`` / ``decode_state`` give the same pair for ``torch.save`` payloads
(tensors and strings only, loadable with ``weights_only=True``).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import StateError

FORMAT = "purecomp-state-1"
_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8,
                                torch.uint8, torch.int32, torch.int64, torch.bool)}


def _encode(value: Any, tensors: list[Tensor], seen: dict[int, int]) -> Any:
    if isinstance(value, Tensor):
        index = seen.get(id(value))
        if index is None:
            index = seen[id(value)] = len(tensors)
            tensors.append(value)
        return {"$tensor": index, "requires_grad": bool(value.requires_grad)}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        cls = type(value)
        fields = {f.name: _encode(getattr(value, f.name), tensors, seen) for f in dataclasses.fields(value) if f.init}
        return {"$class": f"{cls.__module__}:{cls.__qualname__}", "fields": fields}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise StateError(f"cannot save a dict with non-string keys: {list(value)[:3]}")
        return {"$dict": {k: _encode(v, tensors, seen) for k, v in value.items()}}
    if isinstance(value, tuple):
        return {"$tuple": [_encode(v, tensors, seen) for v in value]}
    if isinstance(value, list):
        return [_encode(v, tensors, seen) for v in value]
    if isinstance(value, torch.dtype):
        return {"$dtype": str(value)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise StateError(f"cannot save a value of type {type(value).__name__} in a compression state")


def _resolve(name: str) -> type:
    module_name, _, qualname = name.partition(":")
    if not (module_name == "purecomp" or module_name.startswith("purecomp.")):
        raise StateError(f"state class {name!r} is not a purecomp class; refusing to load it")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        raise StateError(f"state class {name!r} does not exist in this version of purecomp") from None
    if not (isinstance(obj, type) and dataclasses.is_dataclass(obj)):
        raise StateError(f"{name!r} is not a state class")
    return obj


def _decode(value: Any, tensors: list[Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "$tensor" in value:
        index = value["$tensor"]
        if not isinstance(index, int) or not 0 <= index < len(tensors):
            raise StateError(f"state refers to tensor {index!r}, but the checkpoint holds {len(tensors)} tensors")
        return tensors[index].requires_grad_(bool(value.get("requires_grad", False)))
    if "$class" in value:
        cls = _resolve(value["$class"])
        fields = {k: _decode(v, tensors) for k, v in value["fields"].items()}
        try:
            return cls(**fields)
        except TypeError as exc:
            raise StateError(f"cannot rebuild {value['$class']}: {exc}") from None
    if "$dict" in value:
        return {k: _decode(v, tensors) for k, v in value["$dict"].items()}
    if "$tuple" in value:
        return tuple(_decode(v, tensors) for v in value["$tuple"])
    if "$dtype" in value:
        return _DTYPES[value["$dtype"]]
    raise StateError(f"unknown entry in a saved state: {sorted(value)}")


def encode_state(state: Any) -> tuple[str, list[Tensor]]:
    """``(JSON structure, tensors)`` of ``state``; tensors are detached copies."""
    tensors: list[Tensor] = []
    structure = _encode(state, tensors, {})
    return json.dumps({"format": FORMAT, "state": structure}), [t.detach().clone() for t in tensors]


def decode_state(structure: str, tensors: list[Tensor]) -> Any:
    """Inverse of ``encode_state``; raises ``StateError`` on anything malformed."""
    try:
        doc = json.loads(structure)
    except (TypeError, json.JSONDecodeError) as exc:
        raise StateError(f"the saved state structure is not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise StateError(f"not a purecomp state (expected format {FORMAT!r})")
    for t in tensors:
        if not isinstance(t, Tensor):
            raise StateError(f"a saved state tensor is a {type(t).__name__}, not a Tensor")
    return _decode(doc["state"], [t.clone() for t in tensors])


def save_state(path: str | Path, state: Any) -> Path:
    """Write ``state`` as one safetensors file (tensors ``t<i>``, the JSON structure in its metadata)."""
    from safetensors.torch import save_file

    structure, tensors = encode_state(state)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({f"t{i}": t.contiguous() for i, t in enumerate(tensors)}, str(path), metadata={"purecomp": structure})
    return path


def load_state(path: str | Path) -> Any:
    """Read a state written by ``save_state``."""
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError) as exc:
        raise StateError(f"cannot read a purecomp state from {str(path)!r}: {exc}") from None
    if "purecomp" not in metadata:
        raise StateError(f"{str(path)!r} is a safetensors file without a purecomp state")
    ordered = [tensors[f"t{i}"] for i in range(len(tensors)) if f"t{i}" in tensors]
    if len(ordered) != len(tensors):
        raise StateError(f"{str(path)!r}: unexpected tensor names {sorted(tensors)[:5]}")
    return decode_state(metadata["purecomp"], ordered)
