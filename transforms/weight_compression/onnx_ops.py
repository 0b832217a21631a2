"""Export-only ops for weight-compressed models, with ONNX Runtime's ``MatMulNBits`` layout.

``purecomp::matmul_nbits(x, b, scales, zero_points, bias, k, n, bits, block_size, accuracy_level)``
computes ``x W^T + bias`` where ``W [n, k]`` is stored as ONNX Runtime's contrib op
``com.microsoft::MatMulNBits`` stores it (docs/ContribOperators.md of microsoft/onnxruntime):

- ``b``: uint8 ``[n, k_blocks, blob_size]``, ``k_blocks = ceil(k / block_size)``,
  ``blob_size = block_size * bits / 8``; the integers of one block are bit-packed along ``k``,
  low bits first (4 bits: element ``2j`` in the low nibble of byte ``j``, ``2j + 1`` in the high);
- ``scales``: ``[n, k_blocks]``, the dtype of ``x``;
- ``zero_points``: uint8 ``[n, ceil(k_blocks * bits / 8)]`` packed like ``b`` (per row, low bits
  first), or ``None``: then every zero point is ``2^(bits - 1)`` (8 for 4 bits, 128 for 8 bits);
- ``W[i, blk * block_size + j] = (q[i, blk, j] - z[i, blk]) * scales[i, blk]``.

``purecomp::gather_nbits(ids, b, scales, zero_points, k, bits, block_size)`` returns the rows
``W[ids]`` (``[*ids.shape, k]``) of a weight stored in the same layout: an embedding sharing its
table with a ``MatMulNBits`` LM head shares the initializers.

The eager kernels below implement those definitions from the ONNX Runtime documentation (they are
the oracle the exporter's layout is tested against). ``translation_table()`` gives the onnxscript
translations for ``torch.onnx.export(..., dynamo=True, custom_translation_table=...)``:
``matmul_nbits`` becomes one ``com.microsoft::MatMulNBits`` node; ``gather_nbits`` becomes
standard ONNX ops (``Gather`` of the packed rows, their scales and zero points, nibble unpacking
with ``BitwiseAnd`` / ``BitShift``, ``Cast``, ``Sub``, ``Mul``, ``Reshape``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

MSFT_DOMAIN = "com.microsoft"


def _unpack_bits(packed: Tensor, bits: int) -> Tensor:
    """uint8 ``[..., m]`` -> uint8 ``[..., m * 8 / bits]``, low bits first (4 or 8 bits)."""
    if bits == 8:
        return packed
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(*packed.shape[:-1], 2 * packed.shape[-1])


def nbits_to_float(b: Tensor, scales: Tensor, zero_points: Tensor | None, k: int, bits: int,
                   block_size: int) -> Tensor:
    """``W [n, k]`` (float32) from the ``MatMulNBits`` layout (module docstring)."""
    n, k_blocks = b.shape[0], b.shape[1]
    q = _unpack_bits(b, bits).reshape(n, k_blocks, block_size).to(torch.int32)
    if zero_points is None:
        z = torch.full((n, k_blocks, 1), 2 ** (bits - 1), dtype=torch.int32, device=b.device)
        x = (q - z).to(torch.float32)
    elif zero_points.dtype == torch.uint8:
        z = _unpack_bits(zero_points, bits)[:, :k_blocks].to(torch.int32).unsqueeze(-1)
        x = (q - z).to(torch.float32)
    else:  # unpacked zero points of the scales' float type
        x = q.to(torch.float32) - zero_points.to(torch.float32).unsqueeze(-1)
    w = x * scales.to(torch.float32).unsqueeze(-1)
    return w.reshape(n, k_blocks * block_size)[:, :k]


@torch.library.custom_op("purecomp::matmul_nbits", mutates_args=())
def matmul_nbits(x: Tensor, b: Tensor, scales: Tensor, zero_points: Tensor | None, bias: Tensor | None,
                 k: int, n: int, bits: int, block_size: int, accuracy_level: int) -> Tensor:
    w = nbits_to_float(b, scales, zero_points, k, bits, block_size).to(x.dtype)
    return torch.nn.functional.linear(x, w, bias)


@matmul_nbits.register_fake
def _matmul_nbits_fake(x: Tensor, b: Tensor, scales: Tensor, zero_points: Tensor | None, bias: Tensor | None,
                       k: int, n: int, bits: int, block_size: int, accuracy_level: int) -> Tensor:
    return x.new_empty((*x.shape[:-1], n))


@torch.library.custom_op("purecomp::gather_nbits", mutates_args=())
def gather_nbits(ids: Tensor, b: Tensor, scales: Tensor, zero_points: Tensor | None, k: int, bits: int,
                 block_size: int) -> Tensor:
    flat = ids.reshape(-1)
    zp = None if zero_points is None else zero_points[flat]
    rows = nbits_to_float(b[flat], scales[flat], zp, k, bits, block_size)
    return rows.to(scales.dtype).reshape(*ids.shape, k)


@gather_nbits.register_fake
def _gather_nbits_fake(ids: Tensor, b: Tensor, scales: Tensor, zero_points: Tensor | None, k: int, bits: int,
                       block_size: int) -> Tensor:
    return scales.new_empty((*ids.shape, k))


@torch.library.custom_op("purecomp::dequantize_nbits", mutates_args=())
def dequantize_nbits(b: Tensor, scales: Tensor, zero_points: Tensor | None, k: int, bits: int,
                     block_size: int) -> Tensor:
    return nbits_to_float(b, scales, zero_points, k, bits, block_size).to(scales.dtype)


@dequantize_nbits.register_fake
def _dequantize_nbits_fake(b: Tensor, scales: Tensor, zero_points: Tensor | None, k: int, bits: int,
                           block_size: int) -> Tensor:
    return scales.new_empty((b.shape[0], k))


def register_matmul_nbits_schema() -> None:
    """Register ``com.microsoft::MatMulNBits`` (version 1) in ONNX's schema registry, as ONNX Runtime
    documents it, unless it is there: onnxscript builds a node only for an op with a schema, and
    ``onnx.checker`` then checks the node's inputs and attributes too."""
    import onnx
    from onnx.defs import OpSchema

    if onnx.defs.has("MatMulNBits", 1, MSFT_DOMAIN):
        return
    optional = OpSchema.FormalParameterOption.Optional
    schema = OpSchema(
        "MatMulNBits", MSFT_DOMAIN, 1,
        "Y = A @ dequantize(B)^T (+ bias), B block-quantized along K (ONNX Runtime contrib op).",
        inputs=[OpSchema.FormalParameter("A", "T1"), OpSchema.FormalParameter("B", "T2"),
                OpSchema.FormalParameter("scales", "T1"),
                OpSchema.FormalParameter("zero_points", "T3", param_option=optional),
                OpSchema.FormalParameter("g_idx", "T4", param_option=optional),
                OpSchema.FormalParameter("bias", "T1", param_option=optional)],
        outputs=[OpSchema.FormalParameter("Y", "T1")],
        type_constraints=[("T1", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], ""),
                          ("T2", ["tensor(uint8)"], ""),
                          ("T3", ["tensor(uint8)", "tensor(float)", "tensor(float16)", "tensor(bfloat16)"], ""),
                          ("T4", ["tensor(int32)"], "")],
        attributes=[OpSchema.Attribute("K", OpSchema.AttrType.INT, required=True),
                    OpSchema.Attribute("N", OpSchema.AttrType.INT, required=True),
                    OpSchema.Attribute("bits", OpSchema.AttrType.INT, required=False),
                    OpSchema.Attribute("block_size", OpSchema.AttrType.INT, required=True),
                    OpSchema.Attribute("accuracy_level", OpSchema.AttrType.INT, required=False),
                    OpSchema.Attribute("weight_prepacked", OpSchema.AttrType.INT, required=False)],
    )
    onnx.defs.register_schema(schema)


def translation_table() -> dict[Any, Any]:
    """onnxscript translations of ``purecomp::matmul_nbits``, ``gather_nbits`` and ``dequantize_nbits``."""
    import onnx
    import onnxscript
    from onnxscript import opset21 as op

    register_matmul_nbits_schema()
    msft = onnxscript.values.Opset(MSFT_DOMAIN, 1)

    def u8(values: list[int]) -> Any:
        return op.Constant(value=onnx.helper.make_tensor("c", onnx.TensorProto.UINT8, [len(values)], values))

    def i64(values: list[int]) -> Any:
        return op.Constant(value=onnx.helper.make_tensor("c", onnx.TensorProto.INT64, [len(values)], values))

    def matmul_nbits_onnx(x, b, scales, zero_points, bias, k: int, n: int, bits: int, block_size: int,
                          accuracy_level: int):
        return msft.MatMulNBits(x, b, scales, zero_points, None, bias, K=k, N=n, bits=bits, block_size=block_size,
                                accuracy_level=accuracy_level)

    def unpack(rows, bits: int):
        # uint8 [..., m] -> [..., m * 8 / bits], low bits first
        if bits == 8:
            return rows
        low = op.BitwiseAnd(rows, u8([0x0F]))
        high = op.BitShift(rows, u8([4]), direction="RIGHT")
        pairs = op.Concat(op.Unsqueeze(low, i64([-1])), op.Unsqueeze(high, i64([-1])), axis=-1)
        lead = op.Shape(rows, end=-1)
        return op.Reshape(pairs, op.Concat(lead, i64([-1]), axis=0))

    def dequantize_rows(b_rows, scales_rows, zp_rows, lead, k: int, bits: int, block_size: int):
        # rows of the layout [*lead, k_blocks, blob] -> float [*lead, k]: (q - z) * s
        k_blocks = -(-k // block_size)
        q = op.Reshape(unpack(b_rows, bits), op.Concat(lead, i64([k_blocks, block_size]), axis=0))
        x = op.CastLike(q, scales_rows)
        if zp_rows is None:
            z = op.CastLike(u8([2 ** (bits - 1)]), scales_rows)
        else:
            z = op.Slice(unpack(zp_rows, bits), i64([0]), i64([k_blocks]), i64([-1]))
            z = op.Unsqueeze(op.CastLike(z, scales_rows), i64([-1]))
        w = op.Mul(op.Sub(x, z), op.Unsqueeze(scales_rows, i64([-1])))
        return op.Reshape(w, op.Concat(lead, i64([k_blocks * block_size]), axis=0))

    def gather_nbits_onnx(ids, b, scales, zero_points, k: int, bits: int, block_size: int):
        zp_rows = None if zero_points is None else op.Gather(zero_points, ids, axis=0)
        return dequantize_rows(op.Gather(b, ids, axis=0), op.Gather(scales, ids, axis=0), zp_rows, op.Shape(ids),
                               k, bits, block_size)

    def dequantize_nbits_onnx(b, scales, zero_points, k: int, bits: int, block_size: int):
        return dequantize_rows(b, scales, zero_points, op.Shape(b, end=1), k, bits, block_size)

    return {torch.ops.purecomp.matmul_nbits.default: matmul_nbits_onnx,
            torch.ops.purecomp.gather_nbits.default: gather_nbits_onnx,
            torch.ops.purecomp.dequantize_nbits.default: dequantize_nbits_onnx}
