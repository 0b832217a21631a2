"""Calibration data: how a batch becomes model inputs, and taking N samples with a progress bar."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from torch import Tensor
from tqdm.auto import tqdm

from .errors import CalibrationError


def batch_inputs(batch: Any) -> tuple[tuple, dict]:
    """Model arguments of a batch: a tensor is the input; a tuple/list ``(x, y, ...)`` gives ``x``;
    a mapping gives keyword arguments (``labels`` dropped, as a HuggingFace model takes it as a loss input)."""
    if isinstance(batch, Tensor):
        return (batch,), {}
    if isinstance(batch, (tuple, list)) and batch:
        first = batch[0]
        if isinstance(first, (tuple, list)):
            return tuple(first), {}
        return (first,), {}
    if isinstance(batch, Mapping):
        return (), {k: v for k, v in batch.items() if k != "labels"}
    raise CalibrationError(
        f"cannot take model inputs from a batch of type {type(batch).__name__}; expected a Tensor, "
        "a tuple/list whose first element is the input, or a mapping of keyword inputs"
    )


def batch_size(args: tuple, kwargs: dict) -> int:
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return 1


def take_samples(data: Iterable[Any] | None, num_samples: int, what: str) -> Iterator[tuple[tuple, dict]]:
    """Yield ``(args, kwargs)`` batches until ``num_samples`` samples were seen (fewer if the data ends)."""
    if data is None:
        raise CalibrationError(f"{what} needs calibration data, got None")
    if num_samples <= 0:
        return
    seen = 0
    with tqdm(total=num_samples, desc=what, unit="sample", leave=False, disable=None) as bar:
        for batch in data:
            args, kwargs = batch_inputs(batch)
            n = batch_size(args, kwargs)
            yield args, kwargs
            seen += n
            bar.update(min(n, num_samples - bar.n))
            if seen >= num_samples:
                break
    if seen == 0:
        raise CalibrationError(f"{what}: the calibration data yielded no batch")
