"""The options of ``purecomp.quantize`` with NNCF 3.x's names: presets, target devices, the
ignored scope and the advanced parameters."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from purecomp.errors import ConfigError
from purecomp.graph import ModelGraph

PRESETS = {"performance": "symmetric", "mixed": "asymmetric"}
TARGET_DEVICES = ("ANY", "CPU", "GPU", "NPU", "CPU_SPR")
MODEL_TYPES = (None, "transformer")
WEIGHT_ESTIMATORS = ("min_max", "mse")
ACTIVATION_ESTIMATORS = ("min_max", "mean_min_max", "percentile", "mse")
SMOOTH_QUANT_TYPES = frozenset({"matmul", "convolution"})
QUANTIZATION_PARAMS_KEYS = ("num_bits", "mode", "per_channel", "narrow_range", "signedness_to_force")
MODES = ("symmetric", "asymmetric")


def quantization_params(value: Any, path: str) -> dict[str, Any]:
    """NNCF's ``QuantizationParameters`` (a dict, or any object with its attribute names) as the
    ``quantization(weights=..., activations=...)`` keys it sets: ``num_bits`` (2..8) -> ``bits``,
    ``mode``, ``per_channel``, ``narrow_range``. ``None`` values keep the default.
    ``signedness_to_force`` is refused by name: the signedness follows the data here."""
    if value is None:
        return {}
    items = dict(value) if isinstance(value, Mapping) else {k: getattr(value, k) for k in QUANTIZATION_PARAMS_KEYS
                                                             if hasattr(value, k)}
    unknown = set(items) - set(QUANTIZATION_PARAMS_KEYS)
    if unknown:
        raise ConfigError(f"{path}.{sorted(unknown)[0]}", f"unknown key; expected one of {list(QUANTIZATION_PARAMS_KEYS)}")
    out: dict[str, Any] = {}
    bits = items.get("num_bits")
    if bits is not None:
        if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
            raise ConfigError(f"{path}.num_bits", f"expected an integer from 2 to 8, got {bits!r}")
        out["bits"] = bits
    mode = items.get("mode")
    if mode is not None:
        mode = getattr(mode, "value", mode)
        if mode not in MODES:
            raise ConfigError(f"{path}.mode", f"expected one of {list(MODES)}, got {mode!r}")
        out["mode"] = mode
    for key in ("per_channel", "narrow_range"):
        if items.get(key) is not None:
            if not isinstance(items[key], bool):
                raise ConfigError(f"{path}.{key}", f"expected True or False, got {items[key]!r}")
            out[key] = items[key]
    if items.get("signedness_to_force") is not None:
        raise ConfigError(f"{path}.signedness_to_force", "not supported: the signedness of a quantizer follows its "
                          "calibration data; expected None")
    return out


@dataclasses.dataclass(frozen=True)
class IgnoredScope:
    """Layers to leave in float (NNCF's ``IgnoredScope``): exact site or module ``names``, regular
    expression ``patterns`` (searched in site names), op or module ``types`` (``conv2d``,
    ``Linear``...). ``validate``: a name or pattern that matches nothing raises ``ScopeError``."""

    names: Sequence[str] = ()
    patterns: Sequence[str] = ()
    types: Sequence[str] = ()
    validate: bool = True

    def ignored_scopes(self, graph: ModelGraph) -> list[str]:
        """The patterns ``quantization(ignored_scopes=...)`` takes for this scope on ``graph``."""
        out = list(self.names) + [f"{{re}}.*(?:{p}).*" for p in self.patterns]
        types = {t.lower() for t in self.types}
        out += [node.site for node in graph if node.op.lower() in types or node.module_type.lower() in types]
        if self.types and self.validate and not any(n.op.lower() in types or n.module_type.lower() in types
                                                    for n in graph):
            raise ConfigError("ignored_scope.types", f"{list(self.types)} match no op of the model")
        return out


@dataclasses.dataclass(frozen=True)
class AdvancedQuantizationParameters:
    """Advanced options of ``purecomp.quantize``.

    ``weights_range_estimator``: ``min_max`` or ``mse`` (MSE-optimal clipping), per output channel
    unless ``weights_per_channel`` is off. ``activations_range_estimator``: ``min_max``, ``mean_min_max``, ``percentile``
    (``activations_percentiles``) or ``mse`` (``mean_min_max`` refined by MSE-optimal clipping).
    ``batchnorm_folding``: fold BatchNorm into the conv / linear before it first.
    ``cross_layer_equalization`` (with ``bias_absorption``): equalize conv pairs (CNNs with
    depthwise layers or badly scaled channels). ``disable_bias_correction``: skip bias
    correction. ``bias_correction_subset_size``: samples bias correction measures on (at most
    ``subset_size``; ``None``: all ``subset_size``); the per-channel mean shifts it estimates
    average over every position of every sample, and the fewer samples keep ``quantize`` under 3
    passes over the calibration data. ``quantize_outputs``: quantize the model outputs too. ``smooth_quant_alphas``
    (NNCF's ``AdvancedSmoothQuantParameters`` as a dict): SmoothQuant's migration strength per
    layer type for ``model_type="transformer"``, ``matmul`` (linear layers; default 0.95) and
    ``convolution`` (must stay negative, i.e. off: SmoothQuant for convolutions is not built); a
    negative value turns it off. ``smooth_quant_alpha``: NNCF's older single value, overrides
    ``matmul`` when given. ``weights_quantization_params`` / ``activations_quantization_params``
    (NNCF's ``QuantizationParameters``: ``num_bits``, ``mode``, ``per_channel``, ``narrow_range``):
    override the 8-bit scheme, e.g. ``{"num_bits": 4}`` for W4A8. ``adaround`` (``True`` or
    ``AdaRoundParameters`` / a dict of its options; off by default): learned rounding of the
    conv / linear weights after range estimation (``purecomp.transforms.adaround``). ``int32_bias``
    (on by default; not an NNCF option): round each quantized conv / linear bias to its int32
    accumulator grid ``s_x s_w`` at the end, as integer kernels (ONNX Runtime's QLinearConv) do, so
    the returned model's forward is what they compute (``purecomp.transforms.ptq.int32_bias``).
    ``unify_residual_scales`` (on by default; not an NNCF option): the symmetric activation
    quantizers on a residual add's inputs and output share the largest of their steps, so a
    runtime that skips one input's rounding (OpenVINO's CPU plugin) computes the same sum
    (``purecomp.transforms.ptq.residual_scales``). ``activation_step_bits`` (16 by default; ``None``
    keeps float32's 24; not an NNCF option): each symmetric activation step rounded up to this
    many significant bits, so that OpenVINO's range-based FakeQuantize rounds as ``round(x / s)``
    does (``purecomp.transforms.ptq.activation_steps``)."""

    weights_range_estimator: str = "min_max"
    weights_per_channel: bool = True
    activations_range_estimator: str = "mean_min_max"
    activations_percentiles: tuple[float, float] = (0.01, 99.99)
    batchnorm_folding: bool = True
    cross_layer_equalization: bool = False
    bias_absorption: bool = True
    disable_bias_correction: bool = False
    bias_correction_subset_size: int | None = 128
    quantize_outputs: bool = False
    smooth_quant_alphas: Mapping[str, float] = dataclasses.field(
        default_factory=lambda: {"matmul": 0.95, "convolution": -1.0})
    smooth_quant_alpha: float | None = None
    weights_quantization_params: Any = None
    activations_quantization_params: Any = None
    adaround: Any = None
    int32_bias: bool = True
    unify_residual_scales: bool = True
    activation_step_bits: int | None = 16

    def __post_init__(self) -> None:
        quantization_params(self.weights_quantization_params, "advanced_parameters.weights_quantization_params")
        quantization_params(self.activations_quantization_params, "advanced_parameters.activations_quantization_params")
        if self.adaround not in (None, False):
            from purecomp.transforms.adaround import AdaRoundParameters

            AdaRoundParameters.of(self.adaround, "advanced_parameters.adaround")
        if self.weights_range_estimator not in WEIGHT_ESTIMATORS:
            raise ConfigError("advanced_parameters.weights_range_estimator",
                              f"expected one of {list(WEIGHT_ESTIMATORS)}, got {self.weights_range_estimator!r}")
        if self.activations_range_estimator not in ACTIVATION_ESTIMATORS:
            raise ConfigError("advanced_parameters.activations_range_estimator",
                              f"expected one of {list(ACTIVATION_ESTIMATORS)}, got {self.activations_range_estimator!r}")
        n = self.bias_correction_subset_size
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ConfigError("advanced_parameters.bias_correction_subset_size",
                              f"expected a positive number of samples or None, got {n!r}")
        alphas = dict(self.smooth_quant_alphas)
        if set(alphas) - SMOOTH_QUANT_TYPES:
            raise ConfigError("advanced_parameters.smooth_quant_alphas",
                              f"unknown layer types {sorted(set(alphas) - SMOOTH_QUANT_TYPES)}; expected "
                              f"{sorted(SMOOTH_QUANT_TYPES)}")
        for name, value in [*alphas.items(), ("smooth_quant_alpha", self.smooth_quant_alpha)]:
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value > 1):
                raise ConfigError(f"advanced_parameters.{name}", f"expected a number <= 1 (negative: off), got {value!r}")
        if alphas.get("convolution", -1) >= 0:
            raise ConfigError("advanced_parameters.smooth_quant_alphas.convolution",
                              "SmoothQuant for convolutions is not built; expected a negative value (off)")
        for field in dataclasses.fields(self):
            if field.type in ("bool", bool) and not isinstance(getattr(self, field.name), bool):
                raise ConfigError(f"advanced_parameters.{field.name}",
                                  f"expected true or false, got {getattr(self, field.name)!r}")
        bits = self.activation_step_bits
        if bits is not None and (isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 24):
            raise ConfigError("advanced_parameters.activation_step_bits",
                              f"expected significant bits from 1 to 24 or None, got {bits!r}")
        low, high = self.activations_percentiles
        if not 0 <= low < high <= 100:
            raise ConfigError("advanced_parameters.activations_percentiles",
                              f"expected 0 <= low < high <= 100, got {self.activations_percentiles}")

    @property
    def matmul_alpha(self) -> float:
        """SmoothQuant's alpha for linear layers (negative: off)."""
        if self.smooth_quant_alpha is not None:
            return float(self.smooth_quant_alpha)
        return float(dict(self.smooth_quant_alphas).get("matmul", 0.95))

    @classmethod
    def of(cls, value: Any) -> AdvancedQuantizationParameters:
        return options_of(cls, value, "advanced_parameters")


def options_of(cls: type, value: Any, path: str) -> Any:
    """``value`` as an options dataclass ``cls``: ``None`` gives the defaults, an instance passes,
    a dict is checked key by key (``ConfigError`` at ``<path>.<key>`` for an unknown one)."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise ConfigError(path, f"expected {cls.__name__} or a dict, got {type(value).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    for key in value:
        if key not in known:
            raise ConfigError(f"{path}.{key}", f"unknown key; expected one of {sorted(known)}")
    return cls(**dict(value))


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ConfigError(name, f"expected one of {list(choices)}, got {value!r}")
