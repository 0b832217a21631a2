"""``quantization(...)``: quantization-aware training as a ``Compression`` value."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from purecomp.compression import Compression, Progress
from purecomp.errors import ConfigError, QuantizerRangeError
from purecomp.init_context import InitContext
from purecomp.op_kinds import QUANTIZABLE_OPS
from purecomp.ops.levels import check_bits
from purecomp.scopes import select_sites
from purecomp.struct import static_field, struct

from .placement import (
    ActivationTarget,
    WeightTarget,
    activation_targets,
    weight_targets,
)
from .precision import Precision, PrecisionRequest, check_plan, resolve_plan
from .quantizer import Quantizer, make_quantizer
from .range_init import RangeInit, TensorStatistics

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class QuantizerSettings:
    """Settings of one family of quantizers (NNCF's ``weights`` / ``activations`` keys).

    ``signed=None`` chooses signedness from calibration (activations); ``narrow_range=None``
    means on for symmetric weights, off otherwise. ``logarithm_scale`` trains ``log(scale)``
    (symmetric) or ``log(input_range)`` (asymmetric) instead of the range itself; ``None`` (the
    default) decides at ``init``: weights train ``log(scale)`` when range init calibrates the model in
    train mode (a model trained from scratch, whose first SGD steps on a linear scale can drive it
    across zero), their range as it is otherwise; activations always train their range as it is.
    """

    mode: str = "symmetric"
    bits: int = 8
    signed: bool | None = None
    per_channel: bool = False
    narrow_range: bool | None = None
    logarithm_scale: bool | None = None

    @classmethod
    def of(cls, value: QuantizerSettings | Mapping[str, Any] | None, path: str) -> QuantizerSettings:
        if value is None:
            return cls()
        if isinstance(value, QuantizerSettings):
            return value
        known = {f.name for f in dataclasses.fields(cls)}
        for key in value:
            if key not in known:
                raise ConfigError(f"{path}.{key}", f"unknown key; expected one of {sorted(known)}")
        settings = cls(**dict(value))
        if settings.mode not in ("symmetric", "asymmetric"):
            raise ConfigError(f"{path}.mode", f"expected 'symmetric' or 'asymmetric', got {settings.mode!r}")
        try:
            check_bits(settings.bits)
        except QuantizerRangeError as exc:
            raise ConfigError(f"{path}.bits", str(exc)) from None
        if not (settings.logarithm_scale is None or isinstance(settings.logarithm_scale, bool)):
            raise ConfigError(f"{path}.logarithm_scale", f"expected true, false or null, got {settings.logarithm_scale!r}")
        return settings

    def with_logarithm_scale(self, default: bool) -> QuantizerSettings:
        """These settings with ``logarithm_scale`` set to ``default`` where it was left ``None``."""
        return self if self.logarithm_scale is not None else dataclasses.replace(self, logarithm_scale=default)

    def for_weights(self, calibration_mode: str) -> QuantizerSettings:
        """These settings as weight quantizers get them: ``logarithm_scale`` left ``None`` becomes
        ``calibration_mode == "train"`` (a model trained from scratch trains ``log(scale)``)."""
        return self.with_logarithm_scale(calibration_mode == "train")


@struct
class QuantizationState:
    """Weight quantizers by parameter name, activation quantizers by tensor key."""

    weights: dict[str, Quantizer]
    activations: dict[str, Quantizer]
    consumers: tuple[tuple[str, tuple[str, ...]], ...] = static_field(default=())

    def consumers_of(self, key: str) -> tuple[str, ...]:
        return dict(self.consumers).get(key, ())

    def statistics(self, graph: Any = None) -> dict[str, list[dict[str, Any]]]:
        """The ``quantizers`` table: key, weight/activation, bits, mode, per-channel, signedness,
        range ``[min low, max high]`` and (activations) the ops it feeds."""
        rows = []
        for kind, table in (("weight", self.weights), ("activation", self.activations)):
            for key, q in table.items():
                low, high = q.float_range()
                rows.append({
                    "quantizer": key, "kind": kind, "bits": q.bits, "mode": q.mode,
                    "per_channel": q.axis is not None, "signed": q.signed,
                    "low": float(low.min()), "high": float(high.max()),
                    "feeds": ", ".join(self.consumers_of(key)) if kind == "activation" else "",
                })
        return {"quantizers": rows}

    def output_grid(self) -> tuple[Tensor, Tensor, int, int] | None:
        """The integer grid of the quantizer on the model's output, if there is one."""
        for key, consumers in self.consumers:
            if "output" in consumers:
                return self.activations[key].integer_grid()
        return None

    def export_rule(self) -> Any:
        from .export_rule import QuantizationExport

        return QuantizationExport(self)


def weight_quantizer(target: WeightTarget, weight: Tensor, settings: QuantizerSettings, bits: int) -> Quantizer:
    """The quantizer of one weight, its range the weight's min and max (per channel along ``target.axis``)."""
    if settings.logarithm_scale is None:
        raise ValueError("weight_quantizer needs settings whose logarithm_scale is decided; "
                         "expected QuantizerSettings.with_logarithm_scale(...) first")
    axis = target.axis if settings.per_channel else None
    w = weight.detach()
    if axis is None:
        low, high = w.min(), w.max()
    else:
        dims = [d for d in range(w.dim()) if d != axis % w.dim()]
        low, high = w.amin(dim=dims), w.amax(dim=dims)
    narrow = settings.narrow_range if settings.narrow_range is not None else settings.mode == "symmetric"
    return make_quantizer(settings.mode, low, high, bits=bits, signed=True, narrow_range=narrow, axis=axis,
                          log_scale=settings.logarithm_scale)


def quantization(
    weights: QuantizerSettings | Mapping[str, Any] | None = None,
    activations: QuantizerSettings | Mapping[str, Any] | None = None,
    *,
    ignored_scopes: Sequence[str] = (),
    target_scopes: Sequence[str] | None = None,
    range_init: RangeInit | None = None,
    quantize_inputs: bool = True,
    quantize_outputs: bool = False,
    quantize_at_inputs_of: Sequence[str] = (),
    precision: Precision | None = None,
    origin: str = "",
) -> Compression:
    """Quantization-aware training: fake-quantize weights (weight transform) and activations (sites).

    ``precision`` maps quantizer keys (a weight's parameter name, an activation's tensor key)
    to bits, overriding ``bits`` (a mixed-precision plan), or is an initializer computing such a
    plan at ``init`` (``purecomp.transforms.mixed_precision.hawq``, ``manual``). ``origin`` prefixes the JSON path in
    error messages (``compression[1].`` when built from a config).

    ``quantize_at_inputs_of`` (op kinds, e.g. ``("linear",)``): each call of these ops gets its own
    activation quantizer at its input (key ``<site>:in<k>``) instead of sharing one on the tensor.
    The tensor's other readers (a transformer's residual add) then read it unquantized, and a
    transform an earlier chain member puts at that input (SmoothQuant's ``x / s``) runs before
    the quantizer and before its range init.
    """
    w_settings = QuantizerSettings.of(weights, f"{origin}weights")
    a_settings = QuantizerSettings.of(activations, f"{origin}activations")
    if a_settings.per_channel:
        raise ConfigError(f"{origin}activations.per_channel", "per-channel activation quantizers are not supported; expected false")
    input_ops = tuple(quantize_at_inputs_of)
    for op in input_ops:
        if op not in QUANTIZABLE_OPS:
            raise ConfigError(f"{origin}quantize_at_inputs_of", f"{op!r} is not a quantizable op kind; expected some of "
                              f"{sorted(QUANTIZABLE_OPS)}")
    init_cfg = range_init or RangeInit()
    fixed_plan = None if callable(precision) else check_plan(precision or {}, origin)

    def init(context: InitContext) -> QuantizationState:
        graph = context.graph
        w_decided = w_settings.for_weights(context.calibration_mode)
        allowed = select_sites(graph, ignored_scopes, target_scopes, origin, context.scope)
        w_targets = weight_targets(graph, allowed)
        a_targets = activation_targets(graph, allowed, quantize_inputs=quantize_inputs,
                                       quantize_outputs=quantize_outputs, input_ops=input_ops)
        request = PrecisionRequest(
            graph, context.params, context.data, tuple(w_targets), tuple(a_targets), w_decided, origin,
            activation_quantizers=lambda p: activation_quantizers(context, a_targets, a_settings, p, init_cfg),
            context=context,
        )
        plan = fixed_plan if fixed_plan is not None else resolve_plan(precision, request)
        known = {t.param for t in w_targets} | {t.key for t in a_targets}
        for key in plan:
            if key not in known:
                raise ConfigError(f"{origin}precision", f"{key!r} is not a quantizer of this model; expected one of {sorted(known)[:8]}...")
        w_quant = {
            t.param: weight_quantizer(t, context.params[t.param], w_decided, plan.get(t.param, w_settings.bits))
            for t in w_targets
        }
        a_quant = activation_quantizers(context, a_targets, a_settings, plan, init_cfg)
        consumers = tuple((t.key, t.consumers) for t in a_targets)
        return QuantizationState(weights=w_quant, activations=a_quant, consumers=consumers)

    def params_fn(params: Mapping[str, Tensor], state: QuantizationState) -> dict[str, Tensor]:
        out = dict(params)
        for name, quantizer in state.weights.items():
            out[name] = quantizer(out[name])
        return out

    def sites(state: QuantizationState) -> dict[str, Any]:
        return dict(state.activations)

    def loss(params: Mapping[str, Tensor], state: QuantizationState) -> Tensor:
        return torch.zeros(())

    def step(state: QuantizationState, progress: Progress, params: Any = None) -> QuantizationState:
        return state

    return Compression(init, params_fn, sites, loss, step, name="quantization")


def activation_quantizers(
    context: InitContext,
    targets: list[ActivationTarget],
    settings: QuantizerSettings,
    plan: Mapping[str, int],
    init_cfg: RangeInit,
) -> dict[str, Quantizer]:
    """Activation quantizers at ``targets``, their ranges from a calibration pass (``init_cfg``)
    through the model as the context's earlier methods compress it."""
    if not targets:
        return {}
    settings = settings.with_logarithm_scale(False)
    narrow = bool(settings.narrow_range)
    if init_cfg.num_init_samples == 0:
        log.info("range init skipped (num_init_samples=0): activation quantizers start at [-1, 1]")
        one = torch.ones(())
        return {
            t.key: make_quantizer(settings.mode, -one if settings.signed is not False else 0 * one, one,
                                  bits=plan.get(t.key, settings.bits), signed=settings.signed,
                                  narrow_range=narrow, axis=None, log_scale=settings.logarithm_scale)
            for t in targets
        }
    stats = {t.key: TensorStatistics(init_cfg) for t in targets}
    context.calibrate(list(stats), lambda key, x: stats[key].observe(x), init_cfg.num_init_samples, "range init")
    out = {}
    for t in targets:
        low, high = stats[t.key].range(init_cfg, asymmetric=settings.mode == "asymmetric")
        signed = settings.signed if settings.signed is not None else stats[t.key].saw_negative
        out[t.key] = make_quantizer(
            settings.mode, low, high, bits=plan.get(t.key, settings.bits), signed=signed,
            narrow_range=narrow, axis=None, log_scale=settings.logarithm_scale,
        )
    return out
