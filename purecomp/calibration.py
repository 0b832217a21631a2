"""Calibration passes: run samples through a model with observers at chosen sites.

Two modes (``CALIBRATION_MODES``) say what the model computes while it is observed (``"auto"``
picks ``"train"`` for a model in train mode, ``"eval"`` for one in eval mode):

- ``"train"``: the model in train mode, as a training step runs it: BatchNorm normalizes each
  calibration batch with that batch's own statistics, dropout and stochastic depth are active.
  The model's buffers are not changed (the call gets copies of them, so BatchNorm's running
  statistics and ``num_batches_tracked`` stay as they were), and the global random number
  generators are restored afterwards (calibration draws no numbers from the training run's
  stream). A BatchNorm that sees a single value per channel (a batch of one after global
  pooling) normalizes that call with its running statistics, where train mode would raise.
  Statistics collected so describe what quantization-aware training will see, whatever the
  running statistics hold (random init, a new data set).
- ``"eval"``: ``model.eval()``: BatchNorm normalizes with its running statistics, dropout is off.
  Right for a model that will only be evaluated (post-training quantization) and whose running
  statistics describe the data.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .apply import call_with_sites
from .data import describe_inputs, take_samples
from .errors import CalibrationError, PurecompError
from .intercept import SiteFn

CALIBRATION_MODES = ("train", "eval")
AUTO = "auto"  # the mode the model is in: "train" if ``model.training`` else "eval"


def check_mode(mode: str, model: nn.Module | None = None) -> str:
    """``mode`` checked; ``"auto"`` resolved against ``model`` (kept as is without one)."""
    if mode == AUTO:
        return mode if model is None else ("train" if model.training else "eval")
    if mode not in CALIBRATION_MODES:
        raise CalibrationError(f"calibration mode {mode!r} is not one of {[AUTO, *CALIBRATION_MODES]}")
    return mode


@contextlib.contextmanager
def calibration_mode(model: nn.Module, params: Mapping[str, Tensor], mode: str) -> Iterator[dict[str, Tensor]]:
    """Put ``model`` in ``mode`` for the block and yield the params to call it with (``params``
    in eval mode; in train mode ``params`` with every buffer replaced by a copy). The model's
    train/eval flags, BatchNorm settings and the global RNG state are restored afterwards."""
    mode = check_mode(mode, model)
    was_training = model.training
    if mode == "eval":
        model.eval()
        try:
            yield dict(params)
        finally:
            model.train(was_training)
        return
    call_params = dict(params)
    for name, buffer in model.named_buffers():
        call_params[name] = call_params.get(name, buffer).clone()
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    flags = [(m, m.training) for m in model.modules()]

    def one_value_per_channel(module: nn.Module, args: tuple) -> None:
        x = args[0] if args else None
        if isinstance(x, Tensor) and x.dim() >= 2:
            module.training = in_train[module] and x.numel() // x.shape[1] > 1

    devices = sorted({p.device.index or 0 for p in call_params.values() if p.is_cuda})
    model.train()  # a model's own train() override (e.g. one that keeps frozen BatchNorms in eval) applies
    in_train = {bn: bn.training for bn in bns}
    handles = [bn.register_forward_pre_hook(one_value_per_channel) for bn in bns]
    try:
        with torch.random.fork_rng(devices=devices):
            yield call_params
    finally:
        for h in handles:
            h.remove()
        for m, flag in flags:
            m.training = flag


def run_observers(
    model: nn.Module,
    params: Mapping[str, Tensor],
    compose: Callable[[Mapping[str, SiteFn]], Mapping[str, SiteFn]],
    keys: Sequence[str],
    record: Callable[[str, Tensor], None],
    data: Iterable[Any] | None,
    num_samples: int,
    what: str,
    mode: str = "eval",
) -> None:
    """Run ``num_samples`` samples of ``data`` through ``model`` with ``params`` in ``mode``
    (``"eval"``, ``"train"`` or ``"auto"``, see the module's doc), without gradients, calling ``record(key, x)``
    with the tensor ``x`` at each site in ``keys`` (which passes through unchanged). ``compose``
    puts the observers behind the transforms that already act at those sites
    (``InitContext.with_sites``). ``what`` names the pass in errors and progress. Neither the
    model nor ``params`` is changed."""

    def observer(key: str) -> SiteFn:
        def observe(x: Tensor) -> Tensor:
            # min and max propagate NaN and reach +-inf: one reduction instead of a mask of the tensor
            if x.is_floating_point() and x.numel() and not bool(torch.isfinite(torch.stack(torch.aminmax(x))).all()):
                raise CalibrationError(f"{what}: site {key!r} saw NaN or inf on the calibration data; "
                                       "check the data (and the model) for non-finite values")
            record(key, x)
            return x

        return observe

    sites = compose({key: observer(key) for key in keys})
    with calibration_mode(model, params, mode) as call_params, torch.no_grad():
        for args, kwargs in take_samples(data, num_samples, what):
            try:
                call_with_sites(model, call_params, sites, args, kwargs)
            except PurecompError:
                raise
            except Exception as exc:  # the model refuses the batch: say which pass and what it got
                raise CalibrationError(f"{what}: the model cannot run on a calibration batch "
                                       f"({describe_inputs(args, kwargs)}): {type(exc).__name__}: {exc}") from exc
