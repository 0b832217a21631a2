"""The quantization member of a PTQ state: the state itself, or the last member of a chain's
tuple (SmoothQuant, then quantization), and the state with it replaced or emptied."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any


def quantization_state(state: Any) -> Any:
    """The ``QuantizationState`` of ``state``: itself, or the last member of a chain's tuple
    (whatever that member is, for the caller to check)."""
    return state[-1] if isinstance(state, tuple) and state else state


def map_quantization(state: Any, fn: Callable[[Any], Any]) -> Any:
    """``state`` with its ``QuantizationState`` (``quantization_state``) replaced by ``fn`` of it."""
    return (*state[:-1], fn(state[-1])) if isinstance(state, tuple) and state else fn(state)


def without_quantization(state: Any) -> Any:
    """``state`` with every quantizer removed (the earlier chain members' transforms only)."""
    return map_quantization(state, lambda q: dataclasses.replace(q, weights={}, activations={}, consumers=()))
