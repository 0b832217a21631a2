"""Packed storage: ``PackedWeight`` keeps the exact integers, ``CompressedLinear`` /
``CompressedEmbedding`` compute with ``W'`` and their ``state_dict()`` holds only the packed form
and loads back bit for bit; ``pc.save_state`` / ``pc.load_state`` round-trip the method's state."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import purecomp as pc
from purecomp.errors import StateError
from purecomp.transforms.weight_compression import (
    CompressedEmbedding,
    CompressedLinear,
    PackedWeight,
    WeightCompressionState,
    dequantize,
    quantize,
)

MODES = ["int8_asym", "int8_sym", "int4_asym", "int4_sym", "nf4"]


def weight(out: int = 6, cin: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randn(out, cin, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("group_size", [-1, 8, 6])  # 24 / 6 = 4 groups; 24 / 8 = 3 groups (odd: packed zero points)
def test_packed_weight_keeps_the_integers(mode: str, group_size: int) -> None:
    w = weight(cin=24)
    q = quantize(w, mode, group_size)
    packed = PackedWeight.pack(q, mode)
    back = packed.unpack()
    assert torch.equal(back.values, q.values)
    assert torch.equal(back.scale, q.scale.half())
    assert (back.zero_point is None) == (q.zero_point is None)
    if q.zero_point is not None:
        assert torch.equal(back.zero_point, q.zero_point)
    # W' uses the float16-stored scale: exactly the grid's dequantization with that scale
    assert torch.equal(packed.dequantize(), dequantize(q.values, q.scale.half(), q.zero_point, mode))
    bits = 4 if mode in ("int4_asym", "int4_sym", "nf4") else 8
    assert packed.data.numel() * packed.data.element_size() == w.numel() * bits // 8


def test_odd_input_width_packs_and_unpacks() -> None:
    w = weight(cin=7)
    q = quantize(w, "int4_asym", None)
    packed = PackedWeight.pack(q, "int4_asym")
    assert packed.data.shape == (6, 4)
    assert torch.equal(packed.unpack().values, q.values)


@pytest.mark.parametrize("mode", MODES)
def test_compressed_linear_state_dict_round_trip(mode: str) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(32, 10)
    packed = PackedWeight.pack(quantize(linear.weight, mode, 8), mode)
    module = CompressedLinear.from_linear(linear, packed)
    x = torch.randn(3, 32)
    torch.testing.assert_close(module(x), F.linear(x, packed.dequantize(), linear.bias), rtol=0, atol=0)
    sd = module.state_dict()
    float_tensors = [k for k, v in sd.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
                     and v.shape == linear.weight.shape]
    assert float_tensors == []  # no float weight is stored
    expected = {"packed_weight", "scale", "bias", "_extra_state"} | ({"zero_point"} if "asym" in mode else set())
    assert set(sd) == expected
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    fresh = CompressedLinear.empty(mode, 8, 32, 10, bias=True)
    fresh.load_state_dict(loaded)
    for key, value in module.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(fresh.state_dict()[key], value), key
    assert torch.equal(fresh(x), module(x))


def test_load_refuses_another_format() -> None:
    linear = nn.Linear(16, 4)
    module = CompressedLinear.from_linear(linear, PackedWeight.pack(quantize(linear.weight, "int4_sym", 8), "int4_sym"))
    other = CompressedLinear.empty("int4_asym", 8, 16, 4, bias=True)
    with pytest.raises(Exception, match="int4_sym"):  # strict loading: format mismatch and missing zero point
        other.load_state_dict(module.state_dict())
    same_shape = CompressedLinear.empty("int4_sym", 4, 16, 4, bias=True)
    with pytest.raises((StateError, RuntimeError), match="group size 8"):
        same_shape.load_state_dict(module.state_dict(), strict=False)


@pytest.mark.parametrize("mode", ["int8_asym", "int4_asym", "nf4"])
def test_compressed_embedding_dequantizes_the_rows(mode: str) -> None:
    torch.manual_seed(0)
    embedding = nn.Embedding(50, 16, padding_idx=0)
    packed = PackedWeight.pack(quantize(embedding.weight, mode, 8), mode)
    module = CompressedEmbedding.from_embedding(embedding, packed)
    ids = torch.tensor([[0, 3, 49], [7, 7, 1]])
    assert torch.equal(module(ids), F.embedding(ids, packed.dequantize()))
    fresh = CompressedEmbedding.empty(mode, 8, 50, 16, padding_idx=0)
    fresh.load_state_dict(module.state_dict())
    assert torch.equal(fresh(ids), module(ids))


def test_save_state_round_trip(tmp_path) -> None:
    w = {"a.weight": weight(4, 16, 0), "b.weight": weight(8, 16, 1)}
    state = WeightCompressionState(
        {"a.weight": PackedWeight.pack(quantize(w["a.weight"], "int4_asym", 8), "int4_asym"),
         "b.weight": PackedWeight.pack(quantize(w["b.weight"], "int8_sym", None), "int8_sym")},
        {"c.weight": 100}, ("a.weight",), {"a.weight": "linear", "b.weight": "linear", "c.weight": "embedding"})
    path = pc.save_state(tmp_path / "state.safetensors", state)
    loaded = pc.load_state(path)
    assert isinstance(loaded, WeightCompressionState)
    assert loaded.float_weights == state.float_weights and loaded.ratio_defining == state.ratio_defining
    assert loaded.kinds == state.kinds
    for name, packed in state.weights.items():
        other = loaded.weights[name]
        assert (other.mode, other.group_size, other.shape) == (packed.mode, packed.group_size, packed.shape)
        assert torch.equal(other.data, packed.data) and torch.equal(other.scale, packed.scale)
        assert (other.zero_point is None) == (packed.zero_point is None)
        if packed.zero_point is not None:
            assert torch.equal(other.zero_point, packed.zero_point)
    assert loaded.statistics() == state.statistics()
