"""Exploration of the AutoQ agent: warm-up episodes with uniform actions, then truncated-normal
noise around the actor's action whose width decays linearly to zero.

Episode ``e`` of ``E`` with ``W`` warm-up episodes:

- ``e < W``: ``a ~ U(0, 1)``;
- ``e >= W``: ``a ~ N(mu(s), sigma_e^2)`` truncated to ``[0, 1]`` with
  ``sigma_e = sigma_0 (1 - (e - W) / (E - W - 1))`` (``sigma_e = 0`` when ``E - W = 1``), so the
  last episode runs the deterministic policy ``a = mu(s)``.

The truncated normal is sampled by inverting its CDF: ``u ~ U(Phi(alpha), Phi(beta))``,
``a = mu + sigma Phi^{-1}(u)`` with ``alpha = -mu / sigma``, ``beta = (1 - mu) / sigma``.
"""

from __future__ import annotations

import torch


def noise_scale(episode: int, episodes: int, warmup: int, sigma0: float) -> float:
    """``sigma_e`` of the module docstring (``nan`` during warm-up, where actions are uniform)."""
    if episode < warmup:
        return float("nan")
    span = episodes - warmup - 1
    if span <= 0:
        return 0.0
    return sigma0 * max(0.0, 1.0 - (episode - warmup) / span)


def truncated_normal(mu: float, sigma: float, generator: torch.Generator) -> float:
    """One sample of ``N(mu, sigma^2)`` truncated to ``[0, 1]``; ``mu`` clipped when ``sigma == 0``."""
    mu = min(max(mu, 0.0), 1.0)
    if sigma <= 0:
        return mu
    lo = torch.special.ndtr(torch.tensor(-mu / sigma, dtype=torch.float64))
    hi = torch.special.ndtr(torch.tensor((1.0 - mu) / sigma, dtype=torch.float64))
    u = lo + (hi - lo) * torch.rand((), generator=generator, dtype=torch.float64)
    u = u.clamp(1e-12, 1 - 1e-12)
    return float(min(max(mu + sigma * float(torch.special.ndtri(u)), 0.0), 1.0))


def explore(mu: float, episode: int, episodes: int, warmup: int, sigma0: float, generator: torch.Generator) -> float:
    """The action taken at ``episode``: uniform in warm-up, else truncated-normal around ``mu``."""
    if episode < warmup:
        return float(torch.rand((), generator=generator, dtype=torch.float64))
    return truncated_normal(mu, noise_scale(episode, episodes, warmup, sigma0), generator)
