"""JSON config (NNCF key names) -> ``Compression``, validated with jsonschema.

``load_config(dict | path)`` validates and returns a ``CompressionConfig``;
``from_config(dict | path)`` is ``load_config(...).method()``. Every error names the JSON
path of the offending key (``compression[1].weights.bits``) and what was expected.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import torch
from torch import nn

from .compression import Compression, chain
from .errors import ConfigError, InputInfoError, warn_no_effect
from .graph import ModelGraph, trace
from .registry import ALGORITHMS
from .registry import schema as registered_schema

DEFAULT_BN_ADAPTATION_SAMPLES = 0  # NNCF adapts on 2000 samples by default; see docs/config.md

_DTYPES = {
    "float": torch.float32, "double": torch.float64, "half": torch.float16,
    "long": torch.int64, "int": torch.int32, "bool": torch.bool,
}


def json_path(parts: Any) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _explain(error: jsonschema.ValidationError, schema: dict[str, Any]) -> ConfigError:
    path = json_path(error.absolute_path)
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed))
        key = extra[0] if extra else "?"
        return ConfigError(json_path([*error.absolute_path, key]), f"unknown key; expected one of {allowed}")
    if error.validator == "required":
        return ConfigError(path, f"missing key: {error.message}")
    if error.validator == "type":
        return ConfigError(path, f"expected {error.validator_value}, got {error.instance!r}")
    if error.validator in ("minimum", "maximum"):
        lo = error.schema.get("minimum", "-inf")
        hi = error.schema.get("maximum", "inf")
        return ConfigError(path, f"expected a value in [{lo}, {hi}], got {error.instance!r}")
    if error.validator == "enum":
        return ConfigError(path, f"expected one of {error.validator_value}, got {error.instance!r}")
    if error.validator == "oneOf":
        # report the most specific failure among the alternatives
        inner = max(error.context or [], key=lambda e: len(e.absolute_path), default=None)
        if inner is not None:
            return _explain(inner, schema)
    return ConfigError(path, error.message)


def _validate(instance: Any, schema: dict[str, Any], root: dict[str, Any], prefix: list[Any]) -> None:
    resolver_schema = {**schema, "$defs": root["$defs"]}
    validator = jsonschema.Draft202012Validator(resolver_schema)
    errors = sorted(validator.iter_errors(instance), key=lambda e: (len(e.absolute_path), str(e.absolute_path)))
    if errors:
        error = errors[0]
        error.path.extendleft(reversed(prefix))  # report paths from the config's root
        raise _explain(error, root)


@dataclasses.dataclass(frozen=True)
class BuildContext:
    """What a builder may need beyond its section; it receives it when it takes a ``context``
    parameter. ``criterion`` (loss of ``(outputs, targets)``) and ``init_data`` (batches of
    ``(inputs, targets)``) serve initializers that need a loss (HAWQ); ``validate_only`` is set
    while ``load_config`` checks the config, before they can be given."""

    target_device: str = "ANY"
    criterion: Callable[[Any, Any], Any] | None = None
    init_data: Iterable[Any] | None = None
    validate_only: bool = False
    eval_fn: Callable[[Any, Any], float] | None = None  # AutoQ's metric: eval_fn(model_apply, loader)
    eval_data: Iterable[Any] | None = None


def _build(name: str, section: Mapping[str, Any], origin: str, context: BuildContext) -> Compression:
    builder = ALGORITHMS[name].builder
    if "context" in inspect.signature(builder).parameters:
        return builder(section, origin, context=context)  # type: ignore[call-arg]
    return builder(section, origin)


@dataclasses.dataclass(frozen=True)
class CompressionConfig:
    """A validated config."""

    data: Mapping[str, Any]

    @property
    def algorithms(self) -> list[tuple[str, Mapping[str, Any]]]:
        """``(origin, section)`` for each compression algorithm, in order (none without ``compression``,
        which NNCF allows: the model is wrapped uncompressed)."""
        section = self.data.get("compression", [])
        if isinstance(section, list):
            return [(f"compression[{i}].", s) for i, s in enumerate(section)]
        return [("compression.", section)]

    def method(
        self, *, criterion: Callable[[Any, Any], Any] | None = None, init_data: Iterable[Any] | None = None,
        eval_fn: Callable[[Any, Any], float] | None = None, eval_data: Iterable[Any] | None = None,
    ) -> Compression:
        """The ``Compression`` this config describes (a chain when several algorithms are listed).

        ``criterion(outputs, targets)`` and ``init_data`` (batches of ``(inputs, targets)``; default:
        the calibration data given to ``init``) are needed by ``initializer.precision`` of
        ``type: hawq``; without a criterion such a config raises ``ConfigError`` naming it.
        ``eval_fn(model_apply, loader) -> float`` and ``eval_data`` (default: the calibration data)
        serve ``type: autoq``."""
        return self._method(BuildContext(self.data.get("target_device", "ANY"), criterion, init_data,
                                         eval_fn=eval_fn, eval_data=eval_data))

    def _method(self, context: BuildContext) -> Compression:
        methods = [_build(s["algorithm"], s, origin, context) for origin, s in self.algorithms]
        return methods[0] if len(methods) == 1 else chain(*methods)

    @property
    def num_bn_adaptation_samples(self) -> int:
        """Largest BatchNorm-adaptation sample count requested by any algorithm (0: none). A section
        without ``initializer.batchnorm_adaptation.num_bn_adaptation_samples`` asks for NNCF's
        default, ``DEFAULT_BN_ADAPTATION_SAMPLES`` (0: off; NNCF uses 2000, docs/config.md says why purecomp does not yet)."""
        counts = [
            s.get("initializer", {}).get("batchnorm_adaptation", {}).get(
                "num_bn_adaptation_samples", DEFAULT_BN_ADAPTATION_SAMPLES)
            for _, s in self.algorithms
        ]
        return max(counts, default=0)

    def example_inputs(self, batch: int | None = None) -> tuple[tuple, dict]:
        """Inputs built from ``input_info`` (``filler``: zeros, ones or random; default random)."""
        if "input_info" not in self.data:
            raise InputInfoError("input_info", "missing; expected {'sample_size': [N, C, H, W]} to build example inputs")
        infos = self.data["input_info"]
        infos = infos if isinstance(infos, list) else [infos]
        args, kwargs = [], {}
        gen = torch.Generator().manual_seed(0)
        for info in infos:
            size = list(info["sample_size"])
            if batch is not None:
                size[0] = batch
            dtype = _DTYPES[info.get("type", "float")]
            filler = info.get("filler", "random")
            if filler == "zeros":
                t = torch.zeros(size, dtype=dtype)
            elif filler == "ones":
                t = torch.ones(size, dtype=dtype)
            elif dtype.is_floating_point:
                t = torch.rand(size, generator=gen).to(dtype)
            else:
                t = torch.randint(0, 2, size, generator=gen).to(dtype)
            if "keyword" in info:
                kwargs[info["keyword"]] = t
            else:
                args.append(t)
        return tuple(args), kwargs

    def trace(self, model: nn.Module) -> ModelGraph:
        """Trace ``model`` on inputs from ``input_info``; raise ``InputInfoError`` when they do not fit."""
        args, kwargs = self.example_inputs()
        device = _model_device(model)
        if device.type != "cpu":  # the inputs go where the model is, as NNCF's dummy inputs do
            args = tuple(a.to(device) for a in args)
            kwargs = {k: v.to(device) for k, v in kwargs.items()}
        was_training = model.training
        model.eval()  # input_info usually has batch 1, which training-mode BatchNorm refuses
        try:
            return trace(model, args, kwargs)
        except Exception as exc:  # the model's own error says why the shapes do not fit
            shapes = [tuple(a.shape) for a in args] + [(k, tuple(v.shape)) for k, v in kwargs.items()]
            raise InputInfoError(
                "input_info",
                f"the model cannot run on inputs of shape {shapes}: {type(exc).__name__}: {exc}",
            ) from exc
        finally:
            model.train(was_training)


def _model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (the CPU for a model with neither)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _check_nncf_root(data: Mapping[str, Any], cfg: CompressionConfig) -> None:
    """NNCF's root-level keys purecomp cannot honour: a ``ConfigError`` where they change results,
    a ``NoEffectWarning`` where they do not."""
    if "accuracy_aware_training" in data:
        raise ConfigError(
            "accuracy_aware_training",
            "NNCF's accuracy-aware training loop (early exit / adaptive compression level) is not implemented: it "
            "would change the compression level and the number of epochs during training; remove the key and "
            "choose the compression level yourself",
        )
    paths = [("compression_lr_multiplier", data)] + [
        (f"{origin}compression_lr_multiplier", s) for origin, s in cfg.algorithms
    ]
    for path, holder in paths:
        if "compression_lr_multiplier" in holder and holder["compression_lr_multiplier"] != 1:
            raise ConfigError(
                path,
                "scaling the gradients of compression parameters is not implemented (it would change training); "
                "give the compression state's parameters their own optimizer group with the learning rate you want",
            )
    if "disable_shape_matching" in data:
        warn_no_effect("disable_shape_matching",
                       "purecomp records the graph by running the model and matches call sites by name, not by shape")


def load_config(config: Mapping[str, Any] | str | Path) -> CompressionConfig:
    """Read (when a path) and validate a config; unknown keys and wrong types raise ``ConfigError``."""
    if isinstance(config, (str, Path)):
        path = Path(config)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError("", f"config file {str(path)!r} does not exist") from None
        except json.JSONDecodeError as exc:
            raise ConfigError("", f"config file {str(path)!r} is not valid JSON: {exc}") from None
    elif isinstance(config, Mapping):
        data = copy.deepcopy(dict(config))
    else:
        raise ConfigError("", f"expected a dict or a path to a JSON file, got {type(config).__name__}")
    root = registered_schema()
    _validate(data, root, root, [])
    cfg = CompressionConfig(data)
    _check_nncf_root(data, cfg)
    for origin, section in cfg.algorithms:
        name = section["algorithm"]
        if name not in ALGORITHMS:
            raise ConfigError(f"{origin}algorithm", f"unknown algorithm {name!r}; expected one of {sorted(ALGORITHMS)}")
        sub = ALGORITHMS[name].schema
        if sub is not None:
            prefix = _origin_parts(origin)
            _validate(section, sub, root, prefix)
    # semantic checks (ranges, percentiles) raise here, with their JSON path
    cfg._method(BuildContext(data.get("target_device", "ANY"), validate_only=True))
    return cfg


def _origin_parts(origin: str) -> list[Any]:
    parts: list[Any] = ["compression"]
    if origin.startswith("compression["):
        parts.append(int(origin[len("compression["):origin.index("]")]))
    return parts


def from_config(config: Mapping[str, Any] | str | Path) -> Compression:
    """The ``Compression`` a JSON config (dict or file path) describes."""
    return load_config(config).method()
