"""``InitContext``: what a method's ``init`` receives.

A method initialized on its own sees the model's params and calibrates the plain model. Inside
``chain(a, b)``, ``b`` sees ``a``'s weight transform already applied to ``params``, and its
calibration runs apply ``a``'s weights and sites first, so ``b`` measures what the compressed
model computes. The context carries that explicitly; nothing rides on the graph.

``calibration_mode`` says how calibration runs the model (``purecomp.calibration``). The default,
``"auto"``, follows the model's mode when the context is made: a model in train mode (as a
freshly built one is) is calibrated as training will see it: BatchNorm normalizes each batch with
its own statistics (running statistics left untouched); a model in eval mode is calibrated in
eval mode. Calibrating a randomly initialized network in eval mode normalizes with running
statistics (mean 0, variance 1) that describe other activations than training produces: the
ranges then do not fit, and quantization-aware training from scratch collapsed (constant logits,
gradients 1e15 times FP32's; ``bench/qat_from_scratch.py``). ``"train"`` and ``"eval"`` force a mode.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from torch import Tensor

from .calibration import check_mode
from .compression import Compression, chain, compose_sites
from .graph import ModelGraph
from .intercept import SiteFn

Params = Mapping[str, Tensor]


@dataclasses.dataclass(frozen=True)
class InitContext:
    """The graph, the params as transformed by the earlier members of a chain, the calibration
    data, and those earlier members (``before`` with ``before_state``; ``None`` when first).

    ``model_params`` are the model's own params; ``scope`` (a ``purecomp.scopes.Scope`` or
    ``None``) restricts which sites a method may select (``purecomp.scoped``);
    ``calibration_mode`` (``"train"`` or ``"eval"``; ``"auto"`` is resolved to the model's mode
    when the context is made) is the mode ``calibrate`` runs the model in."""

    graph: ModelGraph
    params: Params
    data: Iterable[Any] | None
    model_params: Params
    before: Compression | None = None
    before_state: Any = None
    scope: Any = None
    calibration_mode: str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "calibration_mode", check_mode(self.calibration_mode, self.graph.model))

    @classmethod
    def start(cls, graph: ModelGraph, params: Params, data: Iterable[Any] | None = None,
              calibration_mode: str = "auto") -> InitContext:
        """The context of the first (or only) method: nothing applied yet."""
        return cls(graph, dict(params), data, dict(params), calibration_mode=calibration_mode)

    def then(self, method: Compression, state: Any) -> InitContext:
        """The context of the method after ``method`` (initialized to ``state``) in a chain."""
        if self.before is None:
            before, before_state = method, state
        else:
            before, before_state = chain(self.before, method), (self.before_state, state)
        params = before.params(self.model_params, before_state)
        return dataclasses.replace(self, params=params, before=before, before_state=before_state)

    def before_sites(self) -> dict[str, SiteFn]:
        """The activation transforms of the earlier members (empty when first)."""
        return {} if self.before is None else dict(self.before.sites(self.before_state))

    def with_sites(self, sites: Mapping[str, SiteFn]) -> dict[str, SiteFn]:
        """``sites`` run after the earlier members' transforms at the same keys."""
        return compose_sites([self.before_sites(), sites])

    def calibrate(
        self, keys: Sequence[str], record: Callable[[str, Tensor], None], num_samples: int, what: str,
        data: Iterable[Any] | None = None, mode: str | None = None,
    ) -> None:
        """Run ``num_samples`` samples (of ``data``, default the context's) through the model with
        the earlier members applied, in ``mode`` (default ``calibration_mode``), calling
        ``record(key, x)`` at each site in ``keys`` (``purecomp.calibration.run_observers``)."""
        from .calibration import run_observers

        run_observers(self.graph.model, self.params, self.with_sites, keys, record,
                      self.data if data is None else data, num_samples, what,
                      mode=self.calibration_mode if mode is None else mode)
