"""Activation steps with few significant bits, so that every runtime rounds the same way.

PyTorch and ONNX Runtime quantize ``x`` as ``round(x / s)``. OpenVINO reads a QuantizeLinear /
DequantizeLinear pair as a FakeQuantize over the range ``[ql s, qh s]`` and computes
``round(x (qh - ql) / (qh s - ql s))``. With ``s = fl(1/255)`` (a range of 1.0 on a uint8 grid)
``255 s`` rounds to exactly 1.0 in float32, so OpenVINO puts ``x = 0.5`` on the tie 127.5 and
rounds it up, while ``0.5 / s = 127.49999`` rounds down: every pixel 8/16 of scikit-learn's
digits took a different integer in the two runtimes. A step of at most ``24 - 8 = 16``
significant bits makes ``(qh - ql) s`` and both ends of the range exact in float32, and the
two formulas then agree wherever float32 can tell them apart. Each step is rounded up,
``s' = ceil(m 2^b) 2^(e - b)`` for ``s = m 2^e`` with ``1/2 <= m < 1``, which widens a range by
less than ``2^(1 - b)`` of itself.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from torch import Tensor

from purecomp.transforms.quantize import SymmetricQuantizer

from .chain_state import map_quantization, quantization_state

log = logging.getLogger(__name__)


def short_steps(step: Tensor, bits: int) -> Tensor:
    """``step`` rounded up to ``bits`` significant bits (elementwise, float64 arithmetic)."""
    mantissa, exponent = torch.frexp(step.double())
    return torch.ldexp(torch.ceil(mantissa * 2.0**bits), exponent - bits)


def with_short_activation_steps(state: Any, bits: int) -> Any:
    """``state`` with the step ``(|scale| + eps) / qh`` of every symmetric activation quantizer
    rounded up to ``bits`` significant bits (``short_steps``; module docstring). Asymmetric
    quantizers are left as they are."""
    activations = dict(quantization_state(state).activations)
    skipped: list[str] = []
    for key, q in activations.items():
        if type(q) is not SymmetricQuantizer:
            skipped.append(key)
            continue
        qh = q.levels[1]
        scale = (short_steps(q.integer_grid()[0], bits) * qh).to(q.scale.dtype).reshape(q.scale.shape)
        activations[key] = dataclasses.replace(q, scale=scale.requires_grad_(q.scale.requires_grad))
    if skipped:
        log.info("activation steps kept (not linear symmetric quantizers): %s", ", ".join(skipped))
    return map_quantization(state, lambda q: dataclasses.replace(q, activations=activations))
