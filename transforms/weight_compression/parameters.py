"""The options of weight compression with NNCF 3.x's names, defaults and checks.

``check_options`` is NNCF's ``check_user_compression_configuration`` and ``resolve`` its
``get_weight_compression_configuration`` (``nncf/quantization/algorithms/weight_compression/
algorithm.py`` of v3.1.0), restricted to the modes purecomp builds.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

from purecomp.errors import ConfigError

from .awq import AWQParameters
from .gptq import GPTQParameters
from .grid import mode_spec
from .scale_estimation import ScaleEstimationParameters
from .sensitivity import DATA_AWARE, MAX_ACTIVATION_VARIANCE, METRICS, WEIGHT_QUANTIZATION_ERROR

INT8_MODES = ("int8_asym", "int8_sym")
BACKUP_MODES = ("int8_asym", "int8_sym", "none")
FALLBACK_MODES = ("error", "ignore", "adjust")
DATA_AWARE_ALGORITHMS = ("awq", "scale_estimation", "gptq")
ALGORITHM_PARAMS = {"awq_params": AWQParameters, "scale_estimation_params": ScaleEstimationParameters,
                    "gptq_params": GPTQParameters}


class CompressWeightsMode(str, enum.Enum):
    """``mode`` values (NNCF's ``CompressWeightsMode`` members that purecomp builds)."""

    INT8_ASYM = "int8_asym"
    INT8_SYM = "int8_sym"
    INT4_ASYM = "int4_asym"
    INT4_SYM = "int4_sym"
    NF4 = "nf4"


class BackupMode(str, enum.Enum):
    """``backup_mode`` values: the precision of layers not in the primary one (``NONE``: float)."""

    NONE = "none"
    INT8_ASYM = "int8_asym"
    INT8_SYM = "int8_sym"


class SensitivityMetric(str, enum.Enum):
    """``sensitivity_metric`` values (``sensitivity.py`` defines each)."""

    WEIGHT_QUANTIZATION_ERROR = "weight_quantization_error"
    HESSIAN_INPUT_ACTIVATION = "hessian_input_activation"
    MEAN_ACTIVATION_VARIANCE = "mean_activation_variance"
    MAX_ACTIVATION_VARIANCE = "max_activation_variance"
    MEAN_ACTIVATION_MAGNITUDE = "mean_activation_magnitude"


def _name(value: Any) -> Any:
    value = getattr(value, "value", value)
    return value.lower() if isinstance(value, str) else value


@dataclasses.dataclass(frozen=True)
class AdvancedCompressionParameters:
    """``group_size_fallback_mode`` (NNCF's ``GroupSizeFallbackMode``) for layers whose input
    channels the group size does not divide: ``error`` (default) raises; ``ignore`` keeps them in
    float; ``adjust`` uses the largest power of two dividing the channels, ``c & -c``, when it is
    at least ``min_adjusted_group_size`` (else the layer goes to the backup precision).
    ``awq_params``, ``scale_estimation_params``, ``gptq_params``: the data-aware algorithms' options
    (``AWQParameters``, ``ScaleEstimationParameters``, ``GPTQParameters`` or dicts of their fields),
    NNCF's ``AdvancedAWQParameters`` etc. without their ``subset_size``. ``lora_adapter_rank``
    (NNCF's name and default, 256): the adapters' rank for ``compression_format="fq_lora"``, capped
    per layer at its smaller dimension."""

    group_size_fallback_mode: str = "error"
    min_adjusted_group_size: int = 32
    awq_params: AWQParameters = AWQParameters()
    scale_estimation_params: ScaleEstimationParameters = ScaleEstimationParameters()
    gptq_params: GPTQParameters = GPTQParameters()
    lora_adapter_rank: int = 256

    def __post_init__(self) -> None:
        r = self.lora_adapter_rank
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ConfigError("advanced_parameters.lora_adapter_rank", f"expected a positive integer, got {r!r}")
        for key, cls in ALGORITHM_PARAMS.items():
            value = getattr(self, key)
            if isinstance(value, dict):
                unknown = set(value) - {f.name for f in dataclasses.fields(cls)}
                if unknown:
                    raise ConfigError(f"advanced_parameters.{key}.{sorted(unknown)[0]}",
                                      f"unknown option; expected {[f.name for f in dataclasses.fields(cls)]}")
                object.__setattr__(self, key, cls(**value))
            elif not isinstance(value, cls):
                raise ConfigError(f"advanced_parameters.{key}", f"expected {cls.__name__} or a dict, got "
                                  f"{type(value).__name__}")
        mode = _name(self.group_size_fallback_mode)
        if mode not in FALLBACK_MODES:
            raise ConfigError("advanced_parameters.group_size_fallback_mode",
                              f"expected one of {list(FALLBACK_MODES)}, got {self.group_size_fallback_mode!r}")
        object.__setattr__(self, "group_size_fallback_mode", mode)
        n = self.min_adjusted_group_size
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError("advanced_parameters.min_adjusted_group_size", f"expected a positive integer, got {n!r}")

    @classmethod
    def of(cls, value: Any) -> AdvancedCompressionParameters:
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = set(value) - {f.name for f in dataclasses.fields(cls)}
            if unknown:
                raise ConfigError(f"advanced_parameters.{sorted(unknown)[0]}",
                                  f"unknown option; expected {[f.name for f in dataclasses.fields(cls)]}")
            return cls(**value)
        raise ConfigError("advanced_parameters", f"expected AdvancedCompressionParameters, a dict or None, got "
                          f"{type(value).__name__}")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Resolved options: every ``None`` replaced by NNCF's default."""

    mode: str
    ratio: float
    group_size: int
    all_layers: bool
    sensitivity_metric: str
    backup_mode: str
    subset_size: int
    advanced: AdvancedCompressionParameters = AdvancedCompressionParameters()

    @property
    def is_int8(self) -> bool:
        return self.mode in INT8_MODES

    @property
    def data_aware_mixed_precision(self) -> bool:
        """NNCF collects activation statistics only for a data-aware metric with ``ratio != 1``."""
        return self.sensitivity_metric in DATA_AWARE and self.ratio != 1


def _check_mode(mode: Any) -> str:
    return mode_spec(_name(mode), "mode").name


def check_options(
    mode: Any, *, ratio: Any = None, group_size: Any = None, all_layers: Any = None, has_dataset: bool = False,
    sensitivity_metric: Any = None, subset_size: Any = 128, backup_mode: Any = None, awq: Any = None,
    scale_estimation: Any = None, gptq: Any = None,
) -> None:
    """NNCF's checks, each a ``ConfigError`` naming the option (``has_dataset``: a dataset is used
    for statistics; the INT8 modes never use one)."""
    name = _check_mode(mode)
    if name in INT8_MODES:
        if (ratio and ratio != 1) or (group_size and group_size != -1):
            raise ConfigError("ratio" if ratio and ratio != 1 else "group_size",
                              f"{name} compresses every layer per output channel: ratio must stay 1 (or None) and "
                              f"group_size -1 (or None), got ratio={ratio!r}, group_size={group_size!r}")
        given = {"all_layers": all_layers, "sensitivity_metric": sensitivity_metric, "awq": awq,
                 "scale_estimation": scale_estimation, "gptq": gptq, "backup_mode": backup_mode}
        unsupported = [key for key, value in given.items() if value is not None]
        if unsupported:
            raise ConfigError(unsupported[0], f"{name} does not take {', '.join(unsupported)}; expected None "
                              "(they choose and correct 4-bit layers)")
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1):
        raise ConfigError("ratio", f"expected a share of the layers in [0, 1], got {ratio!r}")
    if group_size is not None and group_size != -1 and (isinstance(group_size, bool) or not isinstance(group_size, int)
                                                        or group_size < 1):
        raise ConfigError("group_size", f"expected a positive number of input channels per group, -1 or None, "
                          f"got {group_size!r}")
    if isinstance(subset_size, bool) or not isinstance(subset_size, int) or subset_size < 1:
        raise ConfigError("subset_size", f"expected a positive number of samples, got {subset_size!r}")
    if all_layers is not None and not isinstance(all_layers, bool):
        raise ConfigError("all_layers", f"expected True, False or None, got {all_layers!r}")
    metric = _name(sensitivity_metric)
    if metric is not None and metric not in METRICS:
        raise ConfigError("sensitivity_metric", f"unknown metric {sensitivity_metric!r}; expected one of {list(METRICS)}")
    if ratio and metric is not None and metric != WEIGHT_QUANTIZATION_ERROR and not has_dataset:
        raise ConfigError("sensitivity_metric", f"{metric} is data-aware: it needs a dataset, got none")
    backup = _name(backup_mode)
    if backup is not None and backup not in BACKUP_MODES:
        raise ConfigError("backup_mode", f"unknown backup mode {backup_mode!r}; expected one of {list(BACKUP_MODES)}")
    for key, value in (("awq", awq), ("scale_estimation", scale_estimation), ("gptq", gptq)):
        if value is not None and not isinstance(value, bool):
            raise ConfigError(key, f"expected True, False or None, got {value!r}")
    # NNCF v3.1.0 quantize_model.py:604: scale estimation and GPTQ need a dataset
    needs_data = [key for key, value in (("scale_estimation", scale_estimation), ("gptq", gptq)) if value]
    if needs_data and not has_dataset:
        raise ConfigError(needs_data[0], f"{' and '.join(needs_data)} fit(s) the weights to calibration data: "
                          "pass a dataset (a purecomp.Dataset or an iterable of model inputs)")
    if awq and not has_dataset:  # NNCF then runs its data-free AWQ (awq.py: _data_free_step); purecomp has none
        raise ConfigError("awq", "purecomp's AWQ searches its scales on calibration activations: pass a dataset "
                          "(NNCF's data-free AWQ variant is not built)")


def resolve(
    mode: Any, *, ratio: float | None = None, group_size: int | None = None, all_layers: bool | None = None,
    has_dataset: bool = False, sensitivity_metric: Any = None, subset_size: int = 128, backup_mode: Any = None,
    advanced_parameters: Any = None,
) -> Settings:
    """NNCF's defaults: ``group_size`` -1 for INT8 modes and 128 for the 4-bit ones; ``ratio`` 1
    (``ratio=0`` keeps its meaning, no layer in 4 bits, where NNCF's ``ratio or 1`` makes it 1);
    ``all_layers`` False; ``sensitivity_metric`` ``weight_quantization_error`` without a dataset and
    ``max_activation_variance`` with one; ``backup_mode`` ``int8_asym``."""
    name = _check_mode(mode)
    if group_size is None:
        group_size = -1 if name in INT8_MODES else 128
    metric = _name(sensitivity_metric)
    if metric is None:
        metric = MAX_ACTIVATION_VARIANCE if has_dataset else WEIGHT_QUANTIZATION_ERROR
    return Settings(
        mode=name,
        ratio=1.0 if ratio is None else float(ratio),  # NNCF writes `ratio or 1`, which turns 0 into 1
        group_size=int(group_size),
        all_layers=bool(all_layers),
        sensitivity_metric=metric,
        backup_mode=_name(backup_mode) or "int8_asym",
        subset_size=subset_size,
        advanced=AdvancedCompressionParameters.of(advanced_parameters),
    )

