"""BatchNorm adaptation: re-estimate running statistics with the compression active.

Pure: returns a new params dict whose BatchNorm buffers are fresh tensors holding the
cumulative average (``momentum=None``) of batch statistics over ``num_samples`` samples
run through ``apply`` in train mode; the model and the given tensors are not changed.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .apply import apply
from .compression import Compression
from .data import batch_size, take_samples

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _cumulative_bn(model: nn.Module) -> Iterator[list[tuple[str, nn.modules.batchnorm._BatchNorm]]]:
    """Train mode with ``momentum=None`` on every BatchNorm for the block; restored afterwards."""
    bns = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m, m.momentum) for _, m in bns]
    was_training = model.training
    model.train()
    try:
        for _, m in bns:
            m.momentum = None
        yield bns
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        model.train(was_training)


def adapt_batchnorm(
    model: nn.Module,
    method: Compression,
    params: Mapping[str, Tensor],
    state: Any,
    data: Iterable[Any],
    num_samples: int = 2000,
) -> dict[str, Tensor]:
    """Return ``params`` with BatchNorm running statistics re-estimated under ``method``."""
    out = dict(params)
    with _cumulative_bn(model) as bns:
        tracked = [(n, bn) for n, bn in bns if bn.track_running_stats and bn.running_mean is not None]
        if not tracked:
            return out
        for name, bn in tracked:
            prefix = f"{name}." if name else ""
            out[prefix + "running_mean"] = torch.zeros_like(bn.running_mean)
            out[prefix + "running_var"] = torch.ones_like(bn.running_var)
            out[prefix + "num_batches_tracked"] = torch.zeros_like(bn.num_batches_tracked)
        used = 0
        with torch.no_grad():
            for args, kwargs in take_samples(data, num_samples, "BN adaptation"):
                if batch_size(args, kwargs) < 2:
                    continue  # one sample gives no batch statistics (BatchNorm refuses it after pooling)
                apply(model, method, out, state, *args, **kwargs)
                used += 1
        if not used:
            log.warning("BN adaptation skipped: every calibration batch held a single sample")
    return out
