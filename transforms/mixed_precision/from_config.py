"""``initializer.precision`` of a quantization config section -> a precision initializer."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from purecomp.errors import ConfigError, warn_no_effect

from .autoq.method import AutoQ, autoq
from .hardware import hardware_setting, hardware_table
from .hawq import Hawq, Manual, hawq, manual

HAWQ_KEYS = ("bits", "num_data_points", "iter_number", "tolerance", "compression_ratio",
             "bitwidth_assignment_mode", "seed")
MANUAL_KEYS = ("bitwidth_per_scope",)
AUTOQ_KEYS = ("bits", "iter_number", "compression_ratio", "eval_subset_ratio", "warmup_iter_number",
              "bitwidth_assignment_mode", "seed")
# every key NNCF's precision schema accepts, whatever the type (purecomp adds ``seed``)
NNCF_KEYS = ("type", "bits", "num_data_points", "iter_number", "tolerance", "compression_ratio",
             "eval_subset_ratio", "warmup_iter_number", "bitwidth_per_scope", "traces_per_layer_path",
             "dump_init_precision_data", "bitwidth_assignment_mode", "seed")
DEFAULT_ASSIGNMENT_MODE = "liberal"  # NNCF's default bitwidth_assignment_mode


def precision_from_config(spec: Mapping[str, Any] | None, path: str, context: Any) -> Hawq | Manual | AutoQ | None:
    """Build from a validated ``precision`` object; ``path`` is its JSON path plus ``.``.

    ``type: hawq`` needs ``context.criterion`` (``CompressionConfig.method(criterion=...)``) unless
    the config is only being validated; ``type: autoq`` needs ``context.eval_fn`` (``eval_data``:
    the data it scores on); ``context.target_device`` supplies the bit widths."""
    if spec is None:
        return None
    kind = spec.get("type", "manual")  # NNCF: a precision section without a type is manual
    allowed = HAWQ_KEYS if kind == "hawq" else AUTOQ_KEYS if kind == "autoq" else MANUAL_KEYS
    if "traces_per_layer_path" in spec:
        raise ConfigError(f"{path}traces_per_layer_path", "loading precomputed Hessian traces is not implemented "
                          "(they would replace the ones HAWQ computes); remove the key")
    for key in spec:
        if key not in ("type", "dump_init_precision_data", "traces_per_layer_path") and key not in allowed:
            # NNCF's schema accepts every precision key whatever the type; the type ignores it
            warn_no_effect(f"{path}{key}", f"type {kind!r} does not read it (it reads {list(allowed)})")
    if kind == "manual":
        if "bitwidth_per_scope" not in spec:
            raise ConfigError(f"{path}bitwidth_per_scope", "missing; type 'manual' needs [[bits, scope], ...]")
        return manual(spec["bitwidth_per_scope"], path)
    options = {k: spec[k] for k in allowed if k in spec}
    device = getattr(context, "target_device", "ANY")
    if "bitwidth_assignment_mode" not in options:
        # NNCF's default, unless the device's hardware setting allows only strict (purecomp's table: NPU)
        modes = getattr(hardware_table().get(device), "modes", (DEFAULT_ASSIGNMENT_MODE,))
        options["bitwidth_assignment_mode"] = DEFAULT_ASSIGNMENT_MODE if DEFAULT_ASSIGNMENT_MODE in modes else modes[0]
    hardware_setting(device, options.get("bits"), options.get("bitwidth_assignment_mode", "strict"), origin=path)
    if kind == "autoq":
        eval_fn = _required(context, "eval_fn", path, "type 'autoq' needs a metric to maximize: call "
                            "CompressionConfig.method(eval_fn=..., eval_data=...)")
        return None if eval_fn is None else autoq(eval_fn, eval_data=getattr(context, "eval_data", None), path=path,
                                                  target_device=device, **options)
    criterion = _required(context, "criterion", path, "type 'hawq' needs a loss for the Hessian: call "
                          "CompressionConfig.method(criterion=..., init_data=...)")
    return None if criterion is None else hawq(criterion, data=getattr(context, "init_data", None), path=path,
                                               target_device=device, **options)


def _required(context: Any, name: str, path: str, message: str) -> Any:
    """``context.<name>``; ``None`` while the config is only validated; else ``ConfigError`` at ``path``."""
    value = getattr(context, name, None)
    if value is None and not getattr(context, "validate_only", False):
        raise ConfigError(path.rstrip("."), message)
    return value
