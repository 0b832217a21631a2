"""Calibration passes: run samples through a model with observers at chosen sites."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .apply import call_with_sites
from .data import describe_inputs, take_samples
from .errors import CalibrationError, PurecompError
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
            if x.is_floating_point() and not bool(torch.isfinite(x).all()):
                raise CalibrationError(f"{what}: site {key!r} saw NaN or inf on the calibration data; "
                                       "check the data (and the model) for non-finite values")
            record(key, x)
            return x

        return observe

    sites = compose({key: observer(key) for key in keys})
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for args, kwargs in take_samples(data, num_samples, what):
                try:
                    call_with_sites(model, params, sites, args, kwargs)
                except PurecompError:
                    raise
                except Exception as exc:  # the model refuses the batch: say which pass and what it got
                    raise CalibrationError(f"{what}: the model cannot run on a calibration batch "
                                           f"({describe_inputs(args, kwargs)}): {type(exc).__name__}: {exc}") from exc
    finally:
        model.train(was_training)
