"""The outcome of a precision search: the plan, the numbers behind it, JSON save/load and a plot."""

from __future__ import annotations

import abc
import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from purecomp.checkpoint import atomic_write
from purecomp.errors import ConfigError


class JsonReport(abc.ABC):
    """``save(path)`` writes ``to_json()`` as JSON; ``load(path)`` rebuilds with ``from_json``."""

    @abc.abstractmethod
    def to_json(self) -> dict[str, Any]: ...

    @classmethod
    @abc.abstractmethod
    def from_json(cls, data: dict[str, Any]) -> Any: ...

    def save(self, path: str | Path) -> Path:
        """Write the report as JSON, crash-safely (``purecomp.checkpoint.atomic_write``); ``load_plan``
        reads the plan back."""
        text = (json.dumps(self.to_json(), indent=2) + "\n").encode()
        return atomic_write(path, lambda f: f.write(text))

    @classmethod
    def load(cls, path: str | Path) -> Any:
        return cls.from_json(json.loads(Path(path).read_text()))


@dataclasses.dataclass(frozen=True)
class PrecisionReport(JsonReport):
    """A HAWQ result. ``plan`` (quantizer key -> bits) is what ``quantization(precision=...)`` takes.

    ``traces``: average Hessian trace per weight (``tr(H_i) / numel(W_i)``); ``sensitivity``:
    ``avg_trace_i * ||Q_b(W_i) - W_i||^2`` at the chosen ``b``; ``ratio``: compression ratio of the
    chosen plan, ``target`` the requested one."""

    plan: dict[str, int]
    weight_bits: dict[str, int]
    traces: dict[str, float]
    sensitivity: dict[str, float]
    ratio: float
    target: float
    bits: tuple[int, ...]
    mode: str
    device: str
    probes: int
    num_data_points: int

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "bits": list(self.bits)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PrecisionReport:
        return cls(**{**data, "bits": tuple(data["bits"])})

    def plot(self, path: str | Path, title: str = "HAWQ") -> Path:
        """PNG: average Hessian trace per weight (log scale, graph order) coloured by the chosen bits."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch

        names = list(self.traces)
        colors = {b: plt.cm.viridis(i / max(1, len(self.bits) - 1)) for i, b in enumerate(self.bits)}
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6.0, 0.4 * len(names) + 2), 6), sharex=True,
                                          gridspec_kw={"height_ratios": [3, 1]})
        values = [max(abs(self.traces[n]), 1e-12) for n in names]
        top.bar(range(len(names)), values, color=[colors[self.weight_bits[n]] for n in names])
        top.set_yscale("log")
        top.set_ylabel("|average Hessian trace|")
        top.set_title(f"{title}: ratio {self.ratio:.3g} (target {self.target:g}), {self.mode} mode")
        top.legend(handles=[Patch(color=c, label=f"{b} bits") for b, c in colors.items()])
        bottom.step(range(len(names)), [self.weight_bits[n] for n in names], where="mid")
        bottom.set_yticks(list(self.bits))
        bottom.set_ylabel("weight bits")
        bottom.set_xticks(range(len(names)))
        bottom.set_xticklabels([n.removesuffix(".weight") for n in names], rotation=70, ha="right", fontsize=7)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def load_plan(path: str | Path) -> dict[str, int]:
    """A plan from JSON: a saved ``PrecisionReport`` or a plain ``{quantizer key: bits}`` object."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError("", f"precision plan file {str(path)!r} does not exist") from None
    except json.JSONDecodeError as exc:
        raise ConfigError("", f"precision plan file {str(path)!r} is not valid JSON: {exc}") from None
    plan = data.get("plan", data) if isinstance(data, Mapping) else None
    if not isinstance(plan, Mapping) or not all(isinstance(v, int) for v in plan.values()):
        raise ConfigError("plan", f"{str(path)!r}: expected an object of quantizer key -> integer bits")
    return dict(plan)
