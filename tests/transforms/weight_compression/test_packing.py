"""4-bit packing: exact round trips (odd lengths included), NNCF's nibble order, clear refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from purecomp.errors import ConfigError
from purecomp.transforms.weight_compression import pack_int4, unpack_int4


@settings(max_examples=100, deadline=None)
@given(data=st.data(), signed=st.booleans())
def test_round_trip_is_exact(data: st.DataObject, signed: bool) -> None:
    shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=9))
    low, high, dtype = (-8, 7, np.int8) if signed else (0, 15, np.uint8)
    values = torch.from_numpy(data.draw(hnp.arrays(dtype, shape, elements=st.integers(low, high))))
    packed = pack_int4(values)
    assert packed.dtype == torch.uint8
    assert packed.shape == (*values.shape[:-1], (values.shape[-1] + 1) // 2)
    back = unpack_int4(packed, values.shape[-1], signed=signed)
    assert back.dtype == values.dtype
    assert torch.equal(back, values)


def test_nibble_order_is_nncf_s() -> None:
    """Value ``2k`` in the low nibble, ``2k + 1`` in the high one; int4 stored as ``v + 8``."""
    assert pack_int4(torch.tensor([1, 2, 15], dtype=torch.uint8)).tolist() == [0x21, 0x0F]
    assert pack_int4(torch.tensor([-8, 7], dtype=torch.int8)).tolist() == [0xF0]
    assert unpack_int4(torch.tensor([0xF0], dtype=torch.uint8), 2, signed=True).tolist() == [-8, 7]


def test_refusals() -> None:
    with pytest.raises(ConfigError, match=r"\[0, 15\]"):
        pack_int4(torch.tensor([16], dtype=torch.uint8))
    with pytest.raises(ConfigError, match=r"\[-8, 7\]"):
        pack_int4(torch.tensor([-9], dtype=torch.int8))
    with pytest.raises(ConfigError, match="got torch.int32"):
        pack_int4(torch.tensor([1], dtype=torch.int32))
    with pytest.raises(ConfigError, match="3 packed bytes hold 5 or 6 values, not 7"):
        unpack_int4(torch.zeros(3, dtype=torch.uint8), 7)
    with pytest.raises(ConfigError, match="packed uint8"):
        unpack_int4(torch.zeros(3, dtype=torch.int8), 6)
