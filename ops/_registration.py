"""Python-side kernels of the C++ ops ``purecomp::fake_quantize_*`` and ``purecomp::activation_binarize``: fake (meta) and vmap.

Imported by ``build`` right after the library loads (the C++ ``TORCH_LIBRARY`` names this
module with ``set_python_module``); CPU and autograd kernels are C++ (``csrc/``). Schemas:

- ``fake_quantize_symmetric(x, scale, quant_min, quant_max, axis=None) -> out``
- ``fake_quantize_symmetric_backward(grad, x, scale, quant_min, quant_max, axis=None) -> (grad_x, grad_scale)``
- ``fake_quantize_asymmetric(x, input_low, input_range, levels, axis=None) -> out``
- ``fake_quantize_asymmetric_backward(grad, x, input_low, input_range, levels, axis=None)
  -> (grad_x, grad_input_low, grad_input_range)``

``axis=None`` is per-tensor (parameters hold one value), else per-channel along ``axis``
(parameters of shape ``(C,)``). Outputs are laid out as ``torch.empty_like(x)``; parameter
gradients are contiguous with the parameter's shape.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

SYM = "purecomp::fake_quantize_symmetric"
SYM_BACKWARD = "purecomp::fake_quantize_symmetric_backward"
ASYM = "purecomp::fake_quantize_asymmetric"
ASYM_BACKWARD = "purecomp::fake_quantize_asymmetric_backward"


def _like_output(x: Tensor) -> Tensor:
    """An empty tensor laid out as the C++ kernels lay out their output: ``empty_like(x)``."""
    return torch.empty_like(x)


def _like_param(p: Tensor) -> Tensor:
    return torch.empty_like(p, memory_format=torch.contiguous_format)


# ---------------------------------------------------------------- fake kernels


@torch.library.register_fake(SYM)
def _sym_fake(
    x: Tensor, scale: Tensor, quant_min: int, quant_max: int, axis: int | None = None
) -> Tensor:
    return _like_output(x)


@torch.library.register_fake(SYM_BACKWARD)
def _sym_backward_fake(
    grad: Tensor, x: Tensor, scale: Tensor, quant_min: int, quant_max: int, axis: int | None = None
) -> tuple[Tensor, Tensor]:
    return _like_output(x), _like_param(scale)


@torch.library.register_fake(ASYM)
def _asym_fake(
    x: Tensor, input_low: Tensor, input_range: Tensor, levels: int, axis: int | None = None
) -> Tensor:
    return _like_output(x)


@torch.library.register_fake(ASYM_BACKWARD)
def _asym_backward_fake(
    grad: Tensor,
    x: Tensor,
    input_low: Tensor,
    input_range: Tensor,
    levels: int,
    axis: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    return _like_output(x), _like_param(input_low), _like_param(input_range)


# ---------------------------------------------------------------- vmap rules
# A vmapped call becomes one kernel call on the batched tensor: an unbatched parameter keeps
# its axis (shifted by one); per-sample parameters turn the batch dim into (part of) the
# channel axis: per-tensor -> channels along the batch dim, per-channel -> B*C channels.


def _batch_first(t: Tensor, bdim: int | None, batch: int) -> Tensor:
    if bdim is None:
        return t.expand(batch, *t.shape)
    return t.movedim(bdim, 0)


def _merge_channels(x: Tensor, axis: int | None) -> tuple[Tensor, int]:
    """View batch-first ``x`` so that (batch, channel) is one leading axis; return it and axis 0."""
    if axis is None:
        return x, 0
    moved = x.movedim(axis + 1, 1)
    return moved.reshape(moved.shape[0] * moved.shape[1], *moved.shape[2:]), 0


def _split_channels(y: Tensor, like: Tensor, axis: int | None) -> Tensor:
    """Inverse of ``_merge_channels`` for a result ``y`` shaped like the merged ``like``."""
    if axis is None:
        return y
    moved_shape = like.movedim(axis + 1, 1).shape
    return y.reshape(moved_shape).movedim(1, axis + 1)


def _norm_axis(axis: int | None, batched_dim: int) -> int | None:
    return None if axis is None else axis % (batched_dim - 1)


def _vmap_forward(
    op: Any,
    info: Any,
    in_dims: tuple[Any, ...],
    x: Tensor,
    params: list[Tensor],
    static: tuple,
    axis: int | None,
) -> tuple[Tensor, int]:
    batch = info.batch_size
    xb = _batch_first(x, in_dims[0], batch)
    axis = _norm_axis(axis, xb.dim())
    param_dims = in_dims[1 : 1 + len(params)]
    if all(d is None for d in param_dims):
        return op(xb, *params, *static, None if axis is None else axis + 1), 0
    pb = [_batch_first(p, d, batch) for p, d in zip(params, param_dims)]
    merged, channel_axis = _merge_channels(xb, axis)
    out = op(merged, *[p.reshape(-1) for p in pb], *static, channel_axis)
    return _split_channels(out, xb, axis), 0


def _vmap_backward(
    op: Any,
    info: Any,
    in_dims: tuple[Any, ...],
    grad: Tensor,
    x: Tensor,
    params: list[Tensor],
    static: tuple,
    axis: int | None,
) -> tuple[tuple[Tensor, ...], tuple[int, ...]]:
    batch = info.batch_size
    gb = _batch_first(grad, in_dims[0], batch)
    xb = _batch_first(x, in_dims[1], batch)
    axis = _norm_axis(axis, xb.dim())
    pb = [_batch_first(p, d, batch) for p, d in zip(params, in_dims[2 : 2 + len(params)])]
    merged_x, channel_axis = _merge_channels(xb, axis)
    merged_g, _ = _merge_channels(gb, axis)
    grad_x, *grad_params = op(
        merged_g, merged_x, *[p.reshape(-1) for p in pb], *static, channel_axis
    )
    grad_x = _split_channels(grad_x, xb, axis)
    grad_params = [g.reshape(p.shape) for g, p in zip(grad_params, pb)]
    return (grad_x, *grad_params), (0,) * (1 + len(params))


@torch.library.register_vmap(SYM)
def _sym_vmap(
    info: Any,
    in_dims: tuple[Any, ...],
    x: Tensor,
    scale: Tensor,
    quant_min: int,
    quant_max: int,
    axis: int | None = None,
) -> tuple[Tensor, int]:
    op = torch.ops.purecomp.fake_quantize_symmetric
    return _vmap_forward(op, info, in_dims, x, [scale], (quant_min, quant_max), axis)


@torch.library.register_vmap(SYM_BACKWARD)
def _sym_backward_vmap(
    info: Any,
    in_dims: tuple[Any, ...],
    grad: Tensor,
    x: Tensor,
    scale: Tensor,
    quant_min: int,
    quant_max: int,
    axis: int | None = None,
) -> tuple[tuple[Tensor, ...], tuple[int, ...]]:
    op = torch.ops.purecomp.fake_quantize_symmetric_backward
    return _vmap_backward(op, info, in_dims, grad, x, [scale], (quant_min, quant_max), axis)


@torch.library.register_vmap(ASYM)
def _asym_vmap(
    info: Any,
    in_dims: tuple[Any, ...],
    x: Tensor,
    input_low: Tensor,
    input_range: Tensor,
    levels: int,
    axis: int | None = None,
) -> tuple[Tensor, int]:
    op = torch.ops.purecomp.fake_quantize_asymmetric
    return _vmap_forward(op, info, in_dims, x, [input_low, input_range], (levels,), axis)


@torch.library.register_vmap(ASYM_BACKWARD)
def _asym_backward_vmap(
    info: Any,
    in_dims: tuple[Any, ...],
    grad: Tensor,
    x: Tensor,
    input_low: Tensor,
    input_range: Tensor,
    levels: int,
    axis: int | None = None,
) -> tuple[tuple[Tensor, ...], tuple[int, ...]]:
    op = torch.ops.purecomp.fake_quantize_asymmetric_backward
    return _vmap_backward(op, info, in_dims, grad, x, [input_low, input_range], (levels,), axis)


# ---------------------------------------------------------------- activation binarization
# ``activation_binarize(x, scale, threshold, axis) -> out`` and
# ``activation_binarize_backward(grad, x, scale, threshold, axis) -> (grad_x, grad_scale, grad_threshold)``:
# ``scale`` holds one value, ``threshold`` has shape ``(C,)`` along ``axis`` (csrc/binarize.cpp).

BIN = "purecomp::activation_binarize"
BIN_BACKWARD = "purecomp::activation_binarize_backward"


@torch.library.register_fake(BIN)
def _bin_fake(x: Tensor, scale: Tensor, threshold: Tensor, axis: int) -> Tensor:
    return _like_output(x)


@torch.library.register_fake(BIN_BACKWARD)
def _bin_backward_fake(
    grad: Tensor, x: Tensor, scale: Tensor, threshold: Tensor, axis: int
) -> tuple[Tensor, Tensor, Tensor]:
    return _like_output(x), _like_param(scale), _like_param(threshold)


# vmap: one kernel call when the scale is shared (per-sample thresholds become B*C channels);
# a per-sample scale (the kernel takes one) and the backward (whose scale gradient is per sample)
# run the kernel once per sample.


def _per_sample(op: Any, batch: int, args: list[tuple[Tensor, int | None]], axis: int) -> list[Any]:
    def pick(t: Tensor, d: int | None, i: int) -> Tensor:
        return t if d is None else t.select(d, i)

    return [op(*[pick(t, d, i) for t, d in args], axis) for i in range(batch)]


@torch.library.register_vmap(BIN)
def _bin_vmap(
    info: Any, in_dims: tuple[Any, ...], x: Tensor, scale: Tensor, threshold: Tensor, axis: int
) -> tuple[Tensor, int]:
    op = torch.ops.purecomp.activation_binarize
    batch = info.batch_size
    x_dim, scale_dim, threshold_dim = in_dims[:3]
    if scale_dim is not None:
        args = [(x, x_dim), (scale, scale_dim), (threshold, threshold_dim)]
        return torch.stack(_per_sample(op, batch, args, axis)), 0
    xb = _batch_first(x, x_dim, batch)
    axis = axis % (xb.dim() - 1)
    if threshold_dim is None:
        return op(xb, scale, threshold, axis + 1), 0
    merged, channel_axis = _merge_channels(xb, axis)
    tb = _batch_first(threshold, threshold_dim, batch)
    out = op(merged, scale, tb.reshape(-1), channel_axis)
    return _split_channels(out, xb, axis), 0


@torch.library.register_vmap(BIN_BACKWARD)
def _bin_backward_vmap(
    info: Any,
    in_dims: tuple[Any, ...],
    grad: Tensor,
    x: Tensor,
    scale: Tensor,
    threshold: Tensor,
    axis: int,
) -> tuple[tuple[Tensor, ...], tuple[int, ...]]:
    op = torch.ops.purecomp.activation_binarize_backward
    args = [(grad, in_dims[0]), (x, in_dims[1]), (scale, in_dims[2]), (threshold, in_dims[3])]
    results = _per_sample(op, info.batch_size, args, axis)
    return tuple(torch.stack(r) for r in zip(*results)), (0, 0, 0)
