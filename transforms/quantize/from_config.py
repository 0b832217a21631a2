"""Build ``quantization(...)`` from a validated ``"algorithm": "quantization"`` config section."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from purecomp.compression import Compression
from purecomp.errors import ConfigError, warn_no_effect
from purecomp.scoped import section_scoped

from .method import quantization
from .range_init import RangeInit

DEFAULT_RANGE_TYPE = "mixed_min_max"  # NNCF's default when initializer.range.type is absent
# NNCF's staged-quantization params that drive its sample training loop, not the compression
LOOP_PARAMS = ("batch_multiplier", "lr_poly_drop_start_epoch", "lr_poly_drop_duration_epochs",
               "disable_wd_start_epoch", "base_lr", "base_wd")
STAGED_START_DEFAULT = 1  # NNCF's activations_quant_start_epoch / weights_quant_start_epoch default


def range_init_from_config(section: Mapping[str, Any], origin: str) -> RangeInit:
    rng = section.get("initializer", {}).get("range", {})
    if isinstance(rng, list):
        raise ConfigError(f"{origin}initializer.range", "per-layer range initialization (a list of range configs "
                          "with target_scopes) is not implemented; give one range config for every quantizer")
    params = rng.get("params", {})
    try:
        return RangeInit(
            type=rng.get("type", DEFAULT_RANGE_TYPE),
            num_init_samples=rng.get("num_init_samples", RangeInit.num_init_samples),
            min_percentile=params.get("min_percentile", RangeInit.min_percentile),
            max_percentile=params.get("max_percentile", RangeInit.max_percentile),
        )
    except ConfigError as exc:
        raise ConfigError(f"{origin}{exc.path}", str(exc).split(": ", 1)[-1]) from None


def quantization_from_config(section: Mapping[str, Any], origin: str, context: Any = None) -> Compression:
    """``context`` (``purecomp.config.BuildContext``) carries the target device, loss and data
    that ``initializer.precision`` of ``type: hawq`` needs."""
    from purecomp.transforms.mixed_precision.from_config import precision_from_config

    check_nncf_keys(section, origin)
    spec = section.get("initializer", {}).get("precision")
    precision = precision_from_config(spec, f"{origin}initializer.precision.", context)
    weights = _quantizer(section.get("weights"))
    activations = _quantizer(section.get("activations"))
    if section.get("preset") == "mixed" and "mode" not in (activations or {}):
        activations = {**(activations or {}), "mode": "asymmetric"}  # NNCF: mixed = sym. weights, asym. activations
    range_init = range_init_from_config(section, origin)
    return section_scoped(section, lambda ignored, target: quantization(
        weights=weights,
        activations=activations,
        ignored_scopes=ignored,
        target_scopes=target,
        range_init=range_init,
        quantize_inputs=section.get("quantize_inputs", True),
        quantize_outputs=section.get("quantize_outputs", False),
        precision=precision,
        origin=origin,
    ))


GROUP_ONLY_KEYS = ("ignored_scopes", "target_scopes", "validate_scopes", "unified_scale_ops")


def _quantizer(group: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The quantizer settings of a ``weights`` / ``activations`` group (its NNCF-only keys dropped:
    ``check_nncf_keys`` has refused or warned about each)."""
    return None if group is None else {k: v for k, v in group.items() if k not in GROUP_ONLY_KEYS}


def check_nncf_keys(section: Mapping[str, Any], origin: str) -> None:
    """NNCF quantization keys purecomp cannot honour: ``ConfigError`` where they would change
    results, ``NoEffectWarning`` where they would not."""
    if section.get("scope_overrides"):
        raise ConfigError(f"{origin}scope_overrides", "per-scope quantizer settings are not implemented; use "
                          "initializer.precision.bitwidth_per_scope for bits, or separate sections with target_scopes")
    for group in ("weights", "activations"):
        settings = section.get(group) or {}
        for key in ("ignored_scopes", "target_scopes"):
            if key in settings:
                raise ConfigError(f"{origin}{group}.{key}", f"scopes for {group} alone are not implemented; use the "
                                  f"section's {key} (it applies to weights and activations)")
        if settings.get("unified_scale_ops"):
            raise ConfigError(f"{origin}{group}.unified_scale_ops", "user-given shared-scale groups are not "
                              "implemented; purecomp places quantizers itself")
        if "validate_scopes" in settings:
            warn_no_effect(f"{origin}{group}.validate_scopes", "there are no per-group scopes to validate")
    params = section.get("params", {})
    for key in ("activations_quant_start_epoch", "weights_quant_start_epoch"):
        if params:  # NNCF switches to its staged scheduler when params is given
            start = params.get(key, STAGED_START_DEFAULT)
            if start > 0:
                raise ConfigError(f"{origin}params.{key}", f"staged quantization (quantizers off until epoch {start}) "
                                  "is not implemented; expected 0 (quantize from the start)")
    for key in LOOP_PARAMS:
        if key in params:
            warn_no_effect(f"{origin}params.{key}", "it drives NNCF's sample training loop (learning rate, weight "
                           "decay, gradient accumulation); set it in your own optimizer and loop")
    if "export_to_onnx_standard_ops" in section:
        warn_no_effect(f"{origin}export_to_onnx_standard_ops", "purecomp always exports QuantizeLinear/DequantizeLinear")
    if section.get("overflow_fix", "disable") != "disable":
        warn_no_effect(f"{origin}overflow_fix", "purecomp does not halve the 8-bit weight range; its weights use the "
                       "full range (as with overflow_fix: disable)")
    precision = section.get("initializer", {}).get("precision", {})
    if "dump_init_precision_data" in precision:
        warn_no_effect(f"{origin}initializer.precision.dump_init_precision_data",
                       "the HAWQ / AutoQ report is returned by ctrl.statistics() and saved with the state instead")
