"""Layout of the grouped linear export: which groups get an integer matmul, the per-channel
fake-quantize of the merged small groups, and moving the input permutation into the producer."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from purecomp.export.channel_order import permute_output_rows
from purecomp.export.grouped_linear import MIN_INTEGER_CHANNELS, ChannelQuantizeDequantize, blocks
from purecomp.export.modules import Dequantize, QuantizeDequantize


@pytest.mark.parametrize("sizes, integer, merged", [
    ([2, 300, MIN_INTEGER_CHANNELS, 5], [1, 2], [0, 3]),
    ([3, 5, 4], [1], [0, 2]),  # all small: the largest still gets an integer matmul
    ([100, 200], [0, 1], []),
])
def test_blocks_give_large_groups_an_integer_matmul_each(sizes, integer, merged):
    assert blocks(sizes) == (integer, merged)


def test_channel_quantize_dequantize_is_each_channels_group_quantizer():
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([0.02, 0.5, 0.1])
    zero_point = torch.tensor([128, 3, 250], dtype=torch.uint8)
    group = torch.tensor([0, 2, 1, 1, 0, 2])
    x = torch.randn(4, 7, 6, generator=g) * 10
    out = ChannelQuantizeDequantize(scale[group], zero_point[group], 0, 255)(x)
    for c, k in enumerate(group.tolist()):
        expected = QuantizeDequantize(scale[k], zero_point[k], 0, 255)(x[..., c])
        assert torch.equal(out[..., c], expected), c


@pytest.mark.parametrize("quantized", [False, True])
def test_permuting_a_linears_rows_permutes_gelu_of_its_output(quantized):
    torch.manual_seed(0)
    linear = nn.Linear(5, 8)
    if quantized:
        ints = torch.randint(-127, 128, (8, 5), dtype=torch.int8)
        dq = Dequantize(torch.rand(8) + 0.01, torch.zeros(8, dtype=torch.int8), 0)
        torch.nn.utils.parametrize.register_parametrization(linear, "weight", dq, unsafe=True)
        linear.parametrizations.weight.original = nn.Parameter(ints, requires_grad=False)
    model = nn.ModuleDict({"fc": linear})
    x = torch.randn(3, 5)
    order = torch.randperm(8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = F.gelu(model["fc"](x))[:, order]
        assert permute_output_rows(model, "fc", order)
        assert torch.equal(F.gelu(model["fc"](x)), expected)
    assert not permute_output_rows(model, "fc", order[:4]), "a permutation of another width is refused"
