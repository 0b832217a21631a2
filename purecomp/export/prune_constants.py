"""Pruned channels that carry a constant (``prune_batch_norms=False``): fold it into consumers.

Without ``prune_batch_norms`` the batch norm of a pruned channel keeps its affine parameters, so
in eval mode the channel carries ``k_c = beta_c - mu_c gamma_c / sqrt(var_c + eps)`` instead of
zero (``beta_c`` in training mode, where the batch statistics of a zero channel are zero).
Elementwise activations, max and adaptive pools, interpolation and adds of channels of one class
keep it constant, so a consumer reads a fixed ``v_c`` at every position, and removing the
channel drops a term that does not depend on the input:

- linear: ``W[:, cols] v`` (any fixed value per column), added to the bias;
- conv without zero padding (``padding`` 0, or a non-``zeros`` padding mode, which pads a
  constant image with the same constant): ``sum_c v_c sum_k W[:, c, k]``, added to the bias;
- zero-padded conv and conv-transpose: border outputs see fewer taps, so the term is the conv of
  an image of ones with the one-channel kernel ``W_v = sum_c v_c W[:, c]``; the rebuilt consumer
  gets that kernel as one extra input channel and a ones channel appended to its input
  (``ones_channel``), so batch-norm folding and weight quantization treat it like any other.

The values ``v`` are read from the masked model (eval mode) on two random inputs of the traced
shapes and must be equal at every position of both runs; otherwise ``StateError`` (a zero pad,
an average pool with padding or an input-dependent gate between batch norm and consumer).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from purecomp.errors import StateError

CONV_MODULES = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)


class _OnesChannel:
    """Appends a channel of ones to the input; the weight's last input channel reads it."""

    def forward(self, x: Tensor, *args: Any) -> Tensor:
        ones = x.new_ones((x.shape[0], 1, *x.shape[2:]))
        return super().forward(torch.cat([x, ones], 1), *args)  # type: ignore[misc]


class OnesChannelConv1d(_OnesChannel, nn.Conv1d):
    pass


class OnesChannelConv2d(_OnesChannel, nn.Conv2d):
    pass


class OnesChannelConv3d(_OnesChannel, nn.Conv3d):
    pass


class OnesChannelConvTranspose1d(_OnesChannel, nn.ConvTranspose1d):
    pass


class OnesChannelConvTranspose2d(_OnesChannel, nn.ConvTranspose2d):
    pass


class OnesChannelConvTranspose3d(_OnesChannel, nn.ConvTranspose3d):
    pass


_ONES = dict(
    zip(
        CONV_MODULES,
        (
            OnesChannelConv1d,
            OnesChannelConv2d,
            OnesChannelConv3d,
            OnesChannelConvTranspose1d,
            OnesChannelConvTranspose2d,
            OnesChannelConvTranspose3d,
        ),
    )
)


def carries_constants(state: Any) -> bool:
    """Whether a pruned channel passes a batch norm that does not zero it (``prune_batch_norms``
    off, or a batch norm without affine parameters)."""
    for g, c in state.pruned_classes():
        slots = state.groups.groups[g].classes[c].slots
        norms = {s.param.rpartition(".")[0] for s in slots if s.role in ("norm", "stat")}
        zeroed = (
            {s.param.rpartition(".")[0] for s in slots if s.role == "norm"}
            if state.prune_batch_norms
            else set()
        )
        if norms - zeroed:
            return True
    return False


def _probe(state: Any, seed: int) -> tuple[list[Tensor], dict[str, Tensor]]:
    """Random inputs of the traced shapes (float: standard normal; others: zeros)."""
    if not state.inputs:
        raise StateError(
            "pruned channels carry batch-norm constants (prune_batch_norms=False): the state "
            "has no traced input shapes to find them; rebuild it with method.init"
        )
    gen = torch.Generator().manual_seed(seed)
    args: list[Tensor] = []
    kwargs: dict[str, Tensor] = {}
    for name, shape, dtype in state.inputs:
        value = (
            torch.randn(shape, generator=gen).to(dtype)
            if dtype.is_floating_point
            else torch.zeros(shape, dtype=dtype)
        )
        if name.isdigit() and int(name) == len(args):
            args.append(value)
        elif "." not in name and not name.isdigit():
            kwargs[name] = value
        else:
            raise StateError(
                f"cannot rebuild the nested model input {name!r} to find the constants of pruned "
                "channels (prune_batch_norms=False); use prune_batch_norms=True"
            )
    return args, kwargs


def _consumers(state: Any) -> dict[str, tuple[int, list[int]]]:
    """``{module path: (weight axis, removed input indices)}`` of every consumer of a pruned channel."""
    out: dict[str, tuple[int, list[int]]] = {}
    for g, c in state.pruned_classes():
        for s in state.groups.groups[g].classes[c].slots:
            if s.role == "consumer":
                axis, indices = out.setdefault(s.param.rpartition(".")[0], (s.axis, []))
                indices.extend(range(s.start, s.stop))
    return {path: (axis, sorted(idx)) for path, (axis, idx) in out.items()}


def _constant(values: Tensor, path: str, index: int) -> Tensor:
    """The common value of ``values`` (every position, both probes), or ``StateError``."""
    v = values.double().mean()
    spread = float((values.double() - v).abs().max())
    if spread > 1e-5 * max(1.0, float(values.abs().max())):
        raise StateError(
            f"removed input {index} of {path!r} is not a constant in the masked model (it varies by {spread:.3g}): "
            "with prune_batch_norms=False a pruned channel's batch-norm constant must reach its consumers "
            "through elementwise ops, max/adaptive pools, interpolation or adds only; use prune_batch_norms=True"
        )
    return v.to(values.dtype)


def consumer_constants(model: nn.Module, state: Any) -> dict[str, tuple[int, Tensor, Tensor]]:
    """``{module path: (weight axis, removed input indices, their values)}`` read from ``model``
    (the masked model) on two random inputs; only consumers with a non-zero value are listed."""
    consumers = _consumers(state)
    captured: dict[str, list[Tensor]] = {path: [] for path in consumers}

    def hook(path: str):
        return lambda module, args: captured[path].append(args[0].detach())

    handles = [
        model.get_submodule(path).register_forward_pre_hook(hook(path)) for path in consumers
    ]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            for seed in (0, 1):
                args, kwargs = _probe(state, seed)
                model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    out: dict[str, tuple[int, Tensor, Tensor]] = {}
    for path, (axis, indices) in consumers.items():
        module = model.get_submodule(path)
        feature_axis = -1 if isinstance(module, nn.Linear) else 1
        values = torch.stack(
            [
                _constant(
                    torch.cat([x.select(feature_axis, i).flatten() for x in captured[path]]),
                    path,
                    i,
                )
                for i in indices
            ]
        )
        if bool(values.ne(0).any()):
            out[path] = (axis, torch.tensor(indices, dtype=torch.long), values)
    return out


def _zero_padded(m: nn.Module) -> bool:
    if isinstance(m, nn.modules.conv._ConvTransposeNd):
        return (
            any(k > 1 for k in m.kernel_size)
            or any(s > 1 for s in m.stride)
            or any(p > 0 for p in m.padding)
        )
    if m.padding_mode != "zeros":
        return False
    if isinstance(m.padding, str):
        return m.padding == "same" and any(k > 1 for k in m.kernel_size)
    return any(p > 0 for p in m.padding)


def _ones_channel_conv(m: nn.Module, column: Tensor, in_axis: int) -> nn.Module:
    """``m`` with one more input channel (weight ``column`` along ``in_axis``) reading ones."""
    kwargs = dict(
        kernel_size=m.kernel_size,
        stride=m.stride,
        padding=m.padding,
        dilation=m.dilation,
        groups=1,
        bias=m.bias is not None,
        padding_mode=m.padding_mode,
        device=m.weight.device,
        dtype=m.weight.dtype,
    )
    if isinstance(m, nn.modules.conv._ConvTransposeNd):
        kwargs["output_padding"] = m.output_padding
    base = next(cls for cls in type(m).__mro__ if cls in _ONES)
    new = _ONES[base](m.in_channels + 1, m.out_channels, **kwargs)
    new.weight = nn.Parameter(torch.cat([m.weight.detach(), column], in_axis), requires_grad=False)
    if m.bias is not None:
        new.bias = nn.Parameter(m.bias.detach().clone(), requires_grad=False)
    return new


def fold_constant(
    old: nn.Module, new: nn.Module, constants: tuple[int, Tensor, Tensor], kept_out: Tensor | None
) -> nn.Module:
    """The rebuilt consumer ``new`` with the removed constant inputs of ``old`` folded in: into
    the bias, or as a ones channel for zero-padded convs. ``kept_out``: surviving outputs."""
    axis, indices, values = constants
    weight = old.weight.detach().index_select(axis, indices)
    if isinstance(old, nn.Linear):
        term = weight @ values
    else:  # W_v = sum_c v_c W[c along the input axis], one input channel
        shape = [1] * weight.dim()
        shape[axis] = -1
        term = (weight * values.view(shape)).sum(axis, keepdim=True)
    out_axis = 1 if axis == 0 and not isinstance(old, nn.Linear) else 0
    if kept_out is not None:
        term = term.index_select(out_axis, kept_out)
    if isinstance(old, CONV_MODULES) and _zero_padded(old):
        return _ones_channel_conv(new, term, axis)
    if not isinstance(old, nn.Linear):
        term = term.sum(tuple(d for d in range(term.dim()) if d != out_axis))
    bias = term if new.bias is None else new.bias.detach() + term
    new.bias = nn.Parameter(bias.to(new.weight.dtype), requires_grad=False)
    return new


def fold_constants(
    model: nn.Module,
    old_modules: Mapping[str, nn.Module],
    constants: Mapping[str, tuple[int, Tensor, Tensor]],
    kept: Mapping[str, Mapping[int, Tensor]],
) -> None:
    """Fold every consumer's constants into its rebuilt module in ``model`` (in place)."""
    for path, entry in constants.items():
        old = old_modules[path]
        out_axis = 1 if entry[0] == 0 and not isinstance(old, nn.Linear) else 0
        kept_out = kept.get(f"{path}.weight", {}).get(out_axis)
        new = fold_constant(old, model.get_submodule(path), entry, kept_out)
        parent_path, _, attr = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, attr, new)
