"""Two 4-bit values per byte, along the last dimension.

Byte ``k`` of a packed row holds values ``2k`` (low nibble) and ``2k + 1`` (high nibble):
``byte = (v[2k] & 0xF) | (v[2k + 1] << 4)``, the order of NNCF's ``pack_uint4``. Signed 4-bit
values ``v`` in ``[-8, 7]`` are stored as ``v + 8`` (NNCF's ``pack_int4``). A row of odd length
``n`` is padded with one zero nibble; ``unpack_int4`` takes ``n`` back and drops it, so every
round trip is exact.
"""

from __future__ import annotations

import torch
from torch import Tensor

from purecomp.errors import ConfigError


def pack_int4(values: Tensor) -> Tensor:
    """``values [..., n]`` (uint8 in ``[0, 15]`` or int8 in ``[-8, 7]``) -> uint8 ``[..., ceil(n / 2)]``."""
    if values.dtype == torch.int8:
        low, high, offset = -8, 7, 8
    elif values.dtype == torch.uint8:
        low, high, offset = 0, 15, 0
    else:
        raise ConfigError("pack_int4", f"expected uint8 values in [0, 15] or int8 values in [-8, 7], got {values.dtype}")
    if values.dim() == 0:
        raise ConfigError("pack_int4", "expected at least one dimension to pack along, got a scalar")
    if values.numel() and (int(values.min()) < low or int(values.max()) > high):
        raise ConfigError("pack_int4", f"{values.dtype} values must lie in [{low}, {high}], "
                          f"got [{int(values.min())}, {int(values.max())}]")
    u = (values.to(torch.int16) + offset).to(torch.uint8)
    if u.shape[-1] % 2:
        u = torch.nn.functional.pad(u, (0, 1))
    pairs = u.reshape(*u.shape[:-1], u.shape[-1] // 2, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).contiguous()


def unpack_int4(packed: Tensor, n: int, signed: bool = False) -> Tensor:
    """Inverse of ``pack_int4``: uint8 ``[..., m]`` -> ``[..., n]`` (``n`` is ``2m`` or ``2m - 1``),
    int8 in ``[-8, 7]`` if ``signed`` else uint8 in ``[0, 15]``."""
    if packed.dtype != torch.uint8:
        raise ConfigError("unpack_int4", f"expected packed uint8 bytes, got {packed.dtype}")
    if packed.dim() == 0:
        raise ConfigError("unpack_int4", "expected at least one dimension, got a scalar")
    m = packed.shape[-1]
    if isinstance(n, bool) or not isinstance(n, int) or n not in (2 * m, 2 * m - 1) or n < 0:
        raise ConfigError("unpack_int4", f"{m} packed bytes hold {2 * m - 1} or {2 * m} values, not {n!r}")
    u = torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(*packed.shape[:-1], 2 * m)[..., :n]
    return (u.to(torch.int8) - 8) if signed else u.contiguous()
