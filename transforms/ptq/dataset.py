"""``Dataset``: calibration data for post-training quantization (NNCF 3.x's ``nncf.Dataset``).

``Dataset(data_source, transform_fn)`` wraps any iterable (a ``DataLoader``, a list of
batches) and maps each item to model input with ``transform_fn`` (identity when ``None``):
a tensor is the model's one positional input, a tuple / list its positional inputs, a dict its
keyword inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from purecomp.errors import CalibrationError


class Dataset:
    """Calibration items: ``transform_fn(item)`` for each ``item`` of ``data_source``."""

    def __init__(self, data_source: Iterable[Any], transform_fn: Callable[[Any], Any] | None = None) -> None:
        if not isinstance(data_source, Iterable):
            raise CalibrationError(f"Dataset needs an iterable data source, got {type(data_source).__name__}")
        if transform_fn is not None and not callable(transform_fn):
            raise CalibrationError(f"Dataset's transform_fn must be callable, got {type(transform_fn).__name__}")
        self.data_source = data_source
        self.transform_fn = transform_fn

    def get_data(self) -> Iterable[Any]:
        """The raw items."""
        return self.data_source

    def get_inference_data(self) -> Iterator[Any]:
        """The model inputs: ``transform_fn`` applied to each item."""
        for item in self.data_source:
            yield item if self.transform_fn is None else self.transform_fn(item)

    def __iter__(self) -> Iterator[Any]:
        return self.get_inference_data()


def model_inputs(item: Any) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of one model call: a tensor -> ``(item,)``; a tuple / list -> positional;
    a dict -> keyword inputs."""
    if isinstance(item, dict):
        return (), dict(item)
    if isinstance(item, (tuple, list)):
        return tuple(item), {}
    return (item,), {}
