"""Calibration passes: run samples through a traced model with observers at chosen sites."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .apply import call_with_sites
from .compression import _compose_sites
from .data import take_samples
from .graph import ModelGraph
from .intercept import SiteFn


def run_observers(
    graph: ModelGraph,
    params: Mapping[str, Tensor],
    keys: Sequence[str],
    record: Callable[[str, Tensor], None],
    data: Iterable[Any] | None,
    num_samples: int,
    what: str,
) -> None:
    """Run ``num_samples`` samples of ``data`` through ``graph.model`` in eval mode, without
    gradients, calling ``record(key, x)`` with the tensor ``x`` at each site in ``keys`` (which
    passes through unchanged). A compression applied before this one (``graph.prior``)
    transforms the parameters and runs its own sites first, so ``record`` sees what the
    compressed model computes. ``what`` names the pass in errors and progress."""

    def observer(key: str) -> SiteFn:
        def observe(x: Tensor) -> Tensor:
            record(key, x)
            return x

        return observe

    prior_sites: dict[str, SiteFn] = {}
    if graph.prior is not None:
        params = graph.prior.method.params(params, graph.prior.state)
        prior_sites = graph.prior.method.sites(graph.prior.state)
    sites = _compose_sites([prior_sites, {key: observer(key) for key in keys}])
    model = graph.model
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for args, kwargs in take_samples(data, num_samples, what):
                call_with_sites(model, params, sites, args, kwargs)
    finally:
        model.train(was_training)
