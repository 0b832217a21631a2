"""Precision plans: a mapping quantizer key -> bits, or an initializer that computes one at ``init``.

An initializer (HAWQ, a manual per-scope table) is called with a ``PrecisionRequest`` holding
what ``quantization``'s ``init`` knows: the graph, the params (as transformed by earlier members of a chain), the
calibration data, the quantizer targets and the weight settings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from torch import Tensor

from purecomp.errors import ConfigError, QuantizerRangeError
from purecomp.graph import ModelGraph
from purecomp.ops.levels import check_bits

from .placement import ActivationTarget, WeightTarget


@dataclasses.dataclass(frozen=True)
class PrecisionRequest:
    """Inputs of a precision initializer; ``origin`` prefixes the JSON path of its errors."""

    graph: ModelGraph
    params: Mapping[str, Tensor]
    data: Iterable[Any] | None
    weights: tuple[WeightTarget, ...]
    activations: tuple[ActivationTarget, ...]
    weight_settings: Any  # QuantizerSettings with logarithm_scale decided (QuantizerSettings.for_weights)
    origin: str = ""
    # plan -> the activation quantizers ``quantization`` would build for it (calibrated on ``data``);
    # set by ``quantization``'s ``init`` for initializers that evaluate the quantized model (AutoQ)
    activation_quantizers: Callable[[Mapping[str, int]], Mapping[str, Any]] | None = None
    # the init context (earlier members of a chain); initializers that run the model apply its sites
    context: Any = None


class PrecisionInit(Protocol):
    def __call__(self, request: PrecisionRequest) -> Mapping[str, int]: ...


Precision = Mapping[str, int] | PrecisionInit


def check_plan(plan: Mapping[str, int], origin: str) -> dict[str, int]:
    """The plan as a dict; each value must be a valid bit width (``ConfigError`` naming the key)."""
    for key, bits in plan.items():
        try:
            check_bits(bits)
        except QuantizerRangeError as exc:
            raise ConfigError(f"{origin}precision[{key!r}]", str(exc)) from None
    return dict(plan)


def resolve_plan(precision: Precision | None, request: PrecisionRequest) -> dict[str, int]:
    """The plan itself, or the plan an initializer computes for ``request``."""
    if precision is None:
        return {}
    if callable(precision):
        return check_plan(precision(request), request.origin)
    return dict(precision)
