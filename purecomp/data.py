"""Calibration data: how a batch becomes model inputs, and taking N samples with a progress bar."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
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


def describe_inputs(args: tuple, kwargs: dict) -> str:
    """``Tensor[2, 3, 8, 8] float32, y=Tensor[2] int64``: what a batch gave the model, for error messages."""
    def one(v: Any) -> str:
        if isinstance(v, Tensor):
            return f"Tensor{list(v.shape)} {str(v.dtype).removeprefix('torch.')}"
        return type(v).__name__
    return ", ".join([one(a) for a in args] + [f"{k}={one(v)}" for k, v in kwargs.items()]) or "no inputs"


def check_finite(args: tuple, kwargs: dict, what: str, index: int) -> None:
    """``CalibrationError`` when a floating-point input of batch ``index`` holds NaN or inf."""
    named = [(f"input {i}", a) for i, a in enumerate(args)] + [(f"input {k!r}", v) for k, v in kwargs.items()]
    for name, value in named:
        if isinstance(value, Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise CalibrationError(f"{what}: calibration batch {index}, {name} holds {bad} NaN or inf values; "
                                   "expected finite data")


def batch_size(args: tuple, kwargs: dict) -> int:
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return 1


def take_samples(data: Iterable[Any] | None, num_samples: int, what: str) -> Iterator[tuple[tuple, dict]]:
    """Yield ``(args, kwargs)`` batches until ``num_samples`` samples were seen (fewer if the data ends).
    ``CalibrationError`` for a batch that holds NaN or inf, or when the data yield no batch."""
    if data is None:
        raise CalibrationError(f"{what} needs calibration data, got None")
    if num_samples <= 0:
        return
    seen = 0
    with tqdm(total=num_samples, desc=what, unit="sample", leave=False, disable=None) as bar:
        for index, batch in enumerate(data):
            args, kwargs = batch_inputs(batch)
            check_finite(args, kwargs, what, index)
            n = batch_size(args, kwargs)
            yield args, kwargs
            seen += n
            bar.update(min(n, num_samples - bar.n))
            if seen >= num_samples:
                break
    if seen == 0:
        raise CalibrationError(f"{what}: the calibration data yielded no batch")
