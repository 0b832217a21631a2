"""Policies: continuous actions -> allowed bit widths, model-size ratio, and the ratio post-processing.

- action ``a in [0, 1]`` over ascending bits ``b_0 < ... < b_{B-1}``: ``b_k`` with
  ``k = min(floor(a B), B - 1)``; the action of ``b_k`` itself is its bin centre ``(k + 1/2) / B``.
- size ratio of bits ``b_i`` for units of ``n_i`` weights: ``sum_i n_i b_i / (32 sum_i n_i)``
  (uniform INT8 = 0.25, uniform INT4 = 0.125).
- post-processing: while the ratio exceeds the target, walk the units from the last to the first,
  lowering each by one allowed step and stopping as soon as the target is met; repeat the walk
  until it is met or every unit is at the lowest width.
"""

from __future__ import annotations

from collections.abc import Sequence

from purecomp.errors import ConfigError

FP32_BITS = 32


def action_to_bits(action: float, bits: Sequence[int]) -> int:
    """``bits[min(floor(a B), B - 1)]`` for ``a`` clipped to ``[0, 1]``."""
    a = min(max(float(action), 0.0), 1.0)
    return bits[min(int(a * len(bits)), len(bits) - 1)]


def bits_to_action(b: int, bits: Sequence[int]) -> float:
    """The centre of the action bin of ``b``: ``(k + 1/2) / B``."""
    return (list(bits).index(b) + 0.5) / len(bits)


def size_ratio(policy: Sequence[int], sizes: Sequence[int]) -> float:
    """``sum_i n_i b_i / (32 sum_i n_i)``: quantized weight size relative to FP32."""
    total = sum(sizes)
    if total <= 0:
        raise ConfigError("compression_ratio", "the quantized weights hold no element; nothing to size")
    return sum(n * b for n, b in zip(sizes, policy)) / (FP32_BITS * total)


def reachable(sizes: Sequence[int], bits: Sequence[int]) -> tuple[float, float]:
    """The smallest and largest size ratio any policy over ``bits`` has."""
    return size_ratio([min(bits)] * len(sizes), sizes), size_ratio([max(bits)] * len(sizes), sizes)


def meet_ratio(policy: Sequence[int], sizes: Sequence[int], bits: Sequence[int], target: float,
               origin: str = "") -> tuple[int, ...]:
    """Lower bits from the last unit backwards, one allowed step at a time, until
    ``size_ratio <= target`` (see the module docstring). ``ConfigError`` at
    ``{origin}compression_ratio`` when even the lowest widths exceed ``target``."""
    allowed = sorted(bits)
    low, high = reachable(sizes, allowed)
    if target < low - 1e-12:
        raise ConfigError(f"{origin}compression_ratio",
                          f"{target:g} cannot be reached with bits {allowed}: the reachable size ratios are "
                          f"[{low:.4g}, {high:.4g}] (relative to FP32; uniform INT8 = 0.25)")
    out = list(policy)
    for b in out:
        if b not in allowed:
            raise ConfigError(f"{origin}bits", f"policy width {b} is not one of the allowed bits {allowed}")
    while size_ratio(out, sizes) > target + 1e-12:
        for i in reversed(range(len(out))):
            k = allowed.index(out[i])
            if k == 0:
                continue
            out[i] = allowed[k - 1]
            if size_ratio(out, sizes) <= target + 1e-12:
                break
    return tuple(out)
