"""The outcome of an AutoQ search: best plan, the per-episode log, JSON save/load and a plot."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ..report import JsonReport


@dataclasses.dataclass(frozen=True)
class Episode:
    """One episode: the evaluated ``score``, ``reward = (score - baseline) / |baseline|``, the size
    ratio and weight bits of the post-processed policy, and the exploration noise (``None``: warm-up,
    uniform actions)."""

    episode: int
    score: float
    reward: float
    ratio: float
    sigma: float | None
    policy: dict[str, int]


@dataclasses.dataclass(frozen=True)
class AutoQReport(JsonReport):
    """An AutoQ result. ``plan`` (quantizer key -> bits) is what ``quantization(precision=...)``
    takes, as for HAWQ. ``ratio``: size ratio of the plan (``target``: the requested one);
    ``baseline``: ``eval_fn`` of uniform INT8 (widest allowed bits); ``score``: of the plan, found at
    ``best_episode`` (-1 and an empty plan when no episode finished)."""

    plan: dict[str, int]
    weight_bits: dict[str, int]
    ratio: float
    target: float
    baseline: float
    score: float
    best_episode: int
    log: tuple[Episode, ...]
    bits: tuple[int, ...]
    mode: str
    device: str
    seed: int

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "bits": list(self.bits), "log": [dataclasses.asdict(e) for e in self.log]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AutoQReport:
        return cls(**{**data, "bits": tuple(data["bits"]), "log": tuple(Episode(**e) for e in data["log"])})

    def plot(self, path: str | Path, title: str = "AutoQ") -> Path:
        """PNG: reward per episode with the best so far (top), size ratio with the target (bottom);
        the warm-up episodes are shaded."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        episodes = [e.episode for e in self.log]
        rewards = [e.reward for e in self.log]
        best = [max(rewards[: i + 1]) for i in range(len(rewards))]
        warmup = sum(1 for e in self.log if e.sigma is None)
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
        for ax in (top, bottom):
            if warmup:
                ax.axvspan(-0.5, warmup - 0.5, color="0.9", label="warm-up (random actions)" if ax is top else None)
        top.plot(episodes, rewards, ".", ms=4, label="reward")
        top.plot(episodes, best, "-", label="best so far")
        top.set_ylabel("reward (score / INT8 score - 1)")
        top.set_title(f"{title}: best score {self.score:.4g} (INT8 {self.baseline:.4g}) at episode {self.best_episode}")
        top.legend(loc="lower right", fontsize=8)
        bottom.plot(episodes, [e.ratio for e in self.log], ".", ms=4, label="size ratio")
        bottom.axhline(self.target, color="red", lw=1, label=f"target {self.target:g}")
        bottom.set_ylabel("size / FP32")
        bottom.set_xlabel("episode")
        bottom.legend(loc="upper right", fontsize=8)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path
