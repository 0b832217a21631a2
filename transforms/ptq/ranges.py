"""MSE-optimal clipping: shrink a quantizer's range to the ratio that minimises its error.

For a quantizer ``Q`` with range parameters ``r`` (symmetric: ``scale``; asymmetric:
``input_low`` and ``input_range``) and candidates ``alpha`` in ``RATIOS``, the chosen range is
``alpha* r`` with ``alpha* = argmin_alpha sum (Q_{alpha r}(x) - x)^2`` over the tensor ``x``
(a weight, per output channel when the quantizer is per channel; a sample of an activation's
calibration values, per tensor). ``alpha = 1`` (min-max) is a candidate, so the error never
exceeds min-max's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from purecomp.calibration import run_observers
from purecomp.transforms.quantize.quantizer import range_fields, rescaled

RATIOS = tuple(float(r) for r in torch.linspace(0.3, 1.0, 36))
SAMPLE_CAP = 1 << 16  # activation values kept per batch and quantizer


def _squared_error(quantizer: Any, x: Tensor, axis: int | None) -> Tensor:
    err = (quantizer(x) - x).double().square()
    if axis is None:
        return err.sum()
    dims = [d for d in range(x.dim()) if d != axis % x.dim()]
    return err.sum(dim=dims)


def mse_quantizer(quantizer: Any, x: Tensor, ratios: Sequence[float] = RATIOS) -> Any:
    """The quantizer with the range ratio of least squared error on ``x`` (per channel along
    ``quantizer.axis``, else per tensor); trainable leaves stay trainable."""
    x = x.detach()
    with torch.no_grad():
        errors = torch.stack([_squared_error(rescaled(quantizer, a), x, quantizer.axis) for a in ratios])
    best = torch.tensor(ratios, dtype=torch.float32, device=errors.device)[errors.argmin(dim=0)]
    chosen = rescaled(quantizer, best)
    return dataclasses.replace(chosen, **{f: getattr(chosen, f).detach().clone().requires_grad_(
        getattr(quantizer, f).requires_grad) for f in range_fields(quantizer)})


def mse_weight_quantizers(quantizers: Mapping[str, Any], params: Mapping[str, Tensor]) -> dict[str, Any]:
    """``mse_quantizer`` of each weight quantizer on its (transformed) weight."""
    return {name: mse_quantizer(q, params[name]) for name, q in quantizers.items()}


def activation_samples(
    model: nn.Module, params: Mapping[str, Tensor], compose: Any, keys: Sequence[str], data: Iterable[Any],
    num_samples: int,
) -> dict[str, Tensor]:
    """Up to ``SAMPLE_CAP`` evenly strided values per batch of each tensor at ``keys``."""
    seen: dict[str, list[Tensor]] = {k: [] for k in keys}

    def record(key: str, x: Tensor) -> None:
        flat = x.detach().float().reshape(-1)
        seen[key].append(flat[:: max(1, flat.numel() // SAMPLE_CAP)].clone())

    run_observers(model, params, compose, keys, record, data, num_samples, "MSE range search")
    return {k: torch.cat(v) for k, v in seen.items() if v}


def mse_activation_quantizers(quantizers: Mapping[str, Any], samples: Mapping[str, Tensor]) -> dict[str, Any]:
    """``mse_quantizer`` of each per-tensor activation quantizer on its calibration sample."""
    return {key: mse_quantizer(q, samples[key]) if key in samples and q.axis is None else q
            for key, q in quantizers.items()}
