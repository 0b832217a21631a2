"""The stored form of a compressed weight and the state of the ``weight_compression`` method.

``PackedWeight`` holds one weight ``W [out, in]`` as integers (4-bit modes: two per byte,
``packing.py``), its per-group scales in float16 (as NNCF's PyTorch decompressors store them)
and, for the asymmetric modes, its zero points (packed too for ``int4_asym``). The integers are
those ``grid.quantize`` computes with float32 scales; dequantization computes
``(q - z) * float32(s16)`` in float32 and casts to the layer's dtype, so a stored weight differs
from ``grid.fake_quantize`` only by the float16 rounding of ``s`` (relative ``<= 2^-11``).

A weight compressed with AWQ (``awq.py``) also holds ``input_scale = 1 / s`` (float32, one per
input channel): the integers encode ``W diag(s)`` and the stored weight is
``W' = dequantize(q) diag(input_scale)``, so ``x W'^T = (x / s) Q(W diag(s))^T``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from purecomp.errors import StateError
from purecomp.struct import static_field, struct

from .grid import Quantized, dequantize, mode_spec
from .packing import pack_int4, unpack_int4

SCALE_DTYPE = torch.float16


@struct
class PackedWeight:
    """One compressed weight: ``data`` (int8 / uint8 ``[out, in]``, or uint8 ``[out, ceil(in / 2)]``
    for 4-bit modes), ``scale [out, n_groups]``, ``zero_point`` (asymmetric modes: uint8
    ``[out, n_groups]``, packed for ``int4_asym``; else ``None``), the ``mode``, the number of
    input columns per group ``group_size``, the weight's ``shape`` and, after AWQ, the
    per-input-channel ``input_scale [in]`` (float32; ``None`` otherwise; module docstring)."""

    data: Tensor
    scale: Tensor
    zero_point: Tensor | None
    mode: str = static_field()
    group_size: int = static_field()
    shape: tuple[int, int] = static_field()
    input_scale: Tensor | None = None

    @classmethod
    def pack(cls, q: Quantized, mode: str, scale_dtype: torch.dtype = SCALE_DTYPE,
             input_scale: Tensor | None = None) -> PackedWeight:
        """Store ``grid.quantize``'s result: 4-bit values packed, scales in ``scale_dtype``;
        ``input_scale`` (AWQ's ``1 / s``) in float32."""
        spec = mode_spec(mode)
        out, in_features = q.values.shape
        n_groups = q.scale.shape[-1]
        data = pack_int4(q.values) if spec.bits == 4 else q.values.contiguous()
        zp = q.zero_point
        if zp is not None and spec.bits == 4:
            zp = pack_int4(zp)
        if input_scale is not None:
            if tuple(input_scale.shape) != (in_features,):
                raise StateError(f"input_scale of shape {tuple(input_scale.shape)} does not fit a weight with "
                                 f"{in_features} input channels")
            input_scale = input_scale.detach().to(torch.float32).contiguous()
        return cls(data, q.scale.to(scale_dtype).contiguous(), zp, spec.name, in_features // n_groups,
                   (int(out), int(in_features)), input_scale)

    @property
    def bits(self) -> int:
        return mode_spec(self.mode).bits

    @property
    def n_groups(self) -> int:
        return self.shape[1] // self.group_size

    def unpack(self) -> Quantized:
        """The integers, scales (as stored) and zero points, unpacked."""
        spec = mode_spec(self.mode)
        out, in_features = self.shape
        values = unpack_int4(self.data, in_features, signed=spec.qmin < 0) if spec.bits == 4 else self.data
        zp = self.zero_point
        if zp is not None and spec.bits == 4:
            zp = unpack_int4(zp, self.n_groups)
        return Quantized(values, self.scale, zp)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """``W'`` in ``dtype`` (``grid.dequantize`` of the unpacked integers, times ``input_scale``
        per input column when AWQ set one)."""
        q = self.unpack()
        if self.input_scale is None:
            return dequantize(q.values, q.scale, q.zero_point, self.mode, dtype=dtype)
        w = dequantize(q.values, q.scale, q.zero_point, self.mode, dtype=torch.float32)
        return (w * self.input_scale.to(torch.float32)).to(dtype)

    def rows(self, index: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """``W'[index]`` for integer ``index`` of any shape (an embedding lookup), dequantizing only
        the selected rows: ``[*index.shape, in]``."""
        flat = index.reshape(-1)
        selected = PackedWeight(self.data[flat], self.scale[flat],
                                None if self.zero_point is None else self.zero_point[flat],
                                self.mode, self.group_size, (int(flat.numel()), self.shape[1]), self.input_scale)
        return selected.dequantize(dtype).reshape(*index.shape, self.shape[1])

    @property
    def nbytes(self) -> int:
        """Bytes of the stored tensors."""
        tensors = [self.data, self.scale] + [t for t in (self.zero_point, self.input_scale) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def label(self) -> str:
        """``int4_asym, group size 64`` or ``int8_asym, per-channel`` (NNCF's table labels)."""
        per_channel = self.group_size == self.shape[1]
        return f"{self.mode}, " + ("per-channel" if per_channel else f"group size {self.group_size}")


@struct
class WeightCompressionState:
    """Compressed weights by parameter name, plus what the statistics report needs: the weights
    left in float (``float_weights``: name -> number of elements; ignored layers, ``backup_mode=
    "none"``), the ratio-defining weights (those that may go to 4 bits) and each weight's layer
    kind (``linear`` / ``embedding``). The method's ``params`` transform returns ``W'`` for each."""

    weights: dict[str, PackedWeight]
    float_weights: dict[str, int] = static_field(default_factory=dict)
    ratio_defining: tuple[str, ...] = static_field(default=())
    kinds: dict[str, str] = static_field(default_factory=dict)

    def dequantized(self, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``params`` with every compressed weight replaced by ``W'`` in that param's dtype."""
        out = dict(params)
        for name, packed in self.weights.items():
            if name not in out:
                raise StateError(f"weight compression state holds {name!r}, which the params do not; "
                                 "the state belongs to another model")
            if tuple(out[name].shape) != packed.shape:
                raise StateError(f"{name!r}: the state holds a {packed.shape} weight, the params a "
                                 f"{tuple(out[name].shape)} one")
            out[name] = packed.dequantize(out[name].dtype).to(out[name].device)
        return out

    # -- the extension protocol (purecomp.protocol) --
    def statistics(self, graph: Any = None) -> dict[str, list[dict[str, Any]]]:
        """``weight compression``: per precision (NNCF's bitwidth distribution table), the share of
        all compressible weights and of the ratio-defining ones (by number of elements, with the
        number of layers), and the stored size; a last row totals float32 size against stored."""
        groups: dict[tuple[str, int], dict[str, Any]] = {}
        ratio_defining = set(self.ratio_defining)
        for name, packed in self.weights.items():
            row = groups.setdefault((packed.label, packed.bits), {"n": [], "r": [], "bytes": 0})
            row["n"].append(packed.shape[0] * packed.shape[1])
            row["bytes"] += packed.nbytes
            if name in ratio_defining:
                row["r"].append(packed.shape[0] * packed.shape[1])
        for name, numel in self.float_weights.items():
            row = groups.setdefault(("float", 32), {"n": [], "r": [], "bytes": 0})
            row["n"].append(numel)
            row["bytes"] += 4 * numel
            if name in ratio_defining:
                row["r"].append(numel)
        total = sum(sum(g["n"]) for g in groups.values())
        total_layers = sum(len(g["n"]) for g in groups.values())
        total_r = sum(sum(g["r"]) for g in groups.values())
        rows = []
        for (label, bits), g in sorted(groups.items(), key=lambda kv: (-kv[0][1], kv[0][0])):
            rows.append({
                "precision": label,
                "bits": bits,
                "layers": len(g["n"]),
                "% all weights": round(100 * sum(g["n"]) / max(total, 1), 1),
                "% ratio-defining": round(100 * sum(g["r"]) / max(total_r, 1), 1),
                "ratio-defining layers": len(g["r"]),
                "MiB": round(g["bytes"] / 2**20, 2),
            })
        stored = sum(g["bytes"] for g in groups.values())
        rows.append({"precision": "total", "bits": round(8 * stored / max(total, 1), 2), "layers": total_layers,
                     "% all weights": 100.0, "% ratio-defining": 100.0 if total_r else 0.0,
                     "ratio-defining layers": len(ratio_defining),
                     "MiB": f"{stored / 2**20:.2f} (float32 {4 * total / 2**20:.2f})"})
        return {"weight compression": rows}
