"""Saving and loading compression state: JSON for the structure, tensors kept apart.

A state (structs, dicts, tuples, lists, tensors, plain values) is encoded as a JSON document
in which every tensor is replaced by ``{"$tensor": i}``, plus the list of tensors. Decoding
rebuilds only dataclasses defined inside ``purecomp`` (state structs and their static
settings) and the state classes registered with ``purecomp.register_algorithm``: nothing is
imported by a name read from the file, and nothing else is called, so a checkpoint cannot run
code. ``save_record`` / ``load_record`` are the one file format (safetensors: the tensors, the JSON in
its metadata) of ``save_state`` and of the transformers integration's state file; ``encode_state`` / ``decode_state`` give the same pair for ``torch.save`` payloads
(tensors and strings only, loadable with ``weights_only=True``).

Every file is written crash-safely (``atomic_write``): to a temporary file in the same folder,
flushed and fsynced, then renamed over the old one, so a crash mid-write leaves the previous
file whole. ``save_torch`` / ``load_torch`` do this for ``torch.save`` payloads (the samples'
``last.pt`` / ``best.pt``); every unreadable, truncated or corrupted file raises ``StateError``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import sys
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import torch
from torch import Tensor

from .errors import StateError
from .registry import STATE_CLASSES, class_name

FORMAT = "purecomp-state-1"


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
        return {"$class": class_name(cls), "fields": fields}
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
    """The class a checkpoint names: one registered with ``register_algorithm(state_classes=...)``
    or a dataclass of an already imported ``purecomp`` module. Nothing is imported."""
    registered = STATE_CLASSES.get(name)
    if registered is not None:
        return registered
    module_name, _, qualname = name.partition(":")
    if not (module_name == "purecomp" or module_name.startswith("purecomp.")):
        raise StateError(f"state class {name!r} is not a purecomp class and was not registered with "
                         "purecomp.register_algorithm(..., state_classes=...); refusing to load it")
    obj: Any = sys.modules.get(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    if not (isinstance(obj, type) and dataclasses.is_dataclass(obj)):
        raise StateError(f"state class {name!r} does not exist in this version of purecomp")
    return obj


def _expect(value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise StateError(f"malformed saved state: {what} is a {type(value).__name__}")
    return value


def _decode_tensor(value: dict[str, Any], tensors: list[Tensor]) -> Tensor:
    index = value["$tensor"]
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(tensors):
        raise StateError(f"state refers to tensor {index!r}, but the checkpoint holds {len(tensors)} tensors")
    tensor = tensors[index]
    trainable = bool(value.get("requires_grad", False))
    if trainable and not (tensor.is_floating_point() or tensor.is_complex()):
        raise StateError(f"saved tensor {index} ({tensor.dtype}) is marked trainable; only float tensors can be")
    return tensor.requires_grad_(trainable)


def _decode_dtype(name: Any) -> torch.dtype:
    dtype = getattr(torch, str(name).removeprefix("torch."), None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise StateError(f"malformed saved state: {name!r} is not a torch dtype")
    return dtype


def _decode(value: Any, tensors: list[Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "$tensor" in value:
        return _decode_tensor(value, tensors)
    if "$class" in value:
        name = _expect(value["$class"], str, "a class name")
        cls = _resolve(name)
        fields = {k: _decode(v, tensors) for k, v in _expect(value.get("fields"), dict, f"the fields of {name}").items()}
        try:
            return cls(**fields)
        except TypeError as exc:
            raise StateError(f"cannot rebuild {name}: {exc}") from None
    if "$dict" in value:
        return {k: _decode(v, tensors) for k, v in _expect(value["$dict"], dict, "a $dict entry").items()}
    if "$tuple" in value:
        return tuple(_decode(v, tensors) for v in _expect(value["$tuple"], list, "a $tuple entry"))
    if "$dtype" in value:
        return _decode_dtype(value["$dtype"])
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
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or "state" not in doc:
        raise StateError(f"not a purecomp state (expected format {FORMAT!r} with a 'state')")
    for t in tensors:
        if not isinstance(t, Tensor):
            raise StateError(f"a saved state tensor is a {type(t).__name__}, not a Tensor")
    return _decode(doc["state"], [t.clone() for t in tensors])


# ------------------------------------------------------------------ crash-safe files

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], object]) -> Path:
    """Write a file crash-safely: ``write(f)`` fills a temporary file beside ``path`` (same folder,
    so the rename cannot cross file systems), which is flushed, fsynced and renamed over ``path``;
    the folder is fsynced too. A crash or an exception at any point leaves the previous file as
    it was (the temporary file is removed when an exception is raised; a killed process may leave
    a ``.<name>.*.tmp`` file behind, never a damaged ``path``). Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(temporary, 0o666 & ~_UMASK)  # mkstemp makes it 0600; give it an ordinary file's mode
        with os.fdopen(handle, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)
    return path


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_torch(path: str | Path, obj: Any) -> Path:
    """``torch.save(obj)`` to ``path`` crash-safely (``atomic_write``). Keep ``obj`` to tensors and
    plain values so that ``load_torch`` (``weights_only=True``) reads it back."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def load_torch(path: str | Path, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``; a missing, truncated or corrupted file, or one that
    needs pickled code, raises ``StateError`` naming the file, never a raw pickle or zip error."""
    path = Path(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (OSError, EOFError, RuntimeError, ValueError, KeyError, IndexError, TypeError, AttributeError,
            UnicodeDecodeError, pickle.UnpicklingError, zipfile.BadZipFile) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StateError(f"cannot read a checkpoint from {str(path)!r} "
                         f"(truncated, corrupted, or not a weights-only torch.save file): "
                         f"{type(exc).__name__}: {reason}") from None


# ------------------------------------------------------------------ one file format

RECORD_FORMAT = "purecomp-record-1"
_LEGACY_FORMATS = ("purecomp-transformers-1",)


def save_record(
    path: str | Path,
    record: Mapping[str, Any],
    extra_tensors: Mapping[str, Tensor] | None = None,
    extra_metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write a compression record (``{"structure": ..., "tensors": [...], ...}``: what
    ``encode_state`` or ``CompressionController.get_compression_state`` returns) as one
    safetensors file: tensors ``state.<i>`` (and ``extra.<name>``), every other key JSON in the
    metadata. The file is written with ``atomic_write``, so a crash mid-write leaves the previous
    file intact."""
    from safetensors.torch import save

    tensors = {f"state.{i}": t.detach().cpu().contiguous() for i, t in enumerate(record["tensors"])}
    tensors |= {f"extra.{k}": v.detach().cpu().contiguous() for k, v in (extra_tensors or {}).items()}
    metadata = {"format": RECORD_FORMAT, "record": json.dumps({k: v for k, v in record.items() if k != "tensors"})}
    metadata |= {f"extra.{k}": v for k, v in (extra_metadata or {}).items()}
    payload = save(tensors, metadata=metadata)
    return atomic_write(path, lambda f: f.write(payload))


def load_record(path: str | Path) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, str]]:
    """``(record, extra_tensors, extra_metadata)`` of a ``save_record`` file; ``StateError`` for
    anything that is not one (files of ``save_state`` and the transformers integration written by
    earlier versions are read too)."""
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError) as exc:
        raise StateError(f"cannot read a purecomp state from {str(path)!r}: {exc}") from None
    if metadata.get("format") == RECORD_FORMAT:
        try:
            record = json.loads(metadata["record"])
        except (KeyError, json.JSONDecodeError) as exc:
            raise StateError(f"{str(path)!r}: the record metadata is damaged ({exc})") from None
        if not isinstance(record, dict):
            raise StateError(f"{str(path)!r}: the record metadata is damaged (a {type(record).__name__}, not an object)")
        prefix = "state."
        extras = {k.removeprefix("extra."): v for k, v in metadata.items() if k.startswith("extra.")}
    elif metadata.get("format") in _LEGACY_FORMATS:
        try:
            record = {k: json.loads(v) for k, v in metadata.items() if k not in ("format", "activation_options")}
        except json.JSONDecodeError as exc:
            raise StateError(f"{str(path)!r}: the state metadata is damaged ({exc})") from None
        prefix = "state."
        extras = {"activation_options": metadata["activation_options"]} if "activation_options" in metadata else {}
        tensors = {(f"extra.{k[len('example.'):]}" if k.startswith("example.") else k): v for k, v in tensors.items()}
    elif "purecomp" in metadata:  # save_state before the record format
        record, prefix, extras = {"structure": metadata["purecomp"]}, "t", {}
    else:
        raise StateError(f"{str(path)!r} is a safetensors file without a purecomp state")
    count = sum(1 for k in tensors if k.startswith(prefix) and k[len(prefix):].isdigit())
    missing = [f"{prefix}{i}" for i in range(count) if f"{prefix}{i}" not in tensors]
    if missing:
        raise StateError(f"{str(path)!r}: missing tensors {missing[:5]}")
    record["tensors"] = [tensors[f"{prefix}{i}"] for i in range(count)]
    extra_tensors = {k.removeprefix("extra."): v for k, v in tensors.items() if k.startswith("extra.")}
    return record, extra_tensors, extras


def save_state(path: str | Path, state: Any) -> Path:
    """Write ``state`` as one safetensors file (``save_record`` of ``encode_state``)."""
    structure, tensors = encode_state(state)
    return save_record(path, {"structure": structure, "tensors": tensors})


def load_state(path: str | Path) -> Any:
    """Read a state written by ``save_state``."""
    record, _, _ = load_record(path)
    return decode_state(record["structure"], record["tensors"])
