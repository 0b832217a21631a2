"""``purecomp.statistics``: printable tables of the quantizers and sparsity masks in a state."""

from __future__ import annotations

import dataclasses
from typing import Any

from .protocol import HasStatistics, states_with
from .struct import tree_flatten


@dataclasses.dataclass(frozen=True)
class Table:
    """Rows of equal keys; ``str(table)`` is an aligned text table."""

    title: str
    rows: tuple[dict[str, Any], ...]

    def __str__(self) -> str:
        if not self.rows:
            return f"{self.title}: (empty)"
        cols = list(self.rows[0])
        cells = [[_fmt(row.get(c)) for c in cols] for row in self.rows]
        widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
        line = "  ".join(c.ljust(w) for c, w in zip(cols, widths))
        body = ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
        return "\n".join([self.title, line, "-" * len(line), *body])

    def __len__(self) -> int:
        return len(self.rows)


@dataclasses.dataclass(frozen=True)
class Report:
    """Named tables; ``report["quantizers"]``, ``str(report)`` prints the non-empty ones."""

    tables: tuple[Table, ...]

    def __getitem__(self, title: str) -> Table:
        for table in self.tables:
            if table.title == title:
                return table
        raise KeyError(f"no table {title!r}; the report has {[t.title for t in self.tables]}")

    def __str__(self) -> str:
        return "\n\n".join(str(t) for t in self.tables if t.rows) or "(no compression)"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def statistics(graph: Any, state: Any) -> Report:
    """The tables every state struct contributes (``purecomp.protocol``: ``statistics(graph)``),
    merged by title in the order they first appear: built-in methods give ``quantizers`` (key,
    weight/activation, bits, mode, per-channel, signedness, range), ``sparsity`` (actual level
    against the schedule's target), ``pruning`` (channels, parameters and FLOPs before / after)
    and ``binarization`` (mode, stage enabled, scale and threshold range)."""
    tables: dict[str, list[dict[str, Any]]] = {}
    for member in states_with(state, HasStatistics):
        for title, rows in member.statistics(graph).items():
            tables.setdefault(title, []).extend(rows)
    return Report(tuple(Table(title, tuple(rows)) for title, rows in tables.items()))


def trainable(state: Any) -> list[Any]:
    """The leaves of a state that carry ``requires_grad`` (give them to the optimizer)."""
    leaves, _ = tree_flatten(state)
    return [leaf for leaf in leaves if getattr(leaf, "requires_grad", False)]


def model_cost(model: Any, example_inputs: Any) -> dict[str, int]:
    """``{"params": parameter count, "flops": FLOPs of one forward}`` (FLOPs counted by
    ``torch.utils.flop_counter.FlopCounterMode``: 2 per multiply-add of conv/linear/matmul)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(*args)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "flops": int(counter.get_total_flops()),
    }


def pruning_cost(original: Any, materialized: Any, example_inputs: Any) -> Table:
    """Parameters and FLOPs of the original model against its materialized (pruned) one."""
    before, after = model_cost(original, example_inputs), model_cost(materialized, example_inputs)
    rows = tuple(
        {
            "measure": key,
            "before": before[key],
            "after": after[key],
            "ratio": after[key] / max(1, before[key]),
        }
        for key in ("params", "flops")
    )
    return Table("pruning cost", rows)
