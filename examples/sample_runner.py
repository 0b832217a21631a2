"""The machinery the training samples share: arguments, DDP, the compressed model, the loops, export.

A sample (classification, detection, segmentation) describes its task with a ``prepare``
function returning ``SampleParts`` (model, data sets, loss, metric) and calls
``run_sample(prepare, argv)``. Everything else is here:

- ``add_common_args``: ``--config --mode --epochs --batch-size --lr --weights --resume
  --output-dir --seed --workers --max-steps-per-epoch --max-eval-batches``;
- ``setup_distributed``: a gloo process group from the variables torchrun sets
  (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...), a single process otherwise;
- ``build_compressed``: ``pc.Config`` + ``register_default_init_args`` +
  ``create_compressed_model`` (calibration on the training data, or restored from a checkpoint);
- ``train_one_epoch``: ``ctrl.scheduler.step()`` before each batch, task loss + ``ctrl.loss()``;
  ``ctrl.scheduler.epoch_step()`` starts each epoch;
- checkpoints: ``{"model": module.state_dict(), "compression": ctrl.get_compression_state(), ...}``
  written crash-safely (``purecomp.checkpoint.save_torch``: temporary file, fsync, rename) and read
  back with ``purecomp.checkpoint.load_torch`` (``weights_only=True``; ``StateError`` when damaged);
- ``export_and_check``: ``ctrl.export_model(path)`` and one batch through ONNX Runtime,
  compared with the PyTorch compressed model.

Modes: ``train`` (compress, fine-tune, checkpoint every epoch, evaluate, export),
``test`` (evaluate; from ``--resume`` or freshly calibrated from ``--weights``) and ``export``
(ONNX from ``--resume`` or freshly calibrated).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

import purecomp as pc
from purecomp.checkpoint import load_torch, save_torch

MODES = ("train", "test", "export")


class SampleError(ValueError):
    """A sample's input (arguments, files, checkpoint) is not what the sample expects."""


class WeightsError(SampleError):
    """A ``--weights`` file does not fit the model (missing, unexpected or reshaped tensors)."""


Metrics = dict[str, float]
Evaluate = Callable[[nn.Module, Iterable[Any]], Metrics]


@dataclasses.dataclass
class SampleParts:
    """What a task gives the runner.

    ``input_shape`` is one sample's shape (C, H, W), written into the config's ``input_info``.
    ``agreement`` = (output index, class dimension): the ONNX check compares the argmax there.
    ``criterion(outputs, targets)`` is the task loss; ``evaluate(model, batches)`` returns
    metrics (the first is the one the checkpoint ``best.pt`` is chosen by, higher is better).
    """

    model: nn.Module
    train_set: Dataset
    val_set: Dataset
    criterion: Callable[[Any, Any], Tensor]
    evaluate: Evaluate
    input_shape: Sequence[int]
    collate_fn: Callable[[list[Any]], Any] | None = None
    summary: dict[str, Any] = dataclasses.field(default_factory=dict)
    agreement: tuple[int, int] = (0, 1)
    drop_last: bool = False  # training drops an incomplete last batch (e.g. BatchNorm on 1x1 maps needs 2 samples)


Prepare = Callable[[argparse.Namespace, Mapping[str, Any]], SampleParts]


# ---------------------------------------------------------------------------------- arguments


def add_common_args(parser: argparse.ArgumentParser, default_config: Path | None = None) -> argparse.ArgumentParser:
    """The arguments every sample takes; ``None`` defaults fall back to the config's keys."""
    parser.add_argument("--config", type=Path, default=default_config, required=default_config is None,
                        help="compression config JSON (see examples/configs/)")
    parser.add_argument("--mode", choices=MODES, default="train")
    parser.add_argument("--epochs", type=int, default=None, help="default: the config's 'epochs', else 1")
    parser.add_argument("--batch-size", type=int, default=None, help="per process; default: the config's 'batch_size'")
    parser.add_argument("--lr", type=float, default=None, help="default: the config's optimizer.base_lr")
    parser.add_argument("--weights", type=Path, default=None,
                        help="state_dict of the uncompressed model to start from (never downloaded)")
    parser.add_argument("--resume", type=Path, default=None,
                        help="a checkpoint written by this sample: resume training, or test / export it")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="checkpoints and ONNX; default: the config's 'log_dir', else runs/")
    parser.add_argument("--seed", type=int, default=None, help="default: the config's 'seed', else 0")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--max-steps-per-epoch", type=int, default=None, help="cut each training epoch short")
    parser.add_argument("--max-eval-batches", type=int, default=None, help="evaluate on this many batches only")
    parser.add_argument("--no-export", action="store_true", help="train/test without writing ONNX at the end")
    return parser


def resolve(args: argparse.Namespace, config: Mapping[str, Any]) -> argparse.Namespace:
    """Fill the ``None`` arguments from the config's training keys (NNCF samples' convention)."""
    optimizer = dict(config.get("optimizer", {}))
    filled = {
        "epochs": config.get("epochs", 1),
        "batch_size": config.get("batch_size", 8),
        "lr": optimizer.get("base_lr", 1e-3),
        "seed": config.get("seed", 0),
        "output_dir": Path(config.get("log_dir", "runs")),
    }
    out = argparse.Namespace(**vars(args))
    for key, value in filled.items():
        if getattr(out, key, None) is None:
            setattr(out, key, value)
    return out


# ---------------------------------------------------------------------------------- processes


@dataclasses.dataclass(frozen=True)
class DistInfo:
    """Rank and world size; ``enabled`` when torchrun started more than one process."""

    rank: int = 0
    world_size: int = 1
    enabled: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> DistInfo:
    """A gloo process group when torchrun's ``WORLD_SIZE`` > 1, else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), True)


def cleanup_distributed(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_loader(
    dataset: Dataset, batch_size: int, train: bool, info: DistInfo, workers: int, seed: int,
    collate_fn: Callable | None = None, drop_last: bool = False,
) -> DataLoader:
    """Shuffled (and sharded across ranks) for training; in order, whole, for evaluation.
    ``drop_last`` drops an incomplete last training batch (evaluation always keeps it)."""
    sampler = DistributedSampler(dataset, info.world_size, info.rank, shuffle=True, seed=seed) if (
        train and info.enabled) else None
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=train and sampler is None, sampler=sampler,
                      num_workers=workers, collate_fn=collate_fn, generator=generator, drop_last=train and drop_last)


def limited(batches: Iterable[Any], limit: int | None, desc: str, disable: bool = False) -> Iterator[Any]:
    """Iterate ``batches`` (at most ``limit``) with a progress bar."""
    total = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
    if limit is not None and total is not None:
        total = min(total, limit)
    with tqdm(batches, total=total, desc=desc, leave=False, disable=True if disable else None) as bar:
        for i, batch in enumerate(bar):
            if limit is not None and i >= limit:
                break
            yield batch


# ---------------------------------------------------------------------------------- config, model


def sample_config(path: Path, input_shape: Sequence[int]) -> pc.Config:
    """The config at ``path`` with ``input_info.sample_size`` set to ``[1, *input_shape]``."""
    path = Path(path)
    if not path.is_file():
        raise SampleError(f"config {path} does not exist; expected a JSON file such as examples/configs/resnet18_int8.json")
    data = json.loads(path.read_text())
    info = data.get("input_info")
    if isinstance(info, list):
        raise SampleError(f"{path}: input_info must be one input for the samples, got a list of {len(info)}")
    data["input_info"] = {**(info or {}), "sample_size": [1, *[int(v) for v in input_shape]]}
    return pc.Config.from_dict(data)


def read_config(path: Path) -> dict[str, Any]:
    """The raw JSON of a config (to read the training keys before the model exists)."""
    path = Path(path)
    if not path.is_file():
        raise SampleError(f"config {path} does not exist; expected a JSON file such as examples/configs/resnet18_int8.json")
    return json.loads(path.read_text())


def load_weights(model: nn.Module, path: Path) -> None:
    """Load an uncompressed ``state_dict`` (optionally under 'state_dict' / 'model', 'module.' prefixes
    stripped) into ``model``; ``WeightsError`` lists every missing, unexpected or reshaped key."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"--weights {path} does not exist")
    saved = load_torch(path)
    if isinstance(saved, dict) and "compression" in saved:
        raise WeightsError(f"{path} is a compressed checkpoint of this sample; pass it as --resume, not --weights")
    for key in ("state_dict", "model"):
        if isinstance(saved, dict) and isinstance(saved.get(key), dict):
            saved = saved[key]
    if not isinstance(saved, dict):
        raise WeightsError(f"{path} holds a {type(saved).__name__}; expected a state_dict (name -> tensor)")
    saved = {k.removeprefix("module."): v for k, v in saved.items()}
    own = model.state_dict()
    missing = sorted(set(own) - set(saved))
    unexpected = sorted(set(saved) - set(own))
    reshaped = [f"{k}: {list(saved[k].shape)} in the file, {list(own[k].shape)} in the model"
                for k in sorted(set(own) & set(saved)) if tuple(saved[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or reshaped:
        raise WeightsError(
            f"{path} does not fit the model: missing {_head(missing)}, unexpected {_head(unexpected)}, "
            f"reshaped {_head(reshaped)} (check --arch, --num-classes and the input channels)"
        )
    model.load_state_dict(saved)


def _head(items: list[str], n: int = 5) -> str:
    return "[]" if not items else "[" + ", ".join(items[:n]) + (f", ... {len(items) - n} more]" if len(items) > n else "]")


def autoq_metric(evaluate: Evaluate) -> Callable[[Callable[..., Any], Iterable[Any]], float]:
    """AutoQ's score of a candidate plan: the task's first metric (higher is better) on the loader."""

    @torch.no_grad()
    def score(model_apply: Callable[..., Any], loader: Iterable[Any]) -> float:
        return float(next(iter(evaluate(model_apply, loader).values())))

    return score


def build_compressed(
    model: nn.Module, config: pc.Config, init_loader: Iterable[Any], criterion: Callable | None, info: DistInfo,
    compression_state: Mapping[str, Any] | None = None, evaluate: Evaluate | None = None,
    val_loader: Iterable[Any] | None = None,
) -> tuple[pc.CompressionController, pc.api.CompressedModule]:
    """``create_compressed_model``: restored from ``compression_state``, else calibrated on ``init_loader``
    (in a distributed run each rank calibrates and rank 0's state is broadcast). ``evaluate`` on
    ``val_loader`` scores AutoQ's candidates (``type: autoq`` configs)."""
    if compression_state is not None:
        return pc.create_compressed_model(model, config, compression_state=compression_state)
    metric = autoq_metric(evaluate) if evaluate is not None else None
    # distributed: no data here, so nothing initializes before ``ctrl.distributed()``
    data = init_loader if not info.enabled else None
    config = pc.register_default_init_args(config, data, criterion, autoq_eval_fn=metric, val_loader=val_loader)
    ctrl, module = pc.create_compressed_model(model, config)
    if not info.enabled:
        return ctrl, module
    ctrl.distributed()
    ctrl.initialize(init_loader)
    return ctrl, module


def make_optimizer(params: Iterable[Tensor], config: Mapping[str, Any], lr: float) -> torch.optim.Optimizer:
    """Adam (default) or SGD from the config's ``optimizer`` (``type``, ``base_lr``, ``weight_decay``, ``momentum``)."""
    spec = dict(config.get("optimizer", {}))
    allowed = {"type", "base_lr", "weight_decay", "momentum"}
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise SampleError(f"optimizer.{unknown[0]}: unknown key; expected one of {sorted(allowed)}")
    kind = str(spec.get("type", "adam")).lower()
    wd = float(spec.get("weight_decay", 0.0))
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=float(spec.get("momentum", 0.9)), weight_decay=wd)
    raise SampleError(f"optimizer.type: {spec['type']!r}; expected 'Adam' or 'SGD'")


# ---------------------------------------------------------------------------------- loops


def train_one_epoch(
    model: nn.Module, ctrl: pc.CompressionController, loader: Iterable[Any], optimizer: torch.optim.Optimizer,
    criterion: Callable[[Any, Any], Tensor], epoch: int, max_steps: int | None, show: bool,
) -> float:
    """One epoch: ``scheduler.step()`` before each batch, loss = task loss + ``ctrl.loss()``; mean loss."""
    model.train()
    total, steps = 0.0, 0
    bar = limited(loader, max_steps, f"epoch {epoch}", disable=not show)
    for inputs, targets in bar:
        ctrl.scheduler.step()
        loss = criterion(model(inputs), targets) + ctrl.loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += float(loss.detach())
        steps += 1
    if steps == 0:
        raise SampleError("the training data yielded no batch; check the dataset directory and --batch-size")
    return total / steps


@torch.no_grad()
def evaluate(module: nn.Module, parts: SampleParts, loader: Iterable[Any], max_batches: int | None) -> Metrics:
    """The task metric of ``module`` in eval mode on (at most ``max_batches`` of) ``loader``."""
    was_training = module.training
    module.eval()
    try:
        return parts.evaluate(module, limited(loader, max_batches, "evaluate"))
    finally:
        module.train(was_training)


# ---------------------------------------------------------------------------------- checkpoints


def save_checkpoint(
    path: Path, module: nn.Module, ctrl: pc.CompressionController, optimizer: torch.optim.Optimizer | None,
    epoch: int, metrics: Metrics,
) -> Path:
    """``{"model", "compression", "optimizer", "epoch", "metrics"}``: tensors and plain values only,
    written crash-safely (a crash mid-write leaves the previous file at ``path`` loadable)."""
    return save_torch(path, {
        "model": module.state_dict(),
        "compression": ctrl.get_compression_state(),
        "optimizer": optimizer.state_dict() if optimizer is not None else {},
        "epoch": epoch,
        "metrics": dict(metrics),
    })


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint of ``save_checkpoint`` (``weights_only``: no pickled code runs; a truncated or
    corrupted file raises ``purecomp.errors.StateError``)."""
    path = Path(path)
    if not path.is_file():
        raise SampleError(f"--resume {path} does not exist")
    saved = load_torch(path)
    missing = {"model", "compression", "epoch"} - set(saved) if isinstance(saved, dict) else {"model"}
    if missing:
        raise SampleError(f"{path} is not a checkpoint of these samples: missing {sorted(missing)}; "
                          "an uncompressed state_dict goes to --weights")
    return saved


# ---------------------------------------------------------------------------------- export


@dataclasses.dataclass(frozen=True)
class ExportCheck:
    """ONNX Runtime run of the exported file on one batch, against the PyTorch compressed model."""

    path: Path
    output_shapes: tuple[tuple[int, ...], ...]
    max_abs_diff: float
    argmax_agreement: float
    max_abs_output: float

    def rows(self) -> dict[str, Any]:
        return {"onnx": str(self.path), "onnx output shapes": self.output_shapes,
                "onnx max |diff| / max |output|": f"{self.max_abs_diff:.3g} / {self.max_abs_output:.3g}",
                "onnx argmax agreement %": self.argmax_agreement}


def _flat_outputs(outputs: Any) -> list[np.ndarray]:
    if isinstance(outputs, Tensor):
        return [outputs.detach().numpy()]
    if isinstance(outputs, Mapping):
        return [a for v in outputs.values() for a in _flat_outputs(v)]
    if isinstance(outputs, (tuple, list)):
        return [a for v in outputs for a in _flat_outputs(v)]
    return []


def onnx_run(path: Path, inputs: Tensor) -> list[np.ndarray]:
    """The outputs of the ONNX file at ``path`` for ``inputs`` in ONNX Runtime (CPU)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: inputs.numpy()})


@torch.no_grad()
def export_and_check(
    ctrl: pc.CompressionController, module: nn.Module, path: Path, inputs: Tensor, agreement: tuple[int, int] = (0, 1),
) -> ExportCheck:
    """``ctrl.export_model(path)``, then run ``inputs`` through ONNX Runtime and PyTorch and compare.

    Agreement: the largest absolute difference over all outputs (next to the largest absolute
    PyTorch output, for scale), and the percentage of positions where the argmax over the class
    dimension is the same, for output ``agreement[0]`` with classes on dimension ``agreement[1]``.
    """
    path = ctrl.export_model(path)
    module.eval()
    expected = _flat_outputs(module(inputs))
    got = onnx_run(path, inputs)
    if len(got) != len(expected):
        raise SampleError(f"{path}: ONNX Runtime returned {len(got)} outputs, PyTorch {len(expected)}")
    diffs = []
    for ours, theirs in zip(expected, got):
        if ours.shape != theirs.shape:
            raise SampleError(f"{path}: ONNX output shape {theirs.shape}, PyTorch {ours.shape}")
        diffs.append(float(np.abs(ours - theirs).max()) if ours.size else 0.0)
    index, dim = agreement
    ours, theirs = expected[index], got[index]
    agree = float((ours.argmax(dim) == theirs.argmax(dim)).mean()) * 100 if ours.size else float("nan")
    scale = max((float(np.abs(a).max()) for a in expected if a.size), default=0.0)
    return ExportCheck(path, tuple(tuple(a.shape) for a in got), max(diffs, default=0.0), agree, scale)


# ---------------------------------------------------------------------------------- report


def metrics_table(rows: Mapping[str, Any], title: str = "results") -> str:
    """A two-column text table of ``rows`` (floats with 4 significant digits)."""
    cells = [(str(k), f"{v:.4g}" if isinstance(v, float) else str(v)) for k, v in rows.items()]
    width = max([len(k) for k, _ in cells] + [6])
    lines = [title, "-" * (width + 2 + max([len(v) for _, v in cells] + [5]))]
    lines += [f"{k.ljust(width)}  {v}" for k, v in cells]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- driver


@dataclasses.dataclass
class RunResult:
    """What ``run_sample`` returns (on every rank; ``export`` only on rank 0)."""

    metrics: Metrics
    checkpoint: Path | None
    export: ExportCheck | None
    table: str
    statistics: str


def command_line(main: Callable[[], Any]) -> None:
    """Run a sample's ``main()`` from the shell: its input errors end the process with their message."""
    try:
        main()
    except (SampleError, FileNotFoundError, pc.errors.PurecompError) as exc:
        raise SystemExit(f"error: {type(exc).__name__}: {exc}") from exc


def run_sample(args: argparse.Namespace, prepare: Prepare) -> RunResult:
    """The whole sample: processes, config, model, then the mode's work; returns metrics and paths."""
    info = setup_distributed()
    try:
        return _run(args, prepare, info)
    finally:
        cleanup_distributed(info)


@dataclasses.dataclass
class Session:
    """Everything a run works on once the model is compressed."""

    args: argparse.Namespace
    raw: dict[str, Any]
    parts: SampleParts
    ctrl: pc.CompressionController
    module: pc.api.CompressedModule
    train_loader: DataLoader
    val_loader: DataLoader
    saved: dict[str, Any] | None
    info: DistInfo

    @property
    def out_dir(self) -> Path:
        return Path(self.args.output_dir)


def _setup(args: argparse.Namespace, prepare: Prepare, info: DistInfo) -> Session:
    """Config, task parts, ``--weights``, loaders and the compressed model (restored with ``--resume``)."""
    raw = read_config(args.config)
    args = resolve(args, raw)
    seed_everything(args.seed)
    parts = prepare(args, raw)
    if args.weights is not None:
        load_weights(parts.model, args.weights)
    elif raw.get("pretrained") and args.resume is None and info.is_main:
        tqdm.write(f"{args.config.name} sets 'pretrained': the samples never download weights; pass --weights PATH "
                   "(starting from random initialization)")
    config = sample_config(args.config, parts.input_shape)
    train_loader = make_loader(parts.train_set, args.batch_size, True, info, args.workers, args.seed, parts.collate_fn,
                               parts.drop_last)
    val_loader = make_loader(parts.val_set, args.batch_size, False, info, args.workers, args.seed, parts.collate_fn)
    saved = load_checkpoint(args.resume) if args.resume is not None else None
    ctrl, module = build_compressed(parts.model, config, train_loader, parts.criterion, info,
                                    saved["compression"] if saved else None, parts.evaluate, val_loader)
    if saved is not None:
        module.load_state_dict(saved["model"])
    return Session(args, raw, parts, ctrl, module, train_loader, val_loader, saved, info)


def _run(args: argparse.Namespace, prepare: Prepare, info: DistInfo) -> RunResult:
    session = _setup(args, prepare, info)
    args = session.args
    checkpoint, metrics = None, {}
    if args.mode == "train":
        checkpoint, metrics = _train(session)
    elif args.mode == "test" and info.is_main:
        metrics = evaluate(session.module, session.parts, session.val_loader, args.max_eval_batches)
    check = None
    if info.is_main and (args.mode == "export" or not args.no_export):
        check = export_and_check(session.ctrl, session.module, session.out_dir / f"{_stem(args)}.onnx",
                                 _first_inputs(session.val_loader), session.parts.agreement)
    barrier(info)
    return _report(session, metrics, checkpoint, check)


def _report(session: Session, metrics: Metrics, checkpoint: Path | None, check: ExportCheck | None) -> RunResult:
    """Print the compression statistics and the run's table (rank 0); the result on every rank."""
    args, info = session.args, session.info
    rows: dict[str, Any] = {"mode": args.mode, "processes": info.world_size, **session.parts.summary, **metrics}
    if check is not None:
        rows |= check.rows()
    rows["compression stage"] = session.ctrl.compression_stage().name
    table = metrics_table(rows, f"{session.parts.summary.get('model', 'model')} ({args.config.name})")
    statistics = str(session.ctrl.statistics())
    if info.is_main:
        print(statistics)
        print(table)
    return RunResult(metrics, checkpoint, check, table, statistics)


def _train(session: Session) -> tuple[Path | None, Metrics]:
    """Fine-tune for ``args.epochs`` epochs (from the checkpoint's epoch + 1 when resuming);
    rank 0 evaluates and checkpoints after each epoch."""
    args, info = session.args, session.info
    model: nn.Module = nn.parallel.DistributedDataParallel(session.module) if info.enabled else session.module
    optimizer = make_optimizer(session.module.parameters(), session.raw, args.lr)
    start = _restore_optimizer(optimizer, session.saved)
    metrics: Metrics = {}
    best, last = -float("inf"), None
    for epoch in range(start, args.epochs):
        metrics = _train_epoch(session, model, optimizer, epoch)
        if info.is_main:
            scores = evaluate(session.module, session.parts, session.val_loader, args.max_eval_batches)
            metrics |= scores
            last, best = _save_epoch(session, optimizer, epoch, metrics, next(iter(scores.values()), 0.0), best)
            tqdm.write(f"epoch {epoch}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        barrier(info)
    return last, metrics


def _restore_optimizer(optimizer: torch.optim.Optimizer, saved: Mapping[str, Any] | None) -> int:
    """Load the checkpoint's optimizer state; the epoch to start from (0 without a checkpoint)."""
    if saved is None:
        return 0
    if saved.get("optimizer"):
        optimizer.load_state_dict(saved["optimizer"])
    return int(saved["epoch"]) + 1


def _train_epoch(session: Session, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int) -> Metrics:
    """``scheduler.epoch_step()`` then one epoch of training; the mean loss and the time taken."""
    loader = session.train_loader
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)
    session.ctrl.scheduler.epoch_step()
    began = time.perf_counter()
    loss = train_one_epoch(model, session.ctrl, loader, optimizer, session.parts.criterion, epoch,
                           session.args.max_steps_per_epoch, session.info.is_main)
    return {"train loss": loss, "epoch time s": time.perf_counter() - began}


def _save_epoch(
    session: Session, optimizer: torch.optim.Optimizer, epoch: int, metrics: Metrics, score: float, best: float,
) -> tuple[Path, float]:
    """Write ``last.pt``, and ``best.pt`` when ``score`` (the task's first metric) beats ``best``."""
    last = save_checkpoint(session.out_dir / "last.pt", session.module, session.ctrl, optimizer, epoch, metrics)
    if score > best:
        save_checkpoint(session.out_dir / "best.pt", session.module, session.ctrl, optimizer, epoch, metrics)
        best = score
    return last, best


def _first_inputs(loader: DataLoader) -> Tensor:
    inputs, _ = next(iter(loader))
    if not isinstance(inputs, Tensor):
        raise SampleError(f"export check needs a tensor input batch, got {type(inputs).__name__}")
    return inputs


def _stem(args: argparse.Namespace) -> str:
    return Path(args.config).stem
