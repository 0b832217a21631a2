"""Physical channel removal for filter pruning: smaller conv, batch-norm and linear modules.

For each pruned channel class every slot goes: producer filters (conv weight axis 0, conv
transpose axis 1) and biases, batch-norm rows (weight, bias, running statistics), depthwise
conv rows (in, out and ``groups`` shrink together), consumer input channels (conv weight
axis 1, conv-transpose axis 0) and linear input column blocks. Modules are rebuilt with the
surviving slices and swapped into the (already copied) model. Pruned channels are exactly zero
at every consumer in the masked model, or (``prune_batch_norms=False``) a constant that is folded
into the consumer (``prune_constants``), so the result computes the same function.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from purecomp.errors import StateError

from .prune_constants import CONV_MODULES, carries_constants, consumer_constants, fold_constants

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def removed_slices(state: Any) -> dict[str, dict[int, set[int]]]:
    """``{param: {axis: indices to remove}}`` for every slot of the pruned classes of ``state``."""
    removed: dict[str, dict[int, set[int]]] = {}
    for g, c in state.pruned_classes():
        for slot in state.groups.groups[g].classes[c].slots:
            removed.setdefault(slot.param, {}).setdefault(slot.axis, set()).update(
                range(slot.start, slot.stop)
            )
    return removed


def _keep(size: int, drop: set[int]) -> Tensor:
    return torch.tensor([i for i in range(size) if i not in drop], dtype=torch.long)


def _base(module: nn.Module, families: tuple[type, ...]) -> type:
    return next(cls for cls in type(module).__mro__ if cls in families)


def _param(tensor: Tensor) -> nn.Parameter:
    return nn.Parameter(tensor.detach().clone(), requires_grad=False)


def _conv(m: nn.Module, removed: Mapping[int, set[int]]) -> nn.Module:
    transposed = isinstance(m, nn.modules.conv._ConvTransposeNd)
    w = m.weight
    in_axis, out_axis = (0, 1) if transposed else (1, 0)
    keep_out = _keep(m.out_channels, removed.get(out_axis, set()))
    if m.groups > 1:  # depthwise: channel c in is channel c out
        keep_in = keep_out
        weight = w.index_select(0, keep_out)
        groups = len(keep_out)
    else:
        keep_in = _keep(m.in_channels, removed.get(in_axis, set()))
        weight = w.index_select(out_axis, keep_out).index_select(in_axis, keep_in)
        groups = 1
    kwargs = dict(
        kernel_size=m.kernel_size,
        stride=m.stride,
        padding=m.padding,
        dilation=m.dilation,
        groups=groups,
        bias=m.bias is not None,
        padding_mode=m.padding_mode,
        device=w.device,
        dtype=w.dtype,
    )
    if transposed:
        kwargs["output_padding"] = m.output_padding
    new = _base(m, CONV_MODULES)(len(keep_in), len(keep_out), **kwargs)
    new.weight = _param(weight)
    if m.bias is not None:
        new.bias = _param(m.bias.index_select(0, keep_out))
    return new


def _linear(m: nn.Linear, removed: Mapping[int, set[int]]) -> nn.Linear:
    keep_out = _keep(m.out_features, removed.get(0, set()))
    keep_in = _keep(m.in_features, removed.get(1, set()))
    new = nn.Linear(
        len(keep_in),
        len(keep_out),
        bias=m.bias is not None,
        device=m.weight.device,
        dtype=m.weight.dtype,
    )
    new.weight = _param(m.weight.index_select(0, keep_out).index_select(1, keep_in))
    if m.bias is not None:
        new.bias = _param(m.bias.index_select(0, keep_out))
    return new


def _norm(m: nn.Module, removed: Mapping[int, set[int]]) -> nn.Module:
    keep = _keep(m.num_features, removed.get(0, set()))
    new = _base(m, _NORMS)(
        len(keep),
        eps=m.eps,
        momentum=m.momentum,
        affine=m.affine,
        track_running_stats=m.track_running_stats,
    )
    with torch.no_grad():
        for name in ("weight", "bias"):
            if getattr(m, name) is not None:
                setattr(new, name, _param(getattr(m, name).index_select(0, keep)))
        for name in ("running_mean", "running_var"):
            if getattr(m, name) is not None:
                setattr(new, name, getattr(m, name).index_select(0, keep).clone())
        if m.num_batches_tracked is not None:
            new.num_batches_tracked = m.num_batches_tracked.clone()
    return (
        new  # every tensor of ``new`` was replaced by a slice of ``m``'s: device and dtype follow
    )


def _rebuilt(module: nn.Module, removed: Mapping[int, set[int]], path: str) -> nn.Module:
    if isinstance(module, CONV_MODULES):
        return _conv(module, removed)
    if isinstance(module, nn.Linear):
        return _linear(module, removed)
    if isinstance(module, _NORMS):
        return _norm(module, removed)
    raise StateError(
        f"cannot remove channels of module {path!r} ({type(module).__name__}): "
        "expected a Conv, ConvTranspose, BatchNorm or Linear module"
    )


def prune_channels(model: nn.Module, state: Any) -> dict[str, dict[int, Tensor]]:
    """Replace every module touched by ``state``'s pruned channels (in place, on a copy of the
    user's model, its masks baked in) with a smaller one; constants that pruned channels carry
    past batch norms (``prune_batch_norms=False``) are folded into their consumers
    (``prune_constants``). Returns ``{param: {axis: kept indices}}``."""
    constants = consumer_constants(model, state) if carries_constants(state) else {}
    old_modules = {path: model.get_submodule(path) for path in constants}
    removed = removed_slices(state)
    by_module: dict[str, dict[int, set[int]]] = {}
    for name, axes in removed.items():
        path, _, attr = name.rpartition(".")
        # a module's weight axes say which of its channels go (a bias always goes with its
        # filter); a BatchNorm without affine parameters has only its running statistics
        module_axes = by_module.setdefault(path, {})
        if attr == "weight":
            for axis, drop in axes.items():
                module_axes.setdefault(axis, set()).update(drop)
        elif attr.startswith("running"):
            module_axes.setdefault(0, set()).update(axes.get(0, set()))
    kept: dict[str, dict[int, Tensor]] = {}
    for path, axes in by_module.items():
        module = model.get_submodule(path)
        shapes = {n: p.shape for n, p in module.named_parameters(recurse=False)}
        new = _rebuilt(module, axes, path)
        parent_path, _, attr = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, attr, new)
        for pname, shape in shapes.items():
            kept[f"{path}.{pname}" if path else pname] = {
                axis: _keep(shape[axis], drop)
                for axis, drop in removed.get(f"{path}.{pname}", {}).items()
            }
    fold_constants(model, old_modules, constants, kept)
    return kept


def slice_quantizer(quantizer: Any, kept: Mapping[int, Tensor]) -> Any:
    """A per-channel weight quantizer restricted to the kept channels of its axis."""
    axis = getattr(quantizer, "axis", None)
    if axis is None or axis not in kept:
        return quantizer
    changes = {
        f.name: getattr(quantizer, f.name).index_select(0, kept[axis])
        for f in dataclasses.fields(quantizer)
        if isinstance(getattr(quantizer, f.name), Tensor) and getattr(quantizer, f.name).dim() == 1
    }
    return dataclasses.replace(quantizer, **changes)
