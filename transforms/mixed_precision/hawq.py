"""HAWQ-v2 mixed precision: Hessian-trace sensitivity, bit complexity, search, precision plan.

Sensitivity of weight ``i`` at ``b`` bits: ``S_i(b) = avg_trace(H_i) * ||Q_b(W_i) - W_i||_2^2``
with ``avg_trace = tr(H_i) / numel(W_i)`` (Hutchinson, ``traces.py``) and ``Q_b`` the weight
quantizer QAT starts from. The search (``search.py``) keeps the candidate with the least total
sensitivity whose compression ratio (``complexity.py``) reaches the target.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from purecomp.errors import ConfigError
from purecomp.graph import ModelGraph
from purecomp.scopes import Scope, key_matches, select_sites
from purecomp.transforms.quantize.method import QuantizerSettings, weight_quantizer
from purecomp.transforms.quantize.placement import activation_targets, weight_targets
from purecomp.transforms.quantize.precision import PrecisionRequest

from .complexity import CostModel
from .hardware import hardware_setting
from .report import PrecisionReport
from .search import search
from .traces import Criterion, collect_batches, hutchinson_traces

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class HawqOptions:
    """HAWQ settings (config keys of ``initializer.precision`` with ``type: hawq``).

    ``bits`` overrides the bit widths of ``target_device``; ``batch_size`` regroups the
    ``num_data_points`` samples (``None``: one batch); ``chunk`` probes share one ``vmap`` call;
    ``hvp_mode`` is ``reverse`` (vjp of grad) or ``forward`` (jvp of grad)."""

    bits: Sequence[int] | None = None
    target_device: str = "ANY"
    bitwidth_assignment_mode: str = "strict"
    compression_ratio: float = 1.5
    num_data_points: int = 100
    iter_number: int = 200
    tolerance: float = 1e-4
    seed: int = 0
    batch_size: int | None = None
    chunk: int = 10
    hvp_mode: str = "reverse"


def perturbation(target: Any, weight: Tensor, settings: QuantizerSettings, bits: int) -> float:
    """``||Q_b(W) - W||_2^2`` with the weight quantizer ``quantization`` would build at ``bits``."""
    with torch.no_grad():
        q = weight_quantizer(target, weight, settings, bits)
        return float((q(weight.detach()) - weight.detach()).pow(2).sum())


def precision_report(request: PrecisionRequest, criterion: Criterion, options: HawqOptions,
                     data: Iterable[Any] | None = None, path: str = "") -> PrecisionReport:
    """Run HAWQ for the quantizers in ``request``; ``path`` prefixes the JSON paths of errors."""
    hw = hardware_setting(options.target_device, options.bits, options.bitwidth_assignment_mode, origin=path)
    data = data if data is not None else request.data
    if data is None:
        raise ConfigError(path.rstrip("."), "type 'hawq' needs data: batches of (inputs, targets); pass "
                                            "init_data= (or calibration data to init)")
    if not 0 < options.compression_ratio:
        raise ConfigError(f"{path}compression_ratio", f"expected a positive number, got {options.compression_ratio}")
    settings = QuantizerSettings.of(request.weight_settings, f"{request.origin}weights")
    targets = {t.param: t for t in request.weights}
    cost = CostModel.build(request.graph, request.weights, request.activations)
    batches = collect_batches(data, options.num_data_points, options.batch_size)
    estimate = hutchinson_traces(
        request.graph.model, request.params, list(targets), batches, criterion, iter_number=options.iter_number,
        tolerance=options.tolerance, seed=options.seed, chunk=options.chunk, mode=options.hvp_mode,
    )
    traces = estimate.average
    sens = {
        name: {b: traces[name] * perturbation(t, request.params[name], settings, b) for b in hw.bits}
        for name, t in targets.items()
    }
    mode = options.bitwidth_assignment_mode
    units = cost.groups() if mode == "strict" else [(name,) for name in targets]
    unit_traces = [max(traces[w] for w in unit) for unit in units]
    unit_sens = [{b: sum(sens[w][b] for w in unit) for b in hw.bits} for unit in units]
    default = hw.bits[-1]
    reference = cost.reference()

    def expand(assignment: tuple[int, ...]) -> tuple[dict[str, int], dict[str, int]]:
        weight_bits = {w: b for unit, b in zip(units, assignment) for w in unit}
        return weight_bits, cost.activation_bits(weight_bits, mode, default)

    def ratio(assignment: tuple[int, ...]) -> float:
        return reference / max(cost.complexity(*expand(assignment)), 1e-12)

    best = search(unit_sens, unit_traces, hw.bits, ratio, options.compression_ratio, origin=path)
    weight_bits, act_bits = expand(best.bits)
    plan = {**weight_bits, **act_bits}
    log.info("HAWQ: ratio %.3f (target %g), weight bits %s", best.ratio, options.compression_ratio, weight_bits)
    return PrecisionReport(
        plan=plan, weight_bits=weight_bits, traces=traces,
        sensitivity={w: sens[w][b] for w, b in weight_bits.items()}, ratio=best.ratio,
        target=options.compression_ratio, bits=hw.bits, mode=mode, device=options.target_device,
        probes=estimate.probes, num_data_points=sum(_size(b) for b in batches),
    )


def _size(batch: Any) -> int:
    from purecomp.data import batch_size

    return batch_size(batch.args, batch.kwargs)


def hawq_precision(
    graph: ModelGraph,
    params: Mapping[str, Tensor],
    data: Iterable[Any],
    criterion: Criterion,
    *,
    weights: QuantizerSettings | Mapping[str, Any] | None = None,
    ignored_scopes: Sequence[str] = (),
    target_scopes: Sequence[str] | None = None,
    quantize_inputs: bool = True,
    quantize_outputs: bool = False,
    scope: Scope | None = None,
    **options: Any,
) -> PrecisionReport:
    """HAWQ for the quantizers ``quantization`` would place with the same arguments.

    ``data`` yields ``(inputs, targets)`` batches; ``criterion(outputs, targets)`` is the loss.
    ``options`` are ``HawqOptions`` fields; ``scope`` restricts the sites further. ``report.plan``
    goes to ``quantization(precision=...)``."""
    allowed = select_sites(graph, ignored_scopes, target_scopes, "", scope)
    request = PrecisionRequest(
        graph, params, data, tuple(weight_targets(graph, allowed)),
        tuple(activation_targets(graph, allowed, quantize_inputs=quantize_inputs, quantize_outputs=quantize_outputs)),
        # HAWQ calibrates nothing and never trains its quantizers: log(scale) and scale give the same values
        QuantizerSettings.of(weights, "weights").with_logarithm_scale(False),
    )
    return precision_report(request, criterion, _options(options, ""))


def _options(options: Mapping[str, Any], path: str) -> HawqOptions:
    known = {f.name for f in dataclasses.fields(HawqOptions)}
    for key in options:
        if key not in known:
            raise ConfigError(f"{path}{key}", f"unknown HAWQ option; expected one of {sorted(known)}")
    return HawqOptions(**options)


@dataclasses.dataclass(frozen=True)
class Hawq:
    """Precision initializer for ``quantization(precision=hawq(...))``: HAWQ at ``init``."""

    criterion: Criterion
    options: HawqOptions
    data: Iterable[Any] | None = None
    path: str = ""

    def __call__(self, request: PrecisionRequest) -> dict[str, int]:
        return precision_report(request, self.criterion, self.options, self.data, self.path).plan


def hawq(criterion: Criterion, *, data: Iterable[Any] | None = None, path: str = "", **options: Any) -> Hawq:
    """A HAWQ precision initializer (``options``: ``HawqOptions`` fields). ``data`` overrides the
    calibration data given to ``init``; ``path`` prefixes the JSON path of errors."""
    return Hawq(criterion, _options(options, path), data, path)


@dataclasses.dataclass(frozen=True)
class Manual:
    """Precision initializer from ``[[bits, pattern], ...]``; later entries win.

    A pattern matches a quantizer key equal to it, a key below it as a module scope
    (``layer1`` covers ``layer1.0.conv1.weight`` and ``layer1.0/relu#0:out0``), or, as
    ``{re}<regex>``, keys the regex full-matches. A pattern matching nothing is an error."""

    bitwidth_per_scope: tuple[tuple[int, str], ...]
    path: str = ""

    def __call__(self, request: PrecisionRequest) -> dict[str, int]:
        keys = [t.param for t in request.weights] + [t.key for t in request.activations]
        plan: dict[str, int] = {}
        for i, (bits, pattern) in enumerate(self.bitwidth_per_scope):
            matched = [k for k in keys if key_matches(pattern, k)]
            if not matched:
                raise ConfigError(f"{self.path}bitwidth_per_scope[{i}]",
                                  f"{pattern!r} matches no quantizer; expected a key such as {keys[0]!r}, "
                                  "a module scope, or '{re}<regex>'")
            plan.update(dict.fromkeys(matched, int(bits)))
        return plan


def manual(bitwidth_per_scope: Sequence[Sequence[Any]], path: str = "") -> Manual:
    """A manual precision initializer from ``[[bits, pattern], ...]``."""
    return Manual(tuple((int(b), str(p)) for b, p in bitwidth_per_scope), path)
