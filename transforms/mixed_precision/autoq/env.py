"""The AutoQ environment of a model: units of weight quantizers, their features and sizes, and the
score of a policy from the user's ``eval_fn`` on a fixed subset of the evaluation data.

A policy's quantized model is exactly what ``quantization(precision=plan)`` builds: the quantizers
are calibrated once (widest bits) and re-bitted per policy, since their ranges do not depend on
the bits. Activations take their bits from the weights they feed (``CostModel.activation_bits``:
strict = the widest, liberal = the narrowest); those feeding no weighted op keep the widest.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from purecomp.apply import call_with_sites
from purecomp.errors import ConfigError, StateError
from purecomp.transforms.quantize.method import QuantizerSettings, weight_quantizer
from purecomp.transforms.quantize.precision import PrecisionRequest

from ..complexity import CostModel
from ..hardware import hardware_setting
from .features import graph_order, unit_features
from .options import AutoQOptions

EvalFn = Callable[[Callable[..., Any], Iterable[Any]], float]


def eval_subset(data: Iterable[Any], ratio: float, seed: int, origin: str = "") -> Iterable[Any]:
    """``ratio`` of ``data``: a ``DataLoader`` over ``ceil(ratio N)`` samples drawn once with ``seed``
    (same batch size, no shuffling); a sized sequence of batches: its first ``ceil(ratio N)``."""
    if ratio >= 1:
        return data
    if isinstance(data, DataLoader):
        n = len(data.dataset)  # type: ignore[arg-type]
        keep = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: max(1, math.ceil(ratio * n))]
        return DataLoader(Subset(data.dataset, sorted(keep.tolist())), batch_size=data.batch_size,
                          collate_fn=data.collate_fn)
    if isinstance(data, Sequence):
        return list(data[: max(1, math.ceil(ratio * len(data)))])
    raise ConfigError(f"{origin}eval_subset_ratio", f"{ratio} needs a DataLoader or a list of batches to subset; "
                                                    f"got {type(data).__name__} (give 1.0 or such data)")


@dataclasses.dataclass
class ModelEnvironment:
    """The ``Environment`` of ``search.run_search`` for the quantizers of ``request``."""

    request: PrecisionRequest
    eval_fn: EvalFn
    eval_data: Iterable[Any]
    options: AutoQOptions
    origin: str = ""

    def __post_init__(self) -> None:
        r, o = self.request, self.options
        if r.activation_quantizers is None:
            raise StateError("AutoQ evaluates the quantized model and needs the activation quantizers; run it as "
                             "quantization(precision=autoq(...)) or autoq_precision(...)")
        hw = hardware_setting(o.target_device, o.bits, o.bitwidth_assignment_mode, origin=self.origin)
        self.bits = hw.bits
        self.widest = hw.bits[-1]
        self.cost = CostModel.build(r.graph, r.weights, r.activations)
        readers = {t.param: t.readers for t in r.weights}
        groups = self.cost.groups() if o.bitwidth_assignment_mode == "strict" else [(t.param,) for t in r.weights]
        units = [groups[i] for i in graph_order(r.graph, groups, readers)]
        shapes = {w: tuple(r.params[w].shape) for w in readers}
        self.names = tuple(tuple(u) for u in units)
        self.sizes = tuple(sum(math.prod(shapes[w]) for w in u) for u in units)
        self.features = unit_features(r.graph, units, readers, shapes)
        settings = QuantizerSettings.of(r.weight_settings, f"{r.origin}weights")
        targets = {t.param: t for t in r.weights}
        self._weights = {w: weight_quantizer(targets[w], r.params[w], settings, self.widest) for w in targets}
        self._activations = dict(r.activation_quantizers({t.key: self.widest for t in r.activations}))
        self._compose = r.context.with_sites if r.context is not None else dict
        self._data = eval_subset(self.eval_data, o.eval_subset_ratio, o.seed, self.origin)

    def plan(self, policy: Sequence[int]) -> dict[str, int]:
        """Quantizer key -> bits: the units' weights, then the activations they feed."""
        weights = {w: int(b) for unit, b in zip(self.names, policy) for w in unit}
        acts = self.cost.activation_bits(weights, self.options.bitwidth_assignment_mode, self.widest)
        return {**weights, **acts}

    def complexity_ratio(self, policy: Sequence[int]) -> float:
        """HAWQ's bit-complexity ratio of the policy: ``complexity(all 8) / complexity(policy)``."""
        plan = self.plan(policy)
        weights = {w: plan[w] for unit in self.names for w in unit}
        acts = {k: plan[k] for k in self.cost.activation_consumers}
        return self.cost.reference() / max(self.cost.complexity(weights, acts), 1e-12)

    def model_apply(self, plan: Mapping[str, int]) -> Callable[..., Any]:
        """``f(*inputs)`` running the model quantized with ``plan`` (no grad, model in eval mode)."""
        params: dict[str, Tensor] = dict(self.request.params)
        with torch.no_grad():
            for w, q in self._weights.items():
                params[w] = dataclasses.replace(q, bits=plan[w])(params[w])
        sites = self._compose({
            k: dataclasses.replace(q, bits=plan.get(k, q.bits)) for k, q in self._activations.items()})
        model = self.request.graph.model

        def run(*args: Any, **kwargs: Any) -> Any:
            with torch.no_grad():
                return call_with_sites(model, params, sites, args, kwargs)

        return run

    def evaluate(self, policy: Sequence[int]) -> float:
        model = self.request.graph.model
        was_training = model.training
        model.eval()
        try:
            return self.eval_fn(self.model_apply(self.plan(policy)), self._data)
        finally:
            model.train(was_training)
