"""DDPG (deep deterministic policy gradient) for AutoQ: actor, critic, target copies, replay buffer.

Actor ``mu(s) = sigmoid(z(s))`` (MLP ``z``), critic ``Q(s, a)`` (MLP on ``[s, a]``), targets
``mu'``, ``Q'``. One update on a batch of transitions ``(s, a, r, s', d)`` sampled uniformly:

    y      = (r - m) + gamma (1 - d) Q'(s', mu'(s'))           m: moving average of the rewards
    L_Q    = mean (Q(s, a) - y)^2                              (Adam on the critic)
    L_mu   = -mean Q(s, mu(s)) + lambda mean z(s)^2            (Adam on the actor)
    theta' <- tau theta + (1 - tau) theta'                     (both target networks)

``m <- m + alpha (mean_batch r - m)`` before each update (HAQ's variance reduction). The
``lambda z^2`` term keeps the sigmoid out of saturation, where the actor's gradient vanishes and
an action stuck at 0 or 1 could never move again. Every step of
an episode carries the episode's reward, as in HAQ. The networks are built under a seeded
``torch.random.fork_rng`` and the buffer samples with its own generator, so a run is a function
of its seed.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import Tensor, nn


@dataclasses.dataclass(frozen=True)
class DDPGConfig:
    """Hyper-parameters (HAQ's defaults, smaller networks)."""

    hidden: int = 64
    lr_actor: float = 1e-3
    lr_critic: float = 1e-3
    tau: float = 0.01
    discount: float = 1.0
    batch_size: int = 64
    buffer_size: int = 2000
    moving_alpha: float = 0.01
    logit_penalty: float = 0.01


def mlp(inputs: int, hidden: int) -> nn.Sequential:
    """``inputs -> hidden -> hidden -> 1`` with ReLUs."""
    return nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))


class ReplayBuffer:
    """Ring buffer of transitions ``(s, a, r, s', done)``; uniform sampling with a seeded generator."""

    def __init__(self, capacity: int, state_dim: int, generator: torch.Generator) -> None:
        self.capacity = capacity
        self.states = torch.zeros(capacity, state_dim)
        self.actions = torch.zeros(capacity, 1)
        self.rewards = torch.zeros(capacity, 1)
        self.next_states = torch.zeros(capacity, state_dim)
        self.done = torch.zeros(capacity, 1)
        self.size = 0
        self.cursor = 0
        self.generator = generator

    def add(self, s: Tensor, a: float, r: float, s_next: Tensor, done: bool) -> None:
        i = self.cursor
        self.states[i], self.actions[i], self.rewards[i] = s, a, r
        self.next_states[i], self.done[i] = s_next, float(done)
        self.cursor = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, n: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        idx = torch.randint(0, self.size, (n,), generator=self.generator)
        return self.states[idx], self.actions[idx], self.rewards[idx], self.next_states[idx], self.done[idx]


class DDPG:
    """Actor-critic agent with target networks (see the module docstring for the updates)."""

    def __init__(self, state_dim: int, config: DDPGConfig, seed: int) -> None:
        self.config = config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.actor = mlp(state_dim, config.hidden)
            self.critic = mlp(state_dim + 1, config.hidden)
            for net in (self.actor, self.critic):  # DDPG's small last layer: mu(s) ~ 1/2, Q ~ 0 at start
                nn.init.uniform_(net[4].weight, -3e-3, 3e-3)
                nn.init.uniform_(net[4].bias, -3e-3, 3e-3)
        self.actor_target = copy.deepcopy(self.actor)
        self.critic_target = copy.deepcopy(self.critic)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=config.lr_actor)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=config.lr_critic)
        self.buffer = ReplayBuffer(config.buffer_size, state_dim, torch.Generator().manual_seed(seed + 1))
        self.moving_average: float | None = None

    @torch.no_grad()
    def act(self, state: Tensor) -> float:
        """``mu(s)`` for one state row."""
        return float(torch.sigmoid(self.actor(state.unsqueeze(0))).squeeze())

    def update(self) -> tuple[float, float]:
        """One DDPG step on a sampled batch; returns ``(L_Q, L_mu)``."""
        c = self.config
        s, a, r, s_next, done = self.buffer.sample(c.batch_size)
        mean_r = float(r.mean())
        self.moving_average = mean_r if self.moving_average is None else (
            self.moving_average + c.moving_alpha * (mean_r - self.moving_average))
        with torch.no_grad():
            q_next = self.critic_target(torch.cat([s_next, torch.sigmoid(self.actor_target(s_next))], 1))
            y = (r - self.moving_average) + c.discount * (1 - done) * q_next
        q_loss = (self.critic(torch.cat([s, a], 1)) - y).pow(2).mean()
        self.critic_opt.zero_grad(set_to_none=True)
        q_loss.backward()
        self.critic_opt.step()
        z = self.actor(s)
        mu_loss = -self.critic(torch.cat([s, torch.sigmoid(z)], 1)).mean() + c.logit_penalty * z.pow(2).mean()
        self.actor_opt.zero_grad(set_to_none=True)
        mu_loss.backward()
        self.actor_opt.step()
        soft_update(self.actor_target, self.actor, c.tau)
        soft_update(self.critic_target, self.critic, c.tau)
        return float(q_loss.detach()), float(mu_loss.detach())


@torch.no_grad()
def soft_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    """``theta' <- tau theta + (1 - tau) theta'``."""
    for t, p in zip(target.parameters(), source.parameters()):
        t.mul_(1 - tau).add_(p, alpha=tau)
