"""HAWQ's search over bit assignments ordered by Hessian trace.

Units (weights, or groups of weights in strict mode) are sorted by average Hessian trace,
ascending; the candidates are the non-decreasing assignments ``b_1 <= b_2 <= ... <= b_L`` along
that order over the allowed bit set (``C(L + B - 1, L)`` of them instead of ``B^L``): a flatter
unit never gets more bits than a sharper one. Among the candidates with
``ratio(candidate) >= target`` the one with the least total sensitivity ``sum_i S_i(b_i)`` wins
(ties: the higher ratio, then the first found).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence

from purecomp.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Candidate:
    """Bits per unit (in unit order), their total sensitivity and compression ratio."""

    bits: tuple[int, ...]
    sensitivity: float
    ratio: float


def trace_order(traces: Sequence[float]) -> list[int]:
    """Unit indices by ascending trace (ties keep their given order)."""
    return sorted(range(len(traces)), key=lambda i: traces[i])


def monotone_assignments(order: Sequence[int], bits: Sequence[int]) -> Iterator[tuple[int, ...]]:
    """Every assignment that is non-decreasing along ``order``: ``b[order[0]] <= b[order[1]] <= ...``."""
    for combo in itertools.combinations_with_replacement(sorted(bits), len(order)):
        out = [0] * len(order)
        for position, unit in enumerate(order):
            out[unit] = combo[position]
        yield tuple(out)


def search(
    sensitivity: Sequence[Mapping[int, float]],
    traces: Sequence[float],
    bits: Sequence[int],
    ratio: Callable[[tuple[int, ...]], float],
    target: float,
    origin: str = "",
) -> Candidate:
    """The least-sensitivity candidate with ``ratio >= target``; ``ConfigError`` at
    ``{origin}compression_ratio`` with the reachable range when none reaches it."""
    best: Candidate | None = None
    lowest, highest = float("inf"), 0.0
    for assignment in monotone_assignments(trace_order(traces), bits):
        r = ratio(assignment)
        lowest, highest = min(lowest, r), max(highest, r)
        if r < target:
            continue
        s = sum(sensitivity[i][b] for i, b in enumerate(assignment))
        if best is None or (s, -r) < (best.sensitivity, -best.ratio):
            best = Candidate(assignment, s, r)
    if best is None:
        raise ConfigError(
            f"{origin}compression_ratio",
            f"{target:g} cannot be reached with bits {sorted(bits)}: the reachable range is "
            f"[{lowest:.4g}, {highest:.4g}]",
        )
    return best
