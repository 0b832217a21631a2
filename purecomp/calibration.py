"""Calibration passes: run samples through a model with observers at chosen sites."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .apply import call_with_sites
from .data import take_samples
from .intercept import SiteFn


def run_observers(
    model: nn.Module,
    params: Mapping[str, Tensor],
    compose: Callable[[Mapping[str, SiteFn]], Mapping[str, SiteFn]],
    keys: Sequence[str],
    record: Callable[[str, Tensor], None],
    data: Iterable[Any] | None,
    num_samples: int,
    what: str,
) -> None:
    """Run ``num_samples`` samples of ``data`` through ``model`` with ``params`` in eval mode,
    without gradients, calling ``record(key, x)`` with the tensor ``x`` at each site in ``keys``
    (which passes through unchanged). ``compose`` puts the observers behind the transforms that
    already act at those sites (``InitContext.with_sites``). ``what`` names the pass in errors
    and progress."""

    def observer(key: str) -> SiteFn:
        def observe(x: Tensor) -> Tensor:
            record(key, x)
            return x

        return observe

    sites = compose({key: observer(key) for key in keys})
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for args, kwargs in take_samples(data, num_samples, what):
                call_with_sites(model, params, sites, args, kwargs)
    finally:
        model.train(was_training)
