"""Modules that hold compressed weights and dequantize them in ``forward``.

``CompressedLinear`` computes ``F.linear(x, W', b)`` and ``CompressedEmbedding`` looks up rows of
``W'``, where ``W'`` is dequantized from the buffers ``packed_weight``, ``scale`` and (asymmetric
modes) ``zero_point`` at every call (an embedding dequantizes only the looked-up rows). Their
``state_dict()`` holds exactly those buffers, the bias, and an ``_extra_state`` entry describing
the format (mode, group size, shape, dtype; ``input_scale: True`` when AWQ stored one): no float
weight. A ``CompressedLinear`` compressed with AWQ holds ``input_scale = 1 / s`` and dequantizes
``W' = Q(W diag(s)) diag(1 / s)``: one extra multiplication of the ``[out, in]`` weight by an
``[in]`` vector per call (``awq.py``). ``load_state_dict`` restores them
bit for bit and refuses an entry of another format (``StateError``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from purecomp.errors import ConfigError, StateError

from .grid import mode_spec
from .state import PackedWeight

FORMAT = "purecomp-packed-weight-1"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class _Compressed(nn.Module):
    """Shared storage of the compressed modules."""

    def __init__(self, packed: PackedWeight, weight_dtype: torch.dtype) -> None:
        super().__init__()
        self.mode = packed.mode
        self.group_size = packed.group_size
        self.weight_shape = tuple(packed.shape)
        self.weight_dtype = weight_dtype
        self.register_buffer("packed_weight", packed.data)
        self.register_buffer("scale", packed.scale)
        self.register_buffer("zero_point", packed.zero_point)  # None: not in state_dict
        self.register_buffer("input_scale", packed.input_scale)  # AWQ's 1 / s, else None

    @property
    def packed(self) -> PackedWeight:
        """The stored weight as a ``PackedWeight`` (sharing the buffers)."""
        return PackedWeight(self.packed_weight, self.scale, self.zero_point, self.mode, self.group_size,
                            self.weight_shape, self.input_scale)

    @property
    def weight(self) -> Tensor:
        """``W'`` in the original dtype (a fresh dequantization on every access; no gradient)."""
        with torch.no_grad():
            return self.packed.dequantize(self.weight_dtype)

    def get_extra_state(self) -> dict[str, Any]:
        state = {"format": FORMAT, "mode": self.mode, "group_size": self.group_size,
                 "shape": list(self.weight_shape), "dtype": _dtype_name(self.weight_dtype)}
        if self.input_scale is not None:
            state["input_scale"] = True
        return state

    def set_extra_state(self, state: Any) -> None:
        expected = self.get_extra_state()
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise StateError(f"not a purecomp packed weight entry (expected format {FORMAT!r}): {state!r}")
        scaled = self.input_scale is not None
        if {k: state.get(k) for k in expected} != expected or bool(state.get("input_scale")) != scaled:
            raise StateError(f"the state_dict holds a {state.get('mode')} weight (group size {state.get('group_size')}, "
                             f"shape {state.get('shape')}, {state.get('dtype')}"
                             f"{', AWQ input scale' if state.get('input_scale') else ''}); this module stores "
                             f"{self.mode} (group size {self.group_size}, shape {list(self.weight_shape)}, "
                             f"{_dtype_name(self.weight_dtype)}{', AWQ input scale' if scaled else ''})")

    @staticmethod
    def _empty(mode: str, group_size: int, shape: tuple[int, int], device: Any = None,
               input_scale: bool = False) -> PackedWeight:
        """Zero buffers of the right shapes, to be filled by ``load_state_dict``."""
        spec = mode_spec(mode)
        out, in_features = shape
        if group_size < 1 or in_features % group_size:
            raise ConfigError("group_size", f"{group_size} does not divide {in_features} input channels")
        n_groups = in_features // group_size
        width = (in_features + 1) // 2 if spec.bits == 4 else in_features
        data = torch.zeros(out, width, dtype=torch.uint8 if spec.bits == 4 else spec.dtype, device=device)
        zp = None
        if spec.asymmetric:
            zp = torch.zeros(out, (n_groups + 1) // 2 if spec.bits == 4 else n_groups, dtype=torch.uint8, device=device)
        scale = torch.zeros(out, n_groups, dtype=torch.float16, device=device)
        ones = torch.ones(in_features, dtype=torch.float32, device=device) if input_scale else None
        return PackedWeight(data, scale, zp, spec.name, group_size, (out, in_features), ones)

    def extra_repr(self) -> str:
        return f"{self.weight_shape[1]}, {self.weight_shape[0]}, mode={self.mode}, group_size={self.group_size}"


class CompressedLinear(_Compressed):
    """``y = x W'^T + b`` with ``W'`` dequantized from packed integers at every call."""

    def __init__(self, packed: PackedWeight, bias: Tensor | None = None,
                 weight_dtype: torch.dtype = torch.float32) -> None:
        super().__init__(packed, weight_dtype)
        self.out_features, self.in_features = self.weight_shape
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=bias.requires_grad)

    @classmethod
    def from_linear(cls, linear: nn.Linear, packed: PackedWeight) -> CompressedLinear:
        if tuple(linear.weight.shape) != packed.shape:
            raise StateError(f"a {packed.shape} packed weight does not fit a Linear of weight {tuple(linear.weight.shape)}")
        return cls(packed, linear.bias, linear.weight.dtype)

    @classmethod
    def empty(cls, mode: str, group_size: int, in_features: int, out_features: int, bias: bool = False,
              weight_dtype: torch.dtype = torch.float32, input_scale: bool = False) -> CompressedLinear:
        """A module with zero buffers (and, with ``input_scale``, an AWQ input scale), to load a
        compressed ``state_dict`` into."""
        packed = cls._empty(mode, group_size, (out_features, in_features), input_scale=input_scale)
        return cls(packed, torch.zeros(out_features, dtype=weight_dtype) if bias else None, weight_dtype)

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype if x.is_floating_point() else self.weight_dtype
        return F.linear(x, self.packed.dequantize(dtype), self.bias)


class CompressedEmbedding(_Compressed):
    """``W'[ids]``, dequantizing only the looked-up rows (grouped along the embedding dimension)."""

    def __init__(self, packed: PackedWeight, padding_idx: int | None = None,
                 weight_dtype: torch.dtype = torch.float32) -> None:
        super().__init__(packed, weight_dtype)
        self.num_embeddings, self.embedding_dim = self.weight_shape
        self.padding_idx = padding_idx

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, packed: PackedWeight) -> CompressedEmbedding:
        if tuple(embedding.weight.shape) != packed.shape:
            raise StateError(f"a {packed.shape} packed weight does not fit an Embedding of weight "
                             f"{tuple(embedding.weight.shape)}")
        if embedding.max_norm is not None:
            raise ConfigError("embedding", "an Embedding with max_norm renormalizes its weight in forward; "
                              "it cannot be stored compressed")
        return cls(packed, embedding.padding_idx, embedding.weight.dtype)

    @classmethod
    def empty(cls, mode: str, group_size: int, num_embeddings: int, embedding_dim: int,
              padding_idx: int | None = None, weight_dtype: torch.dtype = torch.float32) -> CompressedEmbedding:
        """A module with zero buffers, to load a compressed ``state_dict`` into."""
        return cls(cls._empty(mode, group_size, (num_embeddings, embedding_dim)), padding_idx, weight_dtype)

    def forward(self, ids: Tensor) -> Tensor:
        return self.packed.rows(ids, self.weight_dtype)
