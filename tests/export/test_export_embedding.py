"""Export of quantized embeddings: gather the integer rows, dequantize only those (never the whole
table); exact against looking up the dequantized table, and onnxruntime against PyTorch."""

from __future__ import annotations

import onnx
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import purecomp as pc
from purecomp import export
from purecomp.errors import StateError
from purecomp.export.embedding import (
    QuantizedEmbedding,
    quantized_embedding,
    replace_quantized_embeddings,
)
from purecomp.export.modules import Dequantize

VOCAB, DIM = 50, 8


class Lookup(nn.Module):
    """Embedding -> linear: the smallest model with a quantized table."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(VOCAB, DIM)
        self.fc = nn.Linear(DIM, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(ids))


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("dtype, axis, per_channel", [
    (torch.int8, 0, True), (torch.uint8, 0, True), (torch.int8, 1, True), (torch.uint8, 0, False)])
def test_quantized_embedding_is_the_lookup_of_the_dequantized_table(dtype, axis, per_channel):
    g = torch.Generator().manual_seed(0)
    low, high = (-128, 128) if dtype == torch.int8 else (0, 256)
    ints = torch.randint(low, high, (VOCAB, DIM), generator=g).to(dtype)
    count = (VOCAB, DIM)[axis] if per_channel else 1
    scale = (torch.rand(count, generator=g) + 0.01).reshape(-1 if per_channel else ())
    zero_point = torch.randint(low, high, (count,), generator=g).to(dtype).reshape(scale.shape)
    table = torch.ops.purecomp.dq(ints, scale, zero_point, axis)
    ids = _ids()
    assert torch.equal(QuantizedEmbedding(ints, scale, zero_point, axis)(ids), F.embedding(ids, table))


def test_quantized_embedding_rejects_other_shapes_and_axes():
    ints = torch.zeros(4, 3, dtype=torch.int8)
    with pytest.raises(StateError, match="2-D"):
        QuantizedEmbedding(ints[0], torch.ones(()), torch.zeros((), dtype=torch.int8), 0)
    with pytest.raises(StateError, match="axis"):
        QuantizedEmbedding(ints, torch.ones(()), torch.zeros((), dtype=torch.int8), 2)


def _parametrized(module: nn.Embedding) -> nn.Embedding:
    ints = torch.zeros_like(module.weight, dtype=torch.int8)
    dq = Dequantize(torch.ones(VOCAB), torch.zeros(VOCAB, dtype=torch.int8), 0)
    torch.nn.utils.parametrize.register_parametrization(module, "weight", dq, unsafe=True)
    module.parametrizations.weight.original = nn.Parameter(ints, requires_grad=False)
    return module


def test_only_plain_quantized_embeddings_without_sites_are_swapped():
    class Scaled(nn.Embedding):  # a subclass may change the lookup (HF's scaled word embeddings do)
        pass

    model = nn.ModuleDict({
        "plain": _parametrized(nn.Embedding(VOCAB, DIM)),
        "kept": _parametrized(nn.Embedding(VOCAB, DIM)),
        "renormed": _parametrized(nn.Embedding(VOCAB, DIM, max_norm=1.0)),
        "scaled": _parametrized(Scaled(VOCAB, DIM)),
        "unquantized": nn.Embedding(VOCAB, DIM),
    })
    assert quantized_embedding(model["unquantized"]) is None
    assert replace_quantized_embeddings(model, keep={"kept"}) == ["plain"]
    assert isinstance(model["plain"], QuantizedEmbedding)
    assert not any(isinstance(model[k], QuantizedEmbedding) for k in ("kept", "renormed", "scaled", "unquantized"))


@pytest.mark.parametrize("mode, per_channel", [("symmetric", True), ("asymmetric", True), ("symmetric", False)])
def test_embedding_export_gathers_integer_rows_and_agrees_with_pytorch(mode, per_channel, tmp_path):
    pytest.importorskip("onnxruntime")
    from purecomp.export.check import ort_session

    model, ids = Lookup().eval(), _ids()
    method = pc.quantization(weights=dict(mode=mode, per_channel=per_channel))
    params = dict(model.named_parameters())
    state = method.init(pc.trace(model, (ids,)), params, [ids])
    assert "emb.weight" in state.weights
    path = export.to_onnx(model, method, params, state, (ids,), tmp_path / "lookup.onnx")
    result = export.check(path, model, method, params, state, (ids,))
    assert result.max_steps <= 1.0 + 1e-4 and result.fused_max_steps <= 1.0 + 1e-4, result

    optimized = tmp_path / "optimized.onnx"
    ort_session(path, True, optimized)
    for graph_path in (path, optimized):
        graph = onnx.load(str(graph_path)).graph
        tables = {i.name: i for i in graph.initializer if list(i.dims) == [VOCAB, DIM]}
        table = [name for name, i in tables.items() if i.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)]
        assert len(table) == 1 and len(tables) == 1, "only the integer table is stored (no float copy)"
        readers = [n.op_type for n in graph.node if table[0] in n.input]
        assert readers == ["Gather"], f"the table is gathered first, never dequantized whole: {readers}"
