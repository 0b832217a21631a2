"""The NNCF-style front door: ``create_compressed_model(model, config) -> (controller, module)``.

A thin, imperative wrapper over the pure core; it adds no algorithm. ``CompressedModule``
holds the user's model and the compression state's tensors as parameters (trainable
leaves) and buffers (the rest), so ``torch.optim``, ``DataParallel`` and
``DistributedDataParallel`` see them; its forward is ``purecomp.apply``. The controller
initializes the state (calibration, BatchNorm adaptation, precision init), steps the
schedules, reports statistics, checkpoints and exports.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import struct
from .batchnorm import adapt_batchnorm
from .checkpoint import decode_state, encode_state
from .compressed_module import CompressedModule
from .compression import Compression, Progress
from .config import CompressionConfig, load_config
from .errors import CalibrationError, ConfigError, NothingToCompressWarning, StateError
from .graph import ModelGraph
from .protocol import HasProgress, method_states
from .stats import Report, statistics

COMPRESSION_STATE_VERSION = 1


class Config(dict):
    """An NNCF-style config: the JSON document plus the init arguments registered on it."""

    @classmethod
    def from_json(cls, path: str | Path) -> Config:
        return cls(load_config(path).data)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Config:
        return cls(load_config(data).data)

    @property
    def init_args(self) -> dict[str, Any]:
        return self.setdefault("__init_args__", {})

    def compression_config(self) -> CompressionConfig:
        return load_config({k: v for k, v in self.items() if k != "__init_args__"})


def register_default_init_args(
    config: Config,
    train_loader: Iterable[Any],
    criterion: Callable | None = None,
    *,
    autoq_eval_fn: Callable[[Any, Any], float] | None = None,
    val_loader: Iterable[Any] | None = None,
) -> Config:
    """Remember what ``initialize`` needs: the data (range init, BatchNorm adaptation, HAWQ), the
    loss (HAWQ), and AutoQ's metric ``autoq_eval_fn(model_apply, loader) -> float`` with the
    data it scores on (``val_loader``; default the training data). NNCF's keyword names."""
    if not isinstance(config, Config):
        raise ConfigError("", f"expected a purecomp.Config (Config.from_json / from_dict), got {type(config).__name__}")
    config.init_args.update(data=train_loader, criterion=criterion, eval_fn=autoq_eval_fn, eval_data=val_loader)
    return config


class CompressionStage(enum.IntEnum):
    UNCOMPRESSED = 0
    PARTIALLY_COMPRESSED = 1
    FULLY_COMPRESSED = 2


class Scheduler:
    """NNCF's scheduler calls: ``epoch_step()`` at the start of each epoch, ``step()`` before each batch."""

    def __init__(self, controller: CompressionController) -> None:
        self._ctrl = controller
        self.current_step = -1
        self.current_epoch = -1
        self._steps_in_epoch = 0
        self.steps_per_epoch: int | None = None

    @property
    def progress(self) -> Progress:
        return Progress(max(self.current_step, 0), max(self.current_epoch, 0), self.steps_per_epoch)

    def epoch_step(self, next_epoch: int | None = None) -> None:
        if self.current_epoch == 0 and self.steps_per_epoch is None and self._steps_in_epoch:
            self.steps_per_epoch = self._steps_in_epoch
        self.current_epoch = self.current_epoch + 1 if next_epoch is None else next_epoch
        self._steps_in_epoch = 0
        self._ctrl._advance()

    def step(self, next_step: int | None = None) -> None:
        self.current_step = self.current_step + 1 if next_step is None else next_step
        self._steps_in_epoch += 1
        self._ctrl._advance()

    def state_dict(self) -> dict[str, Any]:
        return {"current_step": self.current_step, "current_epoch": self.current_epoch,
                "steps_in_epoch": self._steps_in_epoch, "steps_per_epoch": self.steps_per_epoch}

    def load_state_dict(self, data: Mapping[str, Any]) -> None:
        self.current_step = int(data["current_step"])
        self.current_epoch = int(data["current_epoch"])
        self._steps_in_epoch = int(data["steps_in_epoch"])
        self.steps_per_epoch = data["steps_per_epoch"]


def model_signature(model: nn.Module) -> dict[str, list[int]]:
    """Parameter and buffer names with their shapes: what a checkpoint must match."""
    named = dict(model.named_parameters()) | dict(model.named_buffers())
    return {name: list(t.shape) for name, t in named.items()}


class CompressionController:
    """Imperative handle on the pure pieces: config, method, graph, the module holding the state."""

    def __init__(self, config: Config, method: Compression, graph: ModelGraph, module: CompressedModule) -> None:
        self.config = config
        self.method = method
        self.graph = graph
        self.module = module
        self.scheduler = Scheduler(self)
        self._distributed = False

    @property
    def state(self) -> Any:
        return self.module.state

    def initialize(self, data_loader: Iterable[Any] | None = None, *, calibration_mode: str = "eval") -> None:
        """Range init / calibration, then BatchNorm adaptation if the config asks for it.

        ``data_loader`` defaults to the one given to ``register_default_init_args``.
        ``calibration_mode`` is the mode calibration runs the model in (``InitContext``): ``"auto"``
        (the model's current mode), ``"train"`` (BatchNorm on batch statistics, as training sees
        them) or ``"eval"``. In a
        distributed run (``distributed()``) rank 0's state and BatchNorm statistics are
        broadcast, so every rank holds identical quantizers, masks and gates.
        """
        data = data_loader if data_loader is not None else self.config.init_args.get("data")
        if data is None:
            raise CalibrationError("initialize needs a data loader (argument or register_default_init_args)")
        model = self.module.model
        state = self.method.init(self.graph, self.module.model_params(), data, calibration_mode=calibration_mode)
        samples = self.config.compression_config().num_bn_adaptation_samples
        if samples > 0:
            params = self.module.model_params() | dict(model.named_buffers())
            adapted = adapt_batchnorm(model, self.method, params, state, data, samples)
            with torch.no_grad():
                for name, buffer in model.named_buffers():
                    if name in adapted and adapted[name] is not buffer:
                        buffer.copy_(adapted[name])
        self.module.set_state(state)
        if not any(t.is_floating_point() for t in struct.tree_leaves(state) if isinstance(t, Tensor)):
            import warnings

            warnings.warn(f"the config's methods ({', '.join(self._algorithm_names())}) found nothing to compress in "
                          f"{type(model).__name__}: no weight or site was selected, so the compressed model computes "
                          "what the model computes (check ignored_scopes / target_scopes)", NothingToCompressWarning,
                          stacklevel=2)
        if self._distributed:
            self._broadcast_from_rank0()

    def _broadcast_from_rank0(self) -> None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise StateError("distributed() was called but torch.distributed is not initialized")
        # The structure first: static metadata (a precision plan's bits) may differ between ranks.
        structure, tensors = encode_state(self.state)
        header = [structure, [(tuple(t.shape), str(t.dtype)) for t in tensors]]
        dist.broadcast_object_list(header, src=0)
        structure, layout = header
        if dist.get_rank() != 0:
            dtypes = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64,
                                           torch.int8, torch.uint8, torch.int32, torch.int64, torch.bool)}
            tensors = [torch.empty(shape, dtype=dtypes[dtype]) for shape, dtype in layout]
        for t in tensors:
            dist.broadcast(t, src=0)
        self.module.set_state(decode_state(structure, tensors))
        with torch.no_grad():
            for t in list(self.module.parameters()) + list(self.module.buffers()):
                dist.broadcast(t.data, src=0)

    def distributed(self) -> None:
        """Make ``initialize`` broadcast rank 0's state to every rank (call before ``initialize``)."""
        self._distributed = True

    def _algorithm_names(self) -> list[str]:
        return [section["algorithm"] for _, section in self.config.compression_config().algorithms] or ["none"]

    def _advance(self) -> None:
        self._check_finite()
        state = self.method.step(self.state, self.scheduler.progress, self.module.model_params())
        self.module.set_state(state)

    def _check_finite(self) -> None:
        """``NumericalError`` when training made a state leaf (or, at an epoch step, a weight) NaN or inf:
        the trainable state leaves at each ``step()``, the whole state and the model's parameters at
        each ``epoch_step()`` (``purecomp.numerics``; one synchronization each)."""
        from .numerics import check_finite, state_leaves

        sched = self.scheduler
        epoch_start = sched._steps_in_epoch == 0
        named = state_leaves(self.state, trainable_only=not epoch_start)
        if epoch_start:
            named += [(f"model/{n}", p) for n, p in self.module.model.named_parameters() if p.is_floating_point()]
        check_finite(named, f"at step {sched.current_step}, epoch {sched.current_epoch}")

    def loss(self) -> Tensor:
        return self.method.loss(self.module.model_params(), self.state)

    def statistics(self) -> Report:
        return statistics(self.graph, self.state)

    def compression_stage(self) -> CompressionStage:
        """FULLY once every method is at its target, PARTIALLY before, UNCOMPRESSED with nothing on.

        Each state struct reports its own progress (``compression_progress()``, ``purecomp.protocol``);
        one without it (quantization) counts as fully applied."""
        levels = [member.compression_progress() if isinstance(member, HasProgress) else 1.0
                  for member in method_states(self.state)]
        if all(v >= 1.0 - 1e-9 for v in levels):
            return CompressionStage.FULLY_COMPRESSED
        if any(v > 0 for v in levels):
            return CompressionStage.PARTIALLY_COMPRESSED
        return CompressionStage.UNCOMPRESSED

    def get_compression_state(self) -> dict[str, Any]:
        """Config, model signature, scheduler position and the state: tensors and strings only."""
        structure, tensors = encode_state(self.state)
        config = {k: v for k, v in self.config.items() if k != "__init_args__"}
        return {
            "version": COMPRESSION_STATE_VERSION,
            "config": json.dumps(config, sort_keys=True),
            "signature": json.dumps(model_signature(self.module.model), sort_keys=True),
            "scheduler": json.dumps(self.scheduler.state_dict()),
            "structure": structure,
            "tensors": tensors,
        }

    def load_compression_state(self, saved: Mapping[str, Any]) -> None:
        """Restore a ``get_compression_state()``; raises ``StateError`` naming any mismatch, changing nothing."""
        missing = {"version", "config", "signature", "scheduler", "structure", "tensors"} - set(saved)
        if missing:
            raise StateError(f"not a purecomp compression state: missing {sorted(missing)}")
        if saved["version"] != COMPRESSION_STATE_VERSION:
            raise StateError(f"compression state version {saved['version']!r}; expected {COMPRESSION_STATE_VERSION}")
        config = {k: v for k, v in self.config.items() if k != "__init_args__"}
        _check_same("config", _saved_json(saved, "config"), config)
        _check_same("model", _saved_json(saved, "signature"), model_signature(self.module.model))
        if not isinstance(saved["tensors"], (list, tuple)):
            raise StateError(f"malformed compression state: 'tensors' is a {type(saved['tensors']).__name__}")
        state = decode_state(saved["structure"], list(saved["tensors"]))
        scheduler = _saved_json(saved, "scheduler")
        keys = ("current_step", "current_epoch", "steps_in_epoch", "steps_per_epoch")
        if not isinstance(scheduler, dict) or any(k not in scheduler for k in keys) or not all(
                isinstance(scheduler[k], int) and not isinstance(scheduler[k], bool) for k in keys[:3]):
            raise StateError(f"malformed compression state: the scheduler entry {scheduler!r} is not {list(keys)}")
        self.module.set_state(state)
        self.scheduler.load_state_dict(scheduler)

    def state_dict(self) -> dict[str, Any]:
        """Alias of ``get_compression_state``."""
        return self.get_compression_state()

    def load_state_dict(self, saved: Mapping[str, Any]) -> None:
        """Alias of ``load_compression_state``."""
        self.load_compression_state(saved)

    def strip(self) -> nn.Module:
        """The materialized module (``purecomp.export.materialize``): masks baked, channels removed, QDQ ops."""
        from .export import materialize

        return materialize(self.module.model, self.method, self.module.model_params(), self.state, self.graph)

    def export_model(self, path: str | Path, example_inputs: Any = None) -> Path:
        """Write ONNX (``purecomp.export.to_onnx``); inputs from ``input_info`` unless given."""
        from .export import to_onnx

        if example_inputs is None:
            args, kwargs = self.config.compression_config().example_inputs()
            if kwargs:
                raise ConfigError("input_info", "export_model needs positional inputs; pass example_inputs")
            example_inputs = args
        return to_onnx(self.module.model, self.method, self.module.model_params(), self.state, example_inputs, path)


def _saved_json(saved: Mapping[str, Any], key: str) -> Any:
    try:
        return json.loads(saved[key])
    except (TypeError, json.JSONDecodeError) as exc:
        raise StateError(f"malformed compression state: {key!r} is not a JSON string ({exc})") from None


def _check_same(what: str, saved: Any, current: Any) -> None:
    if saved == current:
        return
    if isinstance(saved, dict) and isinstance(current, dict):
        for key in sorted(set(saved) | set(current)):
            if saved.get(key) != current.get(key):
                raise StateError(
                    f"the compression state was built for another {what}: {key!r} is "
                    f"{saved.get(key)!r} in the checkpoint, {current.get(key)!r} here"
                )
    raise StateError(f"the compression state was built for another {what}")


def create_compressed_model(
    model: nn.Module, config: Config | Mapping[str, Any], compression_state: Mapping[str, Any] | None = None
) -> tuple[CompressionController, CompressedModule]:
    """Wrap ``model`` for compressed training (NNCF's entry point).

    Without ``compression_state`` the returned controller must be initialized
    (``ctrl.initialize(loader)`` or the loader given to ``register_default_init_args``, used
    at once when present). With it, the state is restored (no calibration runs).
    """
    if not isinstance(config, Config):
        config = Config.from_dict(config)
    cconfig = config.compression_config()
    args = config.init_args
    method = cconfig.method(criterion=args.get("criterion"), init_data=args.get("data"),
                            eval_fn=args.get("eval_fn"), eval_data=args.get("eval_data"))
    graph = cconfig.trace(model)
    module = CompressedModule(model, method)
    ctrl = CompressionController(config, method, graph, module)
    if compression_state is not None:
        ctrl.load_compression_state(compression_state)
    elif config.init_args.get("data") is not None:
        ctrl.initialize()
    return ctrl, module
