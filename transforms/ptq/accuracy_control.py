"""``quantize_with_accuracy_control``: PTQ, then layers back to float until the metric drop fits.

1. ``m_fp = validation_fn(model, validation_data)``; quantize (``purecomp.quantize``);
   ``m_q = validation_fn(quantized, validation_data)``.
2. The drop is ``m_fp - m_q`` (``drop_type="absolute"``) or ``(m_fp - m_q) / |m_fp|``
   (``"relative"``). Within ``max_drop``: done.
3. Rank the quantized layers by a cheap sensitivity (NNCF's ranker): pick the
   ``ranking_subset_size`` validation samples whose quantized outputs are farthest from the
   float model's (one float and one quantized pass over the validation data), then score each
   layer by the normalized error ``NMSE = |y - y_q|^2 / |y|^2`` of those samples' outputs (mean
   over the samples) left when only that layer returns to float: one pass over the subset per
   layer, no ``validation_fn``. The samples the quantized model already gets right dominate a
   plain mean squared error of all outputs and rank the layers that flip predictions poorly.
4. Return layers to float in that order (the layer's weight quantizer and the activation
   quantizers that feed only it), calling ``validation_fn`` after each, until the drop is within
   ``max_drop`` or ``max_num_iterations`` layers went back.

A layer returned to float also gets back the bias it had before bias correction (as NNCF's
restorer does): the correction compensates that layer's quantization error, which a float
layer no longer has. The ranking scores each layer that way too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import optree
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from purecomp.api import CompressedModule
from purecomp.compression import with_training
from purecomp.data import take_samples
from purecomp.errors import ConfigError
from purecomp.stats import Table

from .chain_state import map_quantization, quantization_state
from .dataset import Dataset, model_inputs
from .parameters import AdvancedQuantizationParameters, IgnoredScope, options_of
from .pipeline import quantize

log = logging.getLogger(__name__)

DROP_TYPES = ("absolute", "relative")


@dataclasses.dataclass(frozen=True)
class AdvancedAccuracyRestorerParameters:
    """``max_num_iterations``: most layers returned to float; ``ranking_subset_size``: validation
    samples the ranking runs on."""

    max_num_iterations: int = 50
    ranking_subset_size: int = 300

    @classmethod
    def of(cls, value: Any) -> AdvancedAccuracyRestorerParameters:
        return options_of(cls, value, "advanced_accuracy_restorer_parameters")


@dataclasses.dataclass(frozen=True)
class RestoreStep:
    """One row of the report: the layer returned to float and the metric after it."""

    layer: str
    metric: float
    drop: float


@dataclasses.dataclass(frozen=True)
class AccuracyControlReport:
    """What ``quantize_with_accuracy_control`` did: the float and first quantized metrics, each
    layer it returned to float with the metric after it, and how often it called ``validation_fn``."""

    fp32_metric: float
    quantized_metric: float
    steps: tuple[RestoreStep, ...]
    validation_calls: int
    max_drop: float
    drop_type: str

    @property
    def reverted(self) -> list[str]:
        return [s.layer for s in self.steps]

    def table(self) -> Table:
        rows = [{"step": 0, "returned to float": "(quantized)", "metric": self.quantized_metric,
                 "drop": self.fp32_metric - self.quantized_metric}]
        rows += [{"step": i + 1, "returned to float": s.layer, "metric": s.metric, "drop": s.drop}
                 for i, s in enumerate(self.steps)]
        return Table(f"accuracy control (FP32 {self.fp32_metric:.4g}, max {self.drop_type} drop {self.max_drop:g}, "
                     f"{self.validation_calls} validation runs)", tuple(rows))


def _drop(reference: float, metric: float, drop_type: str) -> float:
    return reference - metric if drop_type == "absolute" else (reference - metric) / max(abs(reference), 1e-12)


def _within(drop: float, max_drop: float) -> bool:
    """``drop <= max_drop`` up to float rounding: 0.98325 - 0.97825 (20 images of 4,000 below) is
    0.0050000000000000044, which is a drop of 0.005."""
    return drop <= max_drop + 1e-9 * max(1.0, abs(max_drop))


def layer_groups(state: Any) -> dict[str, tuple[str, ...]]:
    """Quantized layer (its weight's module scope) -> the quantizer keys returned to float with it:
    its weight quantizer and every activation quantizer whose consumers are all its ops."""
    state = quantization_state(state)
    groups: dict[str, list[str]] = {name.rpartition(".")[0]: [name] for name in state.weights}
    for key, consumers in state.consumers:
        scopes = {site.rpartition("/")[0] for site in consumers if site != "output"}
        if len(scopes) == 1 and "output" not in consumers and next(iter(scopes)) in groups:
            groups[next(iter(scopes))].append(key)
    return {scope: tuple(keys) for scope, keys in groups.items()}


def without(state: Any, keys: Iterable[str]) -> Any:
    """``state`` with the quantizers ``keys`` removed (those tensors run in float); the earlier
    members of a chain (SmoothQuant, exact in float) stay."""
    drop = set(keys)
    return map_quantization(state, lambda q: dataclasses.replace(
        q,
        weights={k: v for k, v in q.weights.items() if k not in drop},
        activations={k: v for k, v in q.activations.items() if k not in drop},
        consumers=tuple(c for c in q.consumers if c[0] not in drop),
    ))


def rebuilt(module: CompressedModule, state: Any) -> CompressedModule:
    """A ``CompressedModule`` over the same model and method with ``state``."""
    out = CompressedModule(module.model, module.method)
    out.set_state(state)
    out.graph = getattr(module, "graph", None)
    return out.eval()


@contextlib.contextmanager
def float_biases(module: CompressedModule, layers: Iterable[str], keep: bool = False) -> Iterator[None]:
    """The biases of ``layers`` set back to their values before bias correction and int32 rounding
    (or the ``beta`` of the BatchNorm that holds a layer's bias, ``moved_biases``), and their
    weights to theirs before AdaRound (the ``float_values`` ``quantize`` records), in place; put
    back on exit unless ``keep``."""
    uncorrected = getattr(module, "float_values", {})
    moved = getattr(module, "moved_biases", {})  # a layer's bias held by the BatchNorm after it
    params = dict(module.model.named_parameters())
    names = [name for layer in layers for name in (f"{layer}.bias", f"{layer}.weight", moved.get(layer))
             if name in uncorrected]
    saved = {name: params[name].detach().clone() for name in names}
    with torch.no_grad():
        for name in names:
            params[name].copy_(uncorrected[name])
    try:
        yield
    finally:
        if not keep:
            with torch.no_grad():
                for name in names:
                    params[name].copy_(saved[name])


def _output(model: nn.Module, args: tuple, kwargs: dict) -> Tensor:
    with torch.no_grad():
        out = model(*args, **kwargs)
    return out if isinstance(out, Tensor) else out[0]


def _outputs(model: nn.Module, batches: Sequence[tuple[tuple, dict]]) -> list[Tensor]:
    return [_output(model, args, kwargs) for args, kwargs in batches]


def nmse(reference: Tensor, approximate: Tensor) -> Tensor:
    """Per sample (dim 0): ``|y - y_q|^2 / |y|^2`` over the rest of the output."""
    y = reference.detach().double().reshape(len(reference), -1)
    d = y - approximate.detach().double().reshape(len(approximate), -1)
    return d.square().sum(dim=1) / y.square().sum(dim=1).clamp(min=1e-30)


def _rows(args: tuple, kwargs: dict, index: Tensor, n: int) -> tuple[tuple, dict]:
    """Rows ``index`` of every tensor with ``n`` rows in a model call's inputs."""
    take = lambda v: v[index] if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == n else v  # noqa: E731
    return optree.tree_map(take, args), optree.tree_map(take, kwargs)


def ranking_batches(
    model: nn.Module, quantized: nn.Module, dataset: Dataset | Iterable[Any], size: int,
) -> list[tuple[tuple, dict]]:
    """The ``size`` samples of ``dataset`` (all of it, streamed) with the largest per-sample
    ``nmse`` between ``model``'s and ``quantized``'s outputs (NNCF's subset selection), as
    ``(args, kwargs)`` calls holding the chosen rows of each batch."""
    kept: list[tuple[Tensor, tuple, dict]] = []
    for args, kwargs in take_samples(_inference_items(dataset), sys.maxsize, "ranking subset"):
        kept.append((nmse(_output(model, args, kwargs), _output(quantized, args, kwargs)), args, kwargs))
        scores = torch.cat([k[0] for k in kept])
        if len(scores) > size:  # keep only the rows still among the largest ``size``
            threshold = scores.topk(size).values[-1]
            kept = [(sc[m], *_rows(a, kw, m.nonzero().flatten(), len(sc)))
                    for sc, a, kw in kept if bool((m := sc >= threshold).any())]
    return [(a, kw) for _, a, kw in kept]


def _inference_items(dataset: Dataset | Iterable[Any]) -> Iterable[Any]:
    """Batches of model inputs as ``take_samples`` reads them (a ``Dataset``'s transform applied)."""
    if not isinstance(dataset, Dataset):
        return dataset
    return ([args] if not kwargs else kwargs for args, kwargs in map(model_inputs, dataset.get_inference_data()))


def rank_layers(
    model: nn.Module, quantized: CompressedModule, batches: Sequence[tuple[tuple, dict]], progress_bar: bool = True,
) -> list[tuple[str, float]]:
    """Layers by how much returning each alone to float lowers the output error on ``batches``
    (the mean per-sample ``nmse`` against the float ``model``; module docstring), most helpful
    first: ``[(layer, error without it), ...]``."""
    reference = _outputs(model, batches)

    def error(module: nn.Module) -> float:
        return float(torch.cat([nmse(r, o) for r, o in zip(reference, _outputs(module, batches))]).mean())

    state = with_training(quantized.state, False)
    scores = []
    for layer, keys in tqdm(layer_groups(state).items(), desc="ranking layers", disable=not progress_bar or None,
                            leave=False):
        with float_biases(quantized, [layer]):
            scores.append((layer, error(rebuilt(quantized, without(state, keys)))))
    return sorted(scores, key=lambda item: item[1])


def quantize_with_accuracy_control(
    model: nn.Module,
    calibration_dataset: Dataset | Iterable[Any],
    validation_dataset: Dataset | Iterable[Any],
    validation_fn: Callable[[nn.Module, Iterable[Any]], float],
    *,
    max_drop: float = 0.01,
    drop_type: str = "absolute",
    preset: str | None = None,
    target_device: str = "ANY",
    subset_size: int = 300,
    fast_bias_correction: bool = True,
    model_type: str | None = None,
    ignored_scope: IgnoredScope | Sequence[str] | None = None,
    advanced_quantization_parameters: AdvancedQuantizationParameters | Mapping[str, Any] | None = None,
    advanced_accuracy_restorer_parameters: AdvancedAccuracyRestorerParameters | Mapping[str, Any] | None = None,
    progress_bar: bool = True,
) -> CompressedModule:
    """``quantize``, then return layers to float until the metric drop is within ``max_drop``
    (module docstring). ``validation_fn(model, validation_data) -> float`` (higher is better)
    receives ``validation_dataset``'s items (a ``Dataset``'s raw items, as NNCF does). The
    result's ``accuracy_control`` attribute holds the ``AccuracyControlReport``; its table is
    printed through logging and returned by ``report.table()``."""
    if drop_type not in DROP_TYPES:
        raise ConfigError("drop_type", f"expected one of {list(DROP_TYPES)}, got {drop_type!r}")
    if not isinstance(max_drop, (int, float)) or isinstance(max_drop, bool) or max_drop < 0:
        raise ConfigError("max_drop", f"expected a non-negative number, got {max_drop!r}")
    if not callable(validation_fn):
        raise ConfigError("validation_fn", f"expected a callable (model, data) -> float, got {validation_fn!r}")
    restorer = AdvancedAccuracyRestorerParameters.of(advanced_accuracy_restorer_parameters)
    validation_data = validation_dataset.get_data() if isinstance(validation_dataset, Dataset) else validation_dataset
    calls = 0

    def validate(candidate: nn.Module) -> float:
        nonlocal calls
        calls += 1
        candidate.eval()
        return float(validation_fn(candidate, validation_data))

    fp32 = validate(model)
    quantized = quantize(model, calibration_dataset, preset=preset, target_device=target_device,
                         subset_size=subset_size, fast_bias_correction=fast_bias_correction, model_type=model_type,
                         ignored_scope=ignored_scope, advanced_parameters=advanced_quantization_parameters)
    first = validate(quantized)
    steps: list[RestoreStep] = []
    current, metric = quantized, first
    if not _within(_drop(fp32, first, drop_type), max_drop):
        ranking = ranking_batches(model, quantized, validation_dataset, restorer.ranking_subset_size)
        order = rank_layers(model, quantized, ranking, progress_bar)
        state = with_training(quantized.state, False)
        groups = layer_groups(state)
        bar = tqdm(order[: restorer.max_num_iterations], desc="returning layers to float",
                   disable=not progress_bar or None, leave=False)
        for layer, _ in bar:
            state = without(state, groups[layer])
            with float_biases(quantized, [layer], keep=True):  # the model is quantized's own copy
                current = rebuilt(quantized, state)
            metric = validate(current)
            steps.append(RestoreStep(layer, metric, _drop(fp32, metric, drop_type)))
            bar.set_postfix(metric=f"{metric:.4g}")
            if _within(steps[-1].drop, max_drop):
                break
    report = AccuracyControlReport(fp32, first, tuple(steps), calls, float(max_drop), drop_type)
    log.info("%s", report.table())
    if not _within(_drop(fp32, metric, drop_type), max_drop):
        log.warning("accuracy control: the %s drop %.4g is still above max_drop %.4g after returning %d layers "
                    "to float", drop_type, _drop(fp32, metric, drop_type), max_drop, len(steps))
    current.accuracy_control = report
    return current

