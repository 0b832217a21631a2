"""Per-embedding-group activation quantizers (Bondarenko et al., 2021, "Understanding and
Overcoming the Challenges of Efficient Transformer Quantization", section 4).

A few channels of a transformer's hidden state are far larger than the rest. One per-tensor
grid must cover them, which leaves the other channels a handful of levels. Here the channels
of the last axis are split into a few groups, each with its own asymmetric range; the
outlier channels end up in groups of their own. Each group is still one per-tensor INT8
tensor for the linear that reads it: ``x W^T = sum_k x[:, C_k] W[:, C_k]^T`` (export:
``purecomp.export.grouped_linear``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor

from purecomp.errors import CalibrationError, ConfigError, QuantizerRangeError
from purecomp.ops import adjust_asymmetric_range, asymmetric_levels, fake_quantize_asymmetric
from purecomp.ops.levels import check_bits
from purecomp.ops.reference import EPS
from purecomp.struct import static_field, struct

from .quantizer import MIN_RANGE, asymmetric_grid

GROUP_RANGE_TYPES = ("min_max", "mean_min_max")


@functools.lru_cache(maxsize=256)
def _group_index(groups: tuple[int, ...], device: torch.device) -> Tensor:
    """The channel -> group map as an index tensor on ``device``, built once per (map, device)
    rather than on every forward (on a GPU that was a host-to-device copy per call)."""
    return torch.tensor(groups, device=device)


@struct
class GroupedQuantizer:
    """MATH.md's asymmetric quantizer applied to each group of channels of the last axis.

    ``groups[c] = g(c)`` maps channel ``c`` (``0 <= c < C``) to its group ``k`` (``0 <= k < G``,
    every group non-empty); group ``k`` has the trainable ``input_low[k]`` and
    ``input_range[k]``. With ``n = 2^b - 1`` and ``[lo_k, hi_k]`` the range
    ``[input_low[k], input_low[k] + |input_range[k]| + eps]`` after MATH.md's zero-point
    adjustment, ``step_k = (hi_k - lo_k) / n``:

    ``out[..., c] = lo_k + step_k * round_half_even((clamp(x[..., c], lo_k, hi_k) - lo_k) / step_k)``,
    ``k = g(c)``.

    One group is the per-tensor asymmetric quantizer, ``C`` singleton groups the per-channel
    one. Gradients are MATH.md's asymmetric ones per channel, summed over the channels of each
    group (the gather ``input_low[g]`` sums them in backward). In ONNX terms group ``k`` is
    ``scale_k = step_k``, ``zero_point_k = round(-lo_k / step_k)`` on uint8.
    """

    input_low: Tensor
    input_range: Tensor
    groups: tuple[int, ...] = static_field()
    bits: int = static_field()

    mode = "asymmetric"
    signed = False
    narrow_range = False
    axis = -1

    def __call__(self, x: Tensor) -> Tensor:
        if x.dim() == 0 or x.shape[-1] != len(self.groups):
            raise QuantizerRangeError(
                f"a grouped quantizer over {len(self.groups)} channels got an input of shape {tuple(x.shape)}; "
                f"expected the last axis to have {len(self.groups)} channels"
            )
        index = _group_index(self.groups, x.device)
        return fake_quantize_asymmetric(
            x, self.input_low[index], self.input_range[index], bits=self.bits, axis=-1
        )

    @property
    def num_groups(self) -> int:
        return int(self.input_low.numel())

    @property
    def levels(self) -> tuple[int, int]:
        return asymmetric_levels(self.bits)

    def integer_grid(self) -> tuple[Tensor, Tensor, int, int]:
        """One ONNX ``(scale, zero_point)`` per group (``asymmetric_grid``), and ``(qmin, qmax)``."""
        return asymmetric_grid(self.input_low, self.input_range, self.levels)

    def members(self) -> list[list[int]]:
        """The channels of each group, in increasing channel order."""
        out: list[list[int]] = [[] for _ in range(self.num_groups)]
        for c, k in enumerate(self.groups):
            out[k].append(c)
        return out

    def float_range(self) -> tuple[Tensor, Tensor]:
        """The adjusted ``(low, high)`` of each group, shape ``(G,)``."""
        _, n = self.levels
        low, rng = adjust_asymmetric_range(self.input_low.detach(), self.input_range.detach().abs() + EPS, n)
        return low, low + rng


def make_grouped_quantizer(
    low: Tensor, high: Tensor, groups: Sequence[int], *, bits: int = 8, trainable: bool = True
) -> GroupedQuantizer:
    """A ``GroupedQuantizer`` covering ``[low[k], high[k]]`` for group ``k`` (ranges below
    ``MIN_RANGE`` are widened to it). Raises ``QuantizerRangeError`` when ``groups`` is not a
    map onto ``0 .. G-1`` with every group used, or ``low`` / ``high`` do not hold ``G`` values."""
    check_bits(bits)
    groups = tuple(int(k) for k in groups)
    low = torch.as_tensor(low).detach().float().reshape(-1)
    high = torch.as_tensor(high).detach().float().reshape(-1)
    count = low.numel()
    if count == 0 or high.numel() != count:
        raise QuantizerRangeError(f"expected one low and one high per group, got {low.numel()} lows and {high.numel()} highs")
    if not groups or sorted(set(groups)) != list(range(count)):
        raise QuantizerRangeError(
            f"groups must map every channel to a group 0..{count - 1} and use each group; got "
            f"{len(groups)} channels using groups {sorted(set(groups))[:8]}"
        )
    if bool((high < low).any()):
        raise QuantizerRangeError("every group needs low <= high")
    rng = (high - low).clamp(min=MIN_RANGE)
    return GroupedQuantizer(
        low.clone().requires_grad_(trainable), rng.clone().requires_grad_(trainable), groups, bits
    )


def channel_groups(low: Tensor, high: Tensor, num_groups: int) -> tuple[int, ...]:
    """Split channels with calibrated ranges ``[low[c], high[c]]`` into at most ``num_groups`` groups.

    Channels are sorted by width ``w_c = high_c - low_c``, and the sorted order is cut into
    contiguous segments that minimize ``sum_c W_{g(c)}^2``, with ``W_k = max_{c in k} high_c -
    min_{c in k} low_c`` the width of group ``k``'s range. Rounding to ``n`` levels adds noise of
    variance ``(W_k / n)^2 / 12`` per value, so this is the total rounding noise over one token's
    channels. Exact dynamic programming over the cut points (``O(num_groups * C^2)``). Groups are
    numbered by increasing width: group 0 holds the narrowest channels, the last the outliers.
    """
    if num_groups < 1:
        raise ConfigError("num_groups", f"expected an integer >= 1, got {num_groups}")
    low = torch.as_tensor(low).detach().double().reshape(-1)
    high = torch.as_tensor(high).detach().double().reshape(-1)
    count = low.numel()
    if count == 0 or high.numel() != count:
        raise CalibrationError(f"expected one low and one high per channel, got {low.numel()} and {high.numel()}")
    if not bool(torch.isfinite(low).all() and torch.isfinite(high).all()):
        raise CalibrationError("channel ranges must be finite")
    order = torch.argsort(high - low, stable=True)
    lo, hi = low[order], high[order]
    sizes = torch.arange(1, count + 1, dtype=torch.float64)

    def segment_costs(start: int) -> Tensor:
        """cost of one group holding sorted channels start..j, for every j >= start."""
        width = torch.cummax(hi[start:], 0).values - torch.cummin(lo[start:], 0).values
        return sizes[: count - start] * width.square()

    best = segment_costs(0)  # best[j]: least cost of channels 0..j in at most k groups
    cuts: list[Tensor] = []  # cuts[k-1][j]: start of the last group in that optimum (0: no new group)
    for _ in range(1, min(num_groups, count)):
        new, start = best.clone(), torch.zeros(count, dtype=torch.long)
        for i in range(1, count):
            candidate = best[i - 1] + segment_costs(i)
            better = candidate < new[i:]
            new[i:] = torch.where(better, candidate, new[i:])
            start[i:] = torch.where(better, i, start[i:])
        cuts.append(start)
        best = new
    boundaries = []
    j = count - 1
    for start in reversed(cuts):
        i = int(start[j])
        if i > 0:
            boundaries.append(i)
            j = i - 1
    sorted_group = torch.zeros(count, dtype=torch.long)
    for b in boundaries:
        sorted_group[b:] += 1
    group = torch.empty(count, dtype=torch.long)
    group[order] = sorted_group
    return tuple(int(k) for k in group)


class ChannelStatistics:
    """Per-batch, per-channel minima and maxima of the last axis, one batch at a time."""

    def __init__(self) -> None:
        self.mins: list[Tensor] = []
        self.maxs: list[Tensor] = []

    def observe(self, x: Tensor) -> None:
        if x.dim() == 0 or x.numel() == 0:
            return
        flat = x.detach().float().reshape(-1, x.shape[-1])
        self.mins.append(flat.amin(dim=0))
        self.maxs.append(flat.amax(dim=0))

    def _stacked(self) -> tuple[Tensor, Tensor]:
        if not self.mins:
            raise CalibrationError("a grouped quantizer saw no values during range initialization")
        return torch.stack(self.mins), torch.stack(self.maxs)

    def channel_range(self, range_type: str) -> tuple[Tensor, Tensor]:
        """``(low, high)`` per channel: over all batches (``min_max``) or the mean of each batch's (``mean_min_max``)."""
        mins, maxs = self._stacked()
        _check_type(range_type)
        if range_type == "min_max":
            return mins.amin(dim=0), maxs.amax(dim=0)
        return mins.mean(dim=0), maxs.mean(dim=0)

    def group_range(self, groups: Sequence[int], range_type: str) -> tuple[Tensor, Tensor]:
        """``(low, high)`` per group: the range type applied to each group's channels as one tensor
        (``mean_min_max``: the mean over batches of the batch's minimum over the group's channels)."""
        mins, maxs = self._stacked()
        _check_type(range_type)
        index = torch.tensor(tuple(groups))
        if index.numel() != mins.shape[1]:
            raise QuantizerRangeError(f"groups name {index.numel()} channels, the statistics have {mins.shape[1]}")
        count = int(index.max()) + 1
        lows = torch.stack([mins[:, index == k].amin(dim=1) for k in range(count)], dim=1)
        highs = torch.stack([maxs[:, index == k].amax(dim=1) for k in range(count)], dim=1)
        if range_type == "min_max":
            return lows.amin(dim=0), highs.amax(dim=0)
        return lows.mean(dim=0), highs.mean(dim=0)


def _check_type(range_type: str) -> None:
    if range_type not in GROUP_RANGE_TYPES:
        raise ConfigError("range_type", f"grouped quantizers support {list(GROUP_RANGE_TYPES)}, got {range_type!r}")
