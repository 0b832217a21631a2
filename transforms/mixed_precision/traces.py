"""Hutchinson estimates of the Hessian trace of the loss per weight tensor, with ``torch.func``.

For a weight block ``W_i`` and Rademacher probes ``v`` (entries +-1, independent across blocks),
``E_v[v_i^T (H v)_i] = tr(H_ii)`` since the cross terms ``v_i^T H_ij v_j`` have zero mean. ``H v``
is a Hessian-vector product computed for a chunk of probes at once: ``vmap`` over the probe axis
of ``jvp(grad(loss))`` (forward-over-reverse) or of the ``vjp`` of ``grad(loss)``
(reverse-over-reverse, the first-order graph built once per batch and shared by the chunk). The
loss Hessian over the data is the mean over equally sized batches, so
``tr_i = mean_{probes, batches} v_i^T (H_b v)_i``; ``avg_trace_i = tr_i / numel(W_i)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import optree
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp, vmap
from tqdm.auto import tqdm

from purecomp.data import batch_inputs, batch_size
from purecomp.errors import CalibrationError

log = logging.getLogger(__name__)

Criterion = Callable[[Any, Any], Tensor]
HVP_MODES = ("forward", "reverse")


@dataclasses.dataclass(frozen=True)
class Batch:
    """Model inputs and the loss target of one batch."""

    args: tuple
    kwargs: dict
    target: Any


@dataclasses.dataclass(frozen=True)
class TraceEstimate:
    """Hutchinson trace of each weight's Hessian block, and how many probes produced it."""

    traces: dict[str, float]
    numel: dict[str, int]
    probes: int

    @property
    def average(self) -> dict[str, float]:
        """``avg_trace_i = tr(H_ii) / numel(W_i)``."""
        return {k: t / self.numel[k] for k, t in self.traces.items()}


def _split(batch: Any) -> Batch:
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise CalibrationError(
            f"Hessian traces need batches of (inputs, targets) for the loss, got {type(batch).__name__}"
            + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
        )
    args, kwargs = batch_inputs(batch)
    return Batch(args, kwargs, batch[-1])


def collect_batches(data: Iterable[Any] | None, num_data_points: int, chunk: int | None = None) -> list[Batch]:
    """The first ``num_data_points`` samples of ``data`` (batches of ``(inputs, targets)``), regrouped
    into batches of ``chunk`` samples (``None``: one batch). Regrouping leaves the Hessian of a
    mean-reduced loss unchanged when the batches are equal in size."""
    if data is None:
        raise CalibrationError("Hessian traces need data: batches of (inputs, targets), got None")
    if num_data_points < 1:
        raise CalibrationError(f"num_data_points must be at least 1, got {num_data_points}")
    taken: list[Batch] = []
    seen = 0
    for raw in data:
        b = _split(raw)
        n = batch_size(b.args, b.kwargs)
        keep = min(n, num_data_points - seen)
        taken.append(_slice(b, 0, keep))
        seen += keep
        if seen >= num_data_points:
            break
    if not taken:
        raise CalibrationError("Hessian traces: the data yielded no batch")
    whole = optree.tree_map(lambda *ts: torch.cat(ts) if isinstance(ts[0], Tensor) else ts[0],
                            *[(b.args, b.kwargs, b.target) for b in taken])
    merged = Batch(*whole)
    size = chunk or seen
    return [_slice(merged, i, min(i + size, seen)) for i in range(0, seen, size)]


def _slice(b: Batch, start: int, stop: int) -> Batch:
    cut = lambda t: t[start:stop] if isinstance(t, Tensor) and t.dim() > 0 else t  # noqa: E731
    return Batch(optree.tree_map(cut, b.args), optree.tree_map(cut, b.kwargs), optree.tree_map(cut, b.target))


def rademacher(shapes: Mapping[str, torch.Size], count: int, generator: torch.Generator) -> dict[str, Tensor]:
    """``count`` probes per weight, entries +-1 with probability 1/2: ``{name: [count, *shape]}``,
    drawn on the generator's device."""
    return {
        name: torch.randint(0, 2, (count, *shape), generator=generator, device=generator.device)
        .mul_(2).sub_(1).float()
        for name, shape in shapes.items()
    }


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the block: BatchNorm uses (and never writes) its running statistics."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def hessian_vector_products(
    loss: Callable[[dict[str, Tensor]], Tensor], weights: dict[str, Tensor], probes: dict[str, Tensor], mode: str
) -> dict[str, Tensor]:
    """``H v`` for each probe (leading axis of ``probes``), ``H`` the Hessian of ``loss`` at ``weights``."""
    if mode == "forward":
        def hvp(v: dict[str, Tensor]) -> dict[str, Tensor]:
            return jvp(grad(loss), (weights,), (v,))[1]

        return vmap(hvp, randomness="same")(probes)
    if mode == "reverse":
        _, pullback = vjp(grad(loss), weights)
        return vmap(lambda v: pullback(v)[0], randomness="same")(probes)
    raise ValueError(f"unknown Hessian-vector product mode {mode!r}; expected one of {HVP_MODES}")


def hutchinson_traces(
    model: nn.Module,
    params: Mapping[str, Tensor],
    names: Sequence[str],
    batches: Sequence[Batch],
    criterion: Criterion,
    *,
    iter_number: int = 200,
    tolerance: float = 1e-4,
    seed: int = 0,
    chunk: int = 10,
    mode: str = "reverse",
) -> TraceEstimate:
    """Hutchinson trace of the Hessian block of each weight in ``names``.

    Probes come in chunks of ``chunk`` (drawn from a generator seeded with ``seed``) until
    ``iter_number`` probes were used or the running mean of the total trace changes by less than
    ``tolerance`` (relative) from one chunk to the next. The model runs in eval mode.
    """
    if iter_number < 1:
        raise ValueError(f"iter_number must be at least 1, got {iter_number}")
    frozen = {k: v.detach() for k, v in params.items() if k not in names}
    weights = {k: params[k].detach() for k in names}
    shapes = {k: w.shape for k, w in weights.items()}
    device = next(iter(weights.values())).device
    generator = torch.Generator(device=device).manual_seed(seed)  # probes drawn where the weights are
    sums = {k: 0.0 for k in names}
    used = 0
    previous: float | None = None
    with eval_mode(model), tqdm(total=iter_number, desc="Hessian traces", unit="probe", leave=False,
                                disable=None) as bar:
        while used < iter_number:
            count = min(chunk, iter_number - used)
            probes = rademacher(shapes, count, generator)
            for b in batches:
                def loss(w: dict[str, Tensor], b: Batch = b) -> Tensor:
                    return criterion(functional_call(model, {**frozen, **w}, b.args, b.kwargs), b.target)

                hv = hessian_vector_products(loss, weights, probes, mode)
                for k in names:
                    sums[k] += float((hv[k] * probes[k]).sum()) / len(batches)
            used += count
            bar.update(count)
            mean = sum(sums.values()) / used
            if previous is not None and abs(mean - previous) <= tolerance * (abs(previous) + 1e-12):
                log.info("Hessian traces converged after %d probes (relative change below %g)", used, tolerance)
                break
            previous = mean
    return TraceEstimate({k: s / used for k, s in sums.items()}, {k: w.numel() for k, w in weights.items()}, used)


def autograd_traces(
    model: nn.Module,
    params: Mapping[str, Tensor],
    names: Sequence[str],
    batches: Sequence[Batch],
    criterion: Criterion,
    probes: Mapping[str, Tensor],
) -> dict[str, float]:
    """The same estimate by a reverse-over-reverse ``torch.autograd.grad`` loop, one probe at a
    time (the reference for tests and the bench baseline): ``g = dL/dW`` with ``create_graph``,
    then ``H v = d(g . v)/dW``."""
    count = len(next(iter(probes.values())))
    sums = {k: 0.0 for k in names}
    with eval_mode(model):
        for i in range(count):
            for b in batches:
                weights = {k: params[k].detach().requires_grad_(True) for k in names}
                frozen = {k: v.detach() for k, v in params.items() if k not in names}
                out = functional_call(model, {**frozen, **weights}, b.args, b.kwargs)
                grads = torch.autograd.grad(criterion(out, b.target), list(weights.values()), create_graph=True)
                hv = torch.autograd.grad(grads, list(weights.values()),
                                         [probes[k][i].to(weights[k].device) for k in names])
                for k, h in zip(names, hv):
                    sums[k] += float((h * probes[k][i].to(h.device)).sum()) / len(batches)
    return {k: s / count for k, s in sums.items()}
