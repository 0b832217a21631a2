"""AutoQ entry points: ``autoq_precision`` (standalone, like ``hawq_precision``) and the ``autoq``
initializer for ``quantization(precision=autoq(...))`` and ``initializer.precision.type: autoq``."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from torch import Tensor

from purecomp.errors import ConfigError
from purecomp.graph import ModelGraph
from purecomp.init_context import InitContext
from purecomp.scopes import Scope, select_sites
from purecomp.transforms.quantize.method import QuantizerSettings, activation_quantizers
from purecomp.transforms.quantize.placement import activation_targets, weight_targets
from purecomp.transforms.quantize.precision import PrecisionRequest
from purecomp.transforms.quantize.range_init import RangeInit

from .env import EvalFn, ModelEnvironment
from .options import AutoQOptions, autoq_options
from .report import AutoQReport
from .search import run_search

log = logging.getLogger(__name__)


def precision_report(request: PrecisionRequest, eval_fn: EvalFn, eval_data: Iterable[Any] | None,
                     options: AutoQOptions, path: str = "", progress_bar: bool = True) -> AutoQReport:
    """Run AutoQ for the quantizers of ``request``; ``eval_data`` defaults to ``request.data``."""
    data = eval_data if eval_data is not None else request.data
    if data is None:
        raise ConfigError(path.rstrip("."), "type 'autoq' needs evaluation data for eval_fn: pass eval_data= "
                                            "(or calibration data to init)")
    env = ModelEnvironment(request, eval_fn, data, options, path)
    report = run_search(env, options, path, progress_bar)
    log.info("AutoQ: best score %.4g (INT8 %.4g) at episode %d, size ratio %.4f, weight bits %s",
             report.score, report.baseline, report.best_episode, report.ratio, report.weight_bits)
    return report


def autoq_precision(
    graph: ModelGraph,
    params: Mapping[str, Tensor],
    data: Iterable[Any],
    eval_fn: EvalFn,
    eval_data: Iterable[Any] | None = None,
    *,
    weights: QuantizerSettings | Mapping[str, Any] | None = None,
    activations: QuantizerSettings | Mapping[str, Any] | None = None,
    range_init: RangeInit | None = None,
    ignored_scopes: Sequence[str] = (),
    target_scopes: Sequence[str] | None = None,
    quantize_inputs: bool = True,
    quantize_outputs: bool = False,
    progress_bar: bool = True,
    scope: Scope | None = None,
    **options: Any,
) -> AutoQReport:
    """AutoQ for the quantizers ``quantization`` would place with the same arguments.

    ``data`` calibrates the activation ranges; ``eval_fn(model_apply, loader) -> float`` scores a
    policy (higher is better) on ``eval_subset_ratio`` of ``eval_data`` (default ``data``).
    ``options`` are ``AutoQOptions`` fields; ``scope`` restricts the sites further. ``report.plan`` goes
    to ``quantization(precision=...)``."""
    allowed = select_sites(graph, ignored_scopes, target_scopes, "", scope)
    w_targets = weight_targets(graph, allowed)
    a_targets = activation_targets(graph, allowed, quantize_inputs=quantize_inputs, quantize_outputs=quantize_outputs)
    a_settings = QuantizerSettings.of(activations, "activations")
    init_cfg = range_init or RangeInit()
    context = InitContext.start(graph, params, data)
    request = PrecisionRequest(
        graph, context.params, data, tuple(w_targets), tuple(a_targets),
        QuantizerSettings.of(weights, "weights").for_weights(context.calibration_mode),
        activation_quantizers=lambda plan: activation_quantizers(context, a_targets, a_settings, plan, init_cfg),
        context=context,
    )
    return precision_report(request, eval_fn, eval_data, autoq_options(options), "", progress_bar)


@dataclasses.dataclass(frozen=True)
class AutoQ:
    """Precision initializer for ``quantization(precision=autoq(...))``: AutoQ at ``init``;
    ``report`` after the call holds the last search's ``AutoQReport``."""

    eval_fn: EvalFn
    options: AutoQOptions
    eval_data: Iterable[Any] | None = None
    path: str = ""
    progress_bar: bool = True
    reports: list[AutoQReport] = dataclasses.field(default_factory=list, compare=False, repr=False)

    def __call__(self, request: PrecisionRequest) -> dict[str, int]:
        report = precision_report(request, self.eval_fn, self.eval_data, self.options, self.path, self.progress_bar)
        self.reports.append(report)
        return report.plan

    @property
    def report(self) -> AutoQReport | None:
        return self.reports[-1] if self.reports else None


def autoq(eval_fn: EvalFn, *, eval_data: Iterable[Any] | None = None, path: str = "", progress_bar: bool = True,
          **options: Any) -> AutoQ:
    """An AutoQ precision initializer (``options``: ``AutoQOptions`` fields); ``eval_data`` feeds
    ``eval_fn`` (default: the calibration data given to ``init``); ``path`` prefixes error paths."""
    return AutoQ(eval_fn, autoq_options(options, path), eval_data, path, progress_bar)
