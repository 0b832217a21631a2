"""Integer levels of a quantizer (paper Table 1, MATH.md "Integer levels")."""

from __future__ import annotations

from purecomp.errors import QuantizerRangeError

MIN_BITS = 2
MAX_BITS = 8


def check_bits(bits: int) -> int:
    """Return ``bits`` if it is an int in 2..8, else raise naming the value."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise QuantizerRangeError(f"bits must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r}")
    return bits


def symmetric_levels(bits: int, signed: bool, narrow_range: bool) -> tuple[int, int]:
    """Integer range ``(ql, qh)`` of a symmetric quantizer.

    signed: ``[-2^(b-1), 2^(b-1) - 1]``; unsigned: ``[0, 2^b - 1]``.
    Narrow range drops the lowest level when signed, the highest when unsigned.
    """
    check_bits(bits)
    if signed:
        ql, qh = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        if narrow_range:
            ql += 1
    else:
        ql, qh = 0, 2**bits - 1
        if narrow_range:
            qh -= 1
    return ql, qh


def asymmetric_levels(bits: int) -> tuple[int, int]:
    """Integer range ``(0, 2^b - 1)`` of an asymmetric quantizer."""
    check_bits(bits)
    return 0, 2**bits - 1
