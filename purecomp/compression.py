"""The ``Compression`` value (init, params, sites, loss, step) and ``chain``.

A compression method is a value in the spirit of ``optax.GradientTransformation``: five pure
functions. ``chain(a, b)`` applies ``a`` first (its weight transform, then ``b``'s; at a
site, ``a``'s transform then ``b``'s), sums the losses and steps every member.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .graph import ModelGraph
from .intercept import SiteFn
from .struct import static_field, struct

if TYPE_CHECKING:
    from .init_context import InitContext

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


class Compression:
    """A compression method as five pure functions.

    - ``init(context) -> state``: build the state from an ``InitContext`` (the graph, the params
      as transformed by the methods before this one in a chain, the calibration data and a
      calibration runner that applies those methods). Call it as
      ``method.init(graph, params, data)``; ``chain`` hands each member its own context.
    - ``params(params, state) -> params``: the weight-side transform.
    - ``sites(state) -> {key: fn}``: activation transforms at call sites.
    - ``loss(params, state) -> scalar``: the compression loss to add to the task loss.
    - ``step(state, progress, params=None) -> state``: the scheduler. Methods whose state
      depends on the weights (magnitude masks, pruned filters) recompute it from ``params``
      when their level changes, and raise ``StateError`` if ``params`` is missing then.

    ``members`` lists the methods of a chain (empty for a single method); the front door
    names state tensors after them.
    """

    __slots__ = ("initialize", "params", "sites", "loss", "step", "name", "members")

    def __init__(
        self,
        init: Callable[[InitContext], Any],
        params: Callable[[Params, Any], dict[str, Tensor]],
        sites: Callable[[Any], dict[str, SiteFn]],
        loss: Callable[[Params, Any], Tensor],
        step: Callable[..., Any],
        name: str = "compression",
        members: tuple[Compression, ...] = (),
    ) -> None:
        self.initialize = init
        self.params = params
        self.sites = sites
        self.loss = loss
        self.step = step
        self.name = name
        self.members = tuple(members)

    def init(self, graph: ModelGraph | InitContext, params: Params | None = None,
             data: Iterable[Any] | None = None, *, calibration_mode: str = "auto") -> Any:
        """``init(graph, params, data)`` for a method on its own, or ``init(context)`` inside a chain.

        ``calibration_mode`` (``"auto"``: the model's current mode, ``"train"``, ``"eval"``;
        ``InitContext.calibration_mode``) is the mode calibration passes run the model in; a given
        context carries its own."""
        from .init_context import InitContext

        if isinstance(graph, InitContext):
            return self.initialize(graph)
        if params is None:
            raise TypeError("Compression.init(graph, params, data): params are required")
        return self.initialize(InitContext.start(graph, params, data, calibration_mode=calibration_mode))

    def _replace(self, **changes: Any) -> Compression:
        """A copy with some functions replaced (``init=...`` replaces the initializer)."""
        fields = {"init": self.initialize, "params": self.params, "sites": self.sites, "loss": self.loss,
                  "step": self.step, "name": self.name, "members": self.members}
        unknown = set(changes) - set(fields)
        if unknown:
            raise TypeError(f"Compression has no field(s) {sorted(unknown)}")
        return Compression(**{**fields, **changes})

    def __repr__(self) -> str:
        return f"Compression(name={self.name!r})"


def identity() -> Compression:
    """The method that changes nothing (state ``()``)."""
    return Compression(
        init=lambda context: (),
        params=lambda params, state: dict(params),
        sites=lambda state: {},
        loss=lambda params, state: torch.zeros(()),
        step=lambda state, progress, params=None: state,
        name="identity",
    )


def compose_sites(tables: Iterable[Mapping[str, SiteFn]]) -> dict[str, SiteFn]:
    """Merge site tables; where two tables share a key, the earlier table's transform runs first."""
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
    """Stack methods: state is the tuple of member states, applied in order.

    Member ``i`` is initialized with the params transformed by members ``0..i-1`` and a
    calibration runner that applies their weight and site transforms (``InitContext.then``)."""
    if not methods:
        return identity()

    def init(context: InitContext) -> tuple:
        states: list[Any] = []
        current = context
        for method in methods:
            state = method.init(current)
            states.append(state)
            current = current.then(method, state)
        return tuple(states)

    def params_fn(params: Params, state: tuple) -> dict[str, Tensor]:
        out = dict(params)
        for method, s in zip(methods, state):
            out = method.params(out, s)
        return out

    def sites(state: tuple) -> dict[str, SiteFn]:
        return compose_sites(method.sites(s) for method, s in zip(methods, state))

    def loss(params: Params, state: tuple) -> Tensor:
        total = torch.zeros(())
        for method, s in zip(methods, state):
            total = total + method.loss(params, s)
        return total

    def step(state: tuple, progress: Progress, params: Params | None = None) -> tuple:
        return tuple(method.step(s, progress, params) for method, s in zip(methods, state))

    return Compression(init, params_fn, sites, loss, step, name="+".join(m.name for m in methods),
                       members=tuple(methods))


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
