"""Regularization-based (L0) sparsity, paper eq. 6-7.

``theta_j = w_j z_j`` with the stochastic gate ``z_j = [sigmoid(s_j + logit(u_j)) > 0.5]``,
``u ~ U(0, 1)`` sampled once per training step; straight-through for the threshold (the
gradient of ``sigmoid(s + logit(u))``). The loss ``(mean_j sigmoid(s_j) - SL)^2`` pulls the
expected density ``D = mean_j sigmoid(s_j)`` towards ``SL = 1 - level``.

In eval mode, from ``freeze_epoch`` on and on export the gate is deterministic: it keeps the
``round(D * N)`` weights with the largest logits (of all ``N`` gated weights). That mask has
exactly the density training reached. ``[s > 0]`` would not: after a short fine-tuning
most logits hover just below 0 (digits CNN: ``D = 0.50`` while only 20% of the logits are
positive). The mask is computed once at the freeze and kept.

The randomness is carried in the state: ``seed`` (metadata) and a step counter (a tensor
leaf). ``u`` for weight ``k`` at step ``t`` comes from a generator seeded with
``(seed, t, k)``, so a run is reproducible and identical on every process.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from purecomp.compression import Compression, Progress
from purecomp.init_context import InitContext
from purecomp.schedules import (
    AdaptiveLevel,
    Schedule,
    adaptive_step,
    constant,
    final_level,
    progress_toward,
)
from purecomp.struct import replace, static_field, struct

from .common import keep_largest, level_rows, sparsified_weights, sparsity_table

INITIAL_KEEP_PROBABILITY = 0.99  # logits start at logit(0.99): every gate open


@struct
class RBSparsityState:
    """Trainable gate logits by weight name and the RNG step counter."""

    logits: dict[str, Tensor]
    step_count: Tensor
    frozen_masks: dict[str, Tensor]
    seed: int = static_field()
    level: float = static_field()
    frozen: bool = static_field(default=False)
    training: bool = static_field(default=True)
    adaptive: AdaptiveLevel | None = static_field(default=None)
    epoch: int = static_field(default=0)
    target: float | None = static_field(default=None)  # the schedule's (or adaptive) final level

    def expected_density(self) -> float:
        """``D = mean_j sigmoid(s_j)``: the expected fraction of open gates."""
        total = sum(float(torch.sigmoid(s.detach()).sum()) for s in self.logits.values())
        return total / max(1, sum(s.numel() for s in self.logits.values()))

    def gates(self) -> dict[str, Tensor]:
        """Deterministic gates: the frozen masks, else the ``round(D N)`` largest logits."""
        if self.frozen_masks:
            return dict(self.frozen_masks)
        scores = {n: s.detach().float() for n, s in self.logits.items()}
        if not scores:  # no weight selected: no gate
            return {}
        flat = keep_largest(torch.cat([s.reshape(-1) for s in scores.values()]), 1.0 - self.expected_density())
        masks, offset = {}, 0
        for n, s in scores.items():
            masks[n] = flat[offset: offset + s.numel()].reshape(s.shape)
            offset += s.numel()
        return masks

    def rows(self) -> list[dict]:
        return level_rows(self.gates(), self.level)

    def statistics(self, graph: Any = None) -> dict[str, list[dict]]:
        return sparsity_table("RBSparsity", self.rows())

    def compression_progress(self) -> float:
        return progress_toward(self.level, self.target)


def _uniform(shape: torch.Size, seed: int, step: int, index: int) -> Tensor:
    generator = torch.Generator().manual_seed((seed * 1_000_003 + step * 7_919 + index) % (2**63 - 1))
    return torch.rand(shape, generator=generator).clamp(1e-6, 1 - 1e-6)


def sample_gates(state: RBSparsityState) -> dict[str, Tensor]:
    """Stochastic gates with straight-through gradients to the logits (training); else the
    deterministic gates (``RBSparsityState.gates``: the frozen masks, or the ``round(D N)``
    largest logits)."""
    if not state.training or state.frozen_masks:
        return state.gates()
    step = int(state.step_count)
    out = {}
    for k, (name, s) in enumerate(state.logits.items()):
        u = _uniform(s.shape, state.seed, step, k).to(device=s.device, dtype=s.dtype)  # drawn on the CPU: same on every device
        soft = torch.sigmoid(s + torch.log(u) - torch.log1p(-u))
        out[name] = soft + ((soft > 0.5).to(soft.dtype) - soft).detach()
    return out


def density_loss(state: RBSparsityState) -> Tensor:
    """``(mean_j sigmoid(s_j) - (1 - level))^2`` over all gated weights; 0 once frozen."""
    if state.frozen or not state.logits:
        return torch.zeros(())
    total = sum(torch.sigmoid(s).sum() for s in state.logits.values())
    count = sum(s.numel() for s in state.logits.values())
    return (total / count - (1.0 - state.level)) ** 2


def rb_sparsity(
    schedule: Schedule | float = 0.5,
    *,
    seed: int = 0,
    freeze_epoch: int | None = None,
    adaptive: dict[str, Any] | None = None,
    ignored_scopes: Sequence[str] = (),
    target_scopes: Sequence[str] | None = None,
    origin: str = "",
) -> Compression:
    """RB sparsity towards ``schedule(progress)`` (a ``purecomp.schedules`` function or a constant).

    ``adaptive=dict(init=..., target=..., patience=..., step=...)`` replaces the schedule by
    the adaptive one, which raises the level when the density loss stayed small for
    ``patience`` epochs. Train the logits (``purecomp.trainable(state)``) with the weights and
    add ``method.loss(params, state)`` to the task loss.
    """
    level_of = constant(schedule, origin) if isinstance(schedule, (int, float)) else schedule

    def init(context: InitContext) -> RBSparsityState:
        names = sparsified_weights(context.graph, ignored_scopes, target_scopes, origin, context.scope)
        params = context.params
        start = torch.logit(torch.tensor(INITIAL_KEEP_PROBABILITY)).item()
        logits = {n: torch.full_like(params[n], start, dtype=torch.float32).requires_grad_(True) for n in names}
        if adaptive is not None:
            state_a = AdaptiveLevel(adaptive["init"], adaptive["patience"])
            return RBSparsityState(logits, torch.zeros((), dtype=torch.int64), {}, seed, state_a.level, adaptive=state_a,
                                   target=adaptive["target"])
        return RBSparsityState(logits, torch.zeros((), dtype=torch.int64), {}, seed, level_of(Progress()),
                               target=final_level(level_of))

    def params_fn(params: Mapping[str, Tensor], state: RBSparsityState) -> dict[str, Tensor]:
        out = dict(params)
        for name, gate in sample_gates(state).items():
            out[name] = out[name] * gate.to(out[name].dtype)
        return out

    def step(state: RBSparsityState, progress: Progress, params: Any = None) -> RBSparsityState:
        frozen = state.frozen or (freeze_epoch is not None and progress.epoch >= freeze_epoch)
        changes: dict[str, Any] = {"step_count": state.step_count + 1, "frozen": frozen}
        if frozen and not state.frozen:
            changes["frozen_masks"] = state.gates()  # fixed from here on; the logits stop training
            changes["logits"] = {n: s.detach() for n, s in state.logits.items()}
        if state.adaptive is not None:
            if progress.epoch > state.epoch:
                loss = float(density_loss(state).detach())
                new = adaptive_step(state.adaptive, loss, target=adaptive["target"],
                                    patience=adaptive["patience"], step=adaptive.get("step", 0.05))
                changes.update(adaptive=new, level=new.level, epoch=progress.epoch)
        else:
            changes["level"] = level_of(progress)
        return replace(state, **changes)

    return Compression(
        init=init,
        params=params_fn,
        sites=lambda state: {},
        loss=lambda params, state: density_loss(state),
        step=step,
        name="rb_sparsity",
    )
