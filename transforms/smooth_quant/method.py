"""SmoothQuant: move the quantization difficulty of a linear's input into its weights.

For a linear ``y = x W^T`` (``W``: ``out x in``) whose input has outlier channels, per input
channel ``j`` (Xiao et al., 2023):

    s_j = max|x_j|^alpha / max_i |W_ij|^(1 - alpha)
    x' = x / s   (the site transform at the linear's input)
    W' = W diag(s)   (the weight transform: column j times s_j)

so ``x' W'^T = x W^T`` exactly in real arithmetic, while ``x'`` has flatter channel ranges
(easier per-tensor activation quantization) and ``W'`` absorbs them (per-output-channel weight
quantization copes). ``max|x_j|`` comes from calibration. Each linear gets its own ``s`` at its
own input (key ``<site>:in0``), so a tensor read by several linears and by a residual add keeps
its value for the add. Chain it before ``quantization(quantize_at_inputs_of=("linear",))`` so the
activation quantizer sits after ``x / s`` and its range init sees the smoothed input.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from purecomp.compression import Compression, Progress
from purecomp.errors import ConfigError
from purecomp.export.rules import ExportRule
from purecomp.init_context import InitContext
from purecomp.scopes import select_sites
from purecomp.struct import static_field, struct

SMOOTHED_OPS = ("linear",)
SCALE_LIMITS = (1e-5, 1e5)


@struct
class InputSmoothing:
    """``x * inverse`` along the last axis (``inverse = 1 / s``; a multiplication, as the exported ``Mul``)."""

    inverse: Tensor

    def __call__(self, x: Tensor) -> Tensor:
        return x * self.inverse.to(x.dtype)


@struct
class SmoothQuantState:
    """Per smoothed linear: the input transform by site key and ``s`` by weight name."""

    inputs: dict[str, InputSmoothing]
    scales: dict[str, Tensor]
    alpha: float = static_field(default=0.95)

    # -- the extension protocol (purecomp.protocol) --
    def statistics(self, graph: Any = None) -> dict[str, list[dict[str, Any]]]:
        """The ``smooth_quant`` table: per linear weight, alpha and the range of ``s``."""
        rows = [{"weight": name, "alpha": self.alpha, "min s": float(s.min()), "max s": float(s.max())}
                for name, s in self.scales.items()]
        return {"smooth_quant": rows}

    def export_rule(self) -> ExportRule:
        from .export_rule import SmoothQuantExport

        return SmoothQuantExport(self)


def smoothing_scales(act_max: Tensor, weight: Tensor, alpha: float) -> Tensor:
    """``s_j = max|x_j|^alpha / max_i |W_ij|^(1 - alpha)``, clipped to ``SCALE_LIMITS``; channels
    never active (``max|x_j| = 0``) or without weight keep ``s_j = 1``."""
    w_max = weight.detach().abs().amax(dim=0).double()
    a_max = act_max.double().to(w_max.device)
    s = a_max.pow(alpha) / w_max.pow(1 - alpha)
    s = torch.where((a_max > 0) & (w_max > 0) & torch.isfinite(s), s, torch.ones_like(s))
    return s.clamp(*SCALE_LIMITS).to(weight.dtype)


def smooth_quant(
    alpha: float = 0.95,
    *,
    ignored_scopes: Sequence[str] = (),
    target_scopes: Sequence[str] | None = None,
    num_samples: int = 300,
) -> Compression:
    """SmoothQuant on every selected linear that reads an activation (module docstring).

    ``alpha`` in ``[0, 1]``: the share of the outlier range moved into the weights (0.5 in the
    paper's default; NNCF uses 0.95 for transformers' matmuls). ``num_samples`` calibration
    samples measure ``max|x_j|``. A method with no trainable state: QAT after it trains the
    weights through ``W diag(s)``."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ConfigError("smooth_quant.alpha", f"expected a number in [0, 1], got {alpha!r}")
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ConfigError("smooth_quant.num_samples", f"expected a positive number of samples, got {num_samples!r}")

    def init(context: InitContext) -> SmoothQuantState:
        graph = context.graph
        allowed = select_sites(graph, ignored_scopes, target_scopes, "smooth_quant.", context.scope)
        linears = {}
        for node in graph:
            if (node.site in allowed and node.op in SMOOTHED_OPS and len(node.inputs) > 1
                    and node.inputs[0].kind in ("node", "input") and node.input_info[0].is_float
                    and node.inputs[1].kind == "param"):
                linears[f"{node.site}:in0"] = node.inputs[1].name
        if not linears:
            return SmoothQuantState({}, {}, float(alpha))
        act_max: dict[str, Tensor] = {}

        def record(key: str, x: Tensor) -> None:
            m = x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0)
            act_max[key] = torch.maximum(act_max[key], m) if key in act_max else m

        context.calibrate(list(linears), record, num_samples, "SmoothQuant statistics")
        inputs, scales = {}, {}
        for key, weight_name in linears.items():
            if key not in act_max:
                continue  # a site the calibration data never reached
            s = smoothing_scales(act_max[key], context.params[weight_name], float(alpha))
            if weight_name in scales and not torch.equal(scales[weight_name], s):
                raise ConfigError("smooth_quant", f"weight {weight_name!r} is read by linears with different inputs; "
                                  "SmoothQuant needs one input per weight (ignore the other call sites)")
            inputs[key] = InputSmoothing((1 / s).to(s.dtype))
            scales[weight_name] = s
        return SmoothQuantState(inputs, scales, float(alpha))

    def params_fn(params: Mapping[str, Tensor], state: SmoothQuantState) -> dict[str, Tensor]:
        out = dict(params)
        for name, s in state.scales.items():
            out[name] = out[name] * s.to(out[name].dtype)
        return out

    def sites(state: SmoothQuantState) -> dict[str, Any]:
        return dict(state.inputs)

    def step(state: SmoothQuantState, progress: Progress, params: Any = None) -> SmoothQuantState:
        return state

    return Compression(init, params_fn, sites, lambda params, state: torch.zeros(()), step, name="smooth_quant")
