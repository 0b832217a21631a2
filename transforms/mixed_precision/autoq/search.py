"""The AutoQ episode loop over an environment: act, post-process, evaluate, learn, keep the best.

Episode ``e``: walk the units in order; unit ``i`` sees its feature row with the previous action,
the agent acts (``exploration.py``), the action picks a width (``policy.action_to_bits``); the
finished policy is lowered to ``compression_ratio`` (``policy.meet_ratio``) and evaluated:

    reward_e = (score_e - score_INT8) / |score_INT8|      (score_e - score_INT8 when score_INT8 = 0)

with ``score_INT8`` the score of the widest allowed bits everywhere, measured before episode 0.
The executed trajectory (post-processed widths as bin-centre actions, and as previous actions in
the states) goes into the replay buffer, every step carrying ``reward_e``; the agent then makes
``updates_per_episode`` DDPG updates, from the last warm-up episode on. The best policy is the one
with the highest score (ties: the smaller size ratio, then the earlier).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor
from tqdm.auto import tqdm

from purecomp.errors import SearchError

from .ddpg import DDPG
from .exploration import explore, noise_scale
from .options import AutoQOptions
from .policy import action_to_bits, bits_to_action, meet_ratio, size_ratio
from .report import AutoQReport, Episode

log = logging.getLogger(__name__)


class Environment(Protocol):
    """What AutoQ walks: units in order with normalized features ``[L, F]`` (last column: the
    previous action, left 0), their sizes in weights, the allowed bits, and a score to maximize."""

    features: Tensor
    sizes: tuple[int, ...]
    bits: tuple[int, ...]
    names: tuple[tuple[str, ...], ...]

    def evaluate(self, policy: Sequence[int]) -> float: ...

    def plan(self, policy: Sequence[int]) -> dict[str, int]: ...


@dataclasses.dataclass
class _Progress:
    baseline: float = float("nan")
    log: list[Episode] = dataclasses.field(default_factory=list)
    best: tuple[float, float, int, tuple[int, ...]] | None = None  # score, ratio, episode, policy


def _weight_bits(env: Environment, policy: Sequence[int]) -> dict[str, int]:
    return {w: b for unit, b in zip(env.names, policy) for w in unit}


def _report(env: Environment, options: AutoQOptions, progress: _Progress) -> AutoQReport:
    if progress.best is None:
        score, ratio, episode, plan, weights = float("nan"), float("nan"), -1, {}, {}
    else:
        score, ratio, episode, policy = progress.best
        plan, weights = env.plan(policy), _weight_bits(env, policy)
    return AutoQReport(
        plan=plan, weight_bits=weights, ratio=ratio, target=options.compression_ratio, baseline=progress.baseline,
        score=score, best_episode=episode, log=tuple(progress.log), bits=tuple(env.bits),
        mode=options.bitwidth_assignment_mode, device=options.target_device, seed=options.seed,
    )


def _evaluate(env: Environment, policy: tuple[int, ...], episode: int, options: AutoQOptions,
              progress: _Progress) -> float:
    try:
        score = float(env.evaluate(policy))
    except Exception as exc:
        raise SearchError(
            f"AutoQ: eval_fn failed at episode {episode} ({'INT8 baseline' if episode < 0 else 'policy'} "
            f"{_weight_bits(env, policy)}): {type(exc).__name__}: {exc}",
            episode=episode, policy=env.plan(policy), report=_report(env, options, progress),
        ) from exc
    if not math.isfinite(score):
        raise SearchError(
            f"AutoQ: eval_fn returned {score} at episode {episode} for {_weight_bits(env, policy)}; expected a "
            "finite number", episode=episode, policy=env.plan(policy), report=_report(env, options, progress))
    return score


def _reward(score: float, baseline: float) -> float:
    return (score - baseline) / abs(baseline) if baseline != 0 else score - baseline


def _states(features: Tensor, actions: Sequence[float]) -> Tensor:
    states = features.clone()
    states[1:, -1] = torch.tensor(actions[:-1], dtype=states.dtype)
    states[0, -1] = 0.0
    return states


def run_search(env: Environment, options: AutoQOptions, origin: str = "", progress_bar: bool = True) -> AutoQReport:
    """Run ``options.iter_number`` episodes on ``env``; the report holds the best plan and the log.

    ``SearchError`` (with ``episode``, ``policy`` and the ``report`` so far) when an evaluation fails."""
    options.check(origin)
    bits = tuple(sorted(env.bits))
    sizes = env.sizes
    n_units = len(sizes)
    target = options.compression_ratio
    meet_ratio([bits[0]] * n_units, sizes, bits, target, origin)  # raises when unreachable
    progress = _Progress()
    top = (8 if 8 in bits else bits[-1],) * n_units
    progress.baseline = _evaluate(env, top, -1, options, progress)
    agent = DDPG(env.features.shape[1], options.ddpg, options.seed)
    noise = torch.Generator().manual_seed(options.seed + 2)
    updates = options.updates_per_episode if options.updates_per_episode is not None else n_units
    episodes, warmup = options.iter_number, options.warmup_iter_number
    bar = tqdm(range(episodes), desc="AutoQ episodes", unit="episode", leave=False,
               disable=None if progress_bar else True)
    for e in bar:
        actions: list[float] = []
        for i in range(n_units):
            state = env.features[i].clone()
            state[-1] = actions[-1] if actions else 0.0
            actions.append(explore(agent.act(state), e, episodes, warmup, options.sigma0, noise))
        chosen = [action_to_bits(a, bits) for a in actions]
        policy = meet_ratio(chosen, sizes, bits, target, origin)
        executed = [a if b == c else bits_to_action(b, bits) for a, b, c in zip(actions, policy, chosen)]
        score = _evaluate(env, policy, e, options, progress)
        reward = _reward(score, progress.baseline)
        ratio = size_ratio(policy, sizes)
        sigma = None if e < warmup else noise_scale(e, episodes, warmup, options.sigma0)
        progress.log.append(Episode(e, score, reward, ratio, sigma, _weight_bits(env, policy)))
        best = progress.best
        if best is None or (score, -ratio) > (best[0], -best[1]):
            progress.best = (score, ratio, e, policy)
        log.info("AutoQ episode %d: reward %.4f score %.4g ratio %.4f bits %s", e, reward, score, ratio, policy)
        bar.set_postfix(score=f"{score:.4g}", ratio=f"{ratio:.3f}", best=f"{progress.best[0]:.4g}")
        states = _states(env.features, executed)
        for i in range(n_units):
            last = i == n_units - 1
            nxt = torch.zeros_like(states[i]) if last else states[i + 1]
            agent.buffer.add(states[i], executed[i], reward, nxt, last)
        if e + 1 >= warmup:
            for _ in range(updates):
                agent.update()
    bar.close()
    return _report(env, options, progress)
