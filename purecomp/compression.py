"""The ``Compression`` value (init, params, sites, loss, step) and ``chain``.

A compression method is a value in the spirit of ``optax.GradientTransformation``: five pure
functions. ``chain(a, b)`` applies ``a`` first (its weight transform, then ``b``'s; at a
site, ``a``'s transform then ``b``'s), sums the losses and steps every member.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .graph import ModelGraph
from .intercept import SiteFn
from .struct import static_field, struct

Params = Mapping[str, Tensor]


@struct
class Progress:
    """Training progress handed to ``Compression.step`` and to schedules."""

    step: int = static_field(default=0)
    epoch: int = static_field(default=0)
    steps_per_epoch: int | None = static_field(default=None)

    @property
    def fractional_epoch(self) -> float:
        """``epoch + step_in_epoch / steps_per_epoch`` when steps per epoch are known, else ``epoch``."""
        if not self.steps_per_epoch:
            return float(self.epoch)
        return self.epoch + (self.step % self.steps_per_epoch) / self.steps_per_epoch


class Compression(NamedTuple):
    """A compression method as five pure functions.

    - ``init(graph, params, data) -> state``: build the state (may run calibration data).
    - ``params(params, state) -> params``: the weight-side transform.
    - ``sites(state) -> {key: fn}``: activation transforms at call sites.
    - ``loss(params, state) -> scalar``: the compression loss to add to the task loss.
    - ``step(state, progress, params=None) -> state``: the scheduler. Methods whose state
      depends on the weights (magnitude masks, pruned filters) recompute it from ``params``
      when their level changes, and raise ``StateError`` if ``params`` is missing then.
    """

    init: Callable[[ModelGraph, Params, Iterable[Any] | None], Any]
    params: Callable[[Params, Any], dict[str, Tensor]]
    sites: Callable[[Any], dict[str, SiteFn]]
    loss: Callable[[Params, Any], Tensor]
    step: Callable[..., Any]
    name: str = "compression"


@dataclasses.dataclass(frozen=True)
class Prior:
    """Methods already initialized ahead of this one in a chain; calibration runs through them."""

    method: Compression
    state: Any


def with_prior(graph: ModelGraph, method: Compression, state: Any) -> ModelGraph:
    """A copy of ``graph`` whose calibration runs apply ``method`` with ``state`` first."""
    if graph.prior is not None:
        method, state = chain(graph.prior.method, method), (graph.prior.state, state)
    return dataclasses.replace(graph, prior=Prior(method, state))


def identity() -> Compression:
    """The method that changes nothing (state ``()``)."""
    return Compression(
        init=lambda graph, params, data=None: (),
        params=lambda params, state: dict(params),
        sites=lambda state: {},
        loss=lambda params, state: torch.zeros(()),
        step=lambda state, progress, params=None: state,
        name="identity",
    )


def _compose_sites(tables: Iterable[dict[str, SiteFn]]) -> dict[str, SiteFn]:
    merged: dict[str, SiteFn] = {}
    for table in tables:
        for key, fn in table.items():
            if key in merged:
                first = merged[key]
                merged[key] = lambda x, f=first, g=fn: g(f(x))
            else:
                merged[key] = fn
    return merged


def chain(*methods: Compression) -> Compression:
    """Stack methods: state is the tuple of member states, applied in order."""
    if not methods:
        return identity()

    def init(graph: ModelGraph, params: Params, data: Iterable[Any] | None = None) -> tuple:
        states: list[Any] = []
        current = graph
        for method in methods:
            states.append(method.init(current, params, data))
            current = with_prior(graph, chain(*methods[: len(states)]), tuple(states))
        return tuple(states)

    def params_fn(params: Params, state: tuple) -> dict[str, Tensor]:
        out = dict(params)
        for method, s in zip(methods, state):
            out = method.params(out, s)
        return out

    def sites(state: tuple) -> dict[str, SiteFn]:
        return _compose_sites(method.sites(s) for method, s in zip(methods, state))

    def loss(params: Params, state: tuple) -> Tensor:
        total = torch.zeros(())
        for method, s in zip(methods, state):
            total = total + method.loss(params, s)
        return total

    def step(state: tuple, progress: Progress, params: Params | None = None) -> tuple:
        return tuple(method.step(s, progress, params) for method, s in zip(methods, state))

    return Compression(init, params_fn, sites, loss, step, name="+".join(m.name for m in methods))


def with_training(state: Any, training: bool) -> Any:
    """``state`` with every struct's static ``training`` flag set (stochastic parts such as RB
    gates sample only in training); structs without the flag are returned as they are."""
    if isinstance(state, tuple):
        return tuple(with_training(s, training) for s in state)
    if isinstance(state, list):
        return [with_training(s, training) for s in state]
    if dataclasses.is_dataclass(state) and not isinstance(state, type):
        names = {f.name for f in dataclasses.fields(state)}
        if "training" in names and state.training != training:
            return dataclasses.replace(state, training=training)
    return state
