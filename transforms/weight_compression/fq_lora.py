"""INT4 weight QAT with LoRA adapters (NNCF's ``compression_format="fq_lora"``).

A ``LoRAQuantizedLinear`` keeps the compressed layer's integers ``k`` and scales ``s0`` frozen
(``W0 = s0 (k - z)``, the best PTQ result: AWQ, scale estimation and GPTQ included), and trains a
group scale ``s = s0 exp(t)`` through its log factor ``t`` (from 0: an optimizer step then changes
the scale by a relative amount, whatever its size; a step of ``lr`` on ``s`` itself would move
LLM group scales of ~1e-3 by more than themselves) and low-rank adapters ``A [r, in]``,
``B [out, r]`` (``B`` from zero). Its weight is the fake-quantized sum, per group of ``g`` input columns:

    W = s (clip(round((W0 + B A) / s + z), qmin, qmax) - z)        (times AWQ's input scale, if any)

with ``round`` passed straight through in the backward (gradients reach ``t``, ``A`` and ``B``;
outside ``[qmin, qmax]`` only ``t``). At the start ``B A = 0`` and ``s = s0``, so the model is exactly
the PTQ model. ``to_compressed()`` (``strip`` of such a model) folds the adapters:
``k' = clip(round((W0 + B A) / s16 + z), qmin, qmax)`` with ``s16`` the trained scale in the stored
float16 (the forward uses ``s16`` too, its rounding passed straight through), and returns an
ordinary ``CompressedLinear``: the QAT model's weights, that export like any ``compress_weights``
model.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from purecomp.errors import ConfigError, StateError

from .grid import dequantize, mode_spec, quantize_with
from .modules import CompressedLinear
from .state import SCALE_DTYPE, PackedWeight

log = logging.getLogger(__name__)
FORMATS = ("dq", "fq_lora")
TRAINABLE = ("log_scale_factor", "lora_A", "lora_B")


def check_format(compression_format: str, mode: str) -> str:
    """``dq`` (the default: packed integers) or ``fq_lora``, which needs an integer 4-bit mode."""
    name = getattr(compression_format, "value", compression_format)
    if name not in FORMATS:
        raise ConfigError("compression_format", f"expected one of {list(FORMATS)}, got {compression_format!r} "
                          "(NNCF's fq and fq_lora_nls are not built)")
    if name == "fq_lora" and (mode_spec(mode).bits != 4 or mode_spec(mode).codebook):
        raise ConfigError("compression_format", f"fq_lora trains 4-bit integer weights; expected mode int4_sym or "
                          f"int4_asym, got {mode!r}")
    return name


def fake_quantize_groups(weight: Tensor, scale: Tensor, zero_point: Tensor | None, qmin: int, qmax: int) -> Tensor:
    """``s (clip(round(w / s + z), qmin, qmax) - z)`` per group (``scale [out, groups]``), round
    passed straight through: differentiable in ``weight`` and ``scale``."""
    out, in_features = weight.shape
    groups = scale.shape[1]
    w = weight.reshape(out, groups, in_features // groups)
    s = scale.unsqueeze(-1)
    z = 0.0 if zero_point is None else zero_point.to(w.dtype).unsqueeze(-1)
    x = w / s + z
    x = x + (torch.round(x) - x).detach()
    return (s * (torch.clamp(x, qmin, qmax) - z)).reshape(out, in_features)


class LoRAQuantizedLinear(nn.Module):
    """A linear with frozen INT4 integers, a trainable group ``scale`` and LoRA adapters ``lora_A``,
    ``lora_B`` (module docstring)."""

    def __init__(self, compressed: CompressedLinear, rank: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        packed = compressed.packed
        out, in_features = packed.shape
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ConfigError("advanced_parameters.lora_adapter_rank", f"expected a positive integer, got {rank!r}")
        self.mode, self.group_size, self.weight_shape = packed.mode, packed.group_size, packed.shape
        self.weight_dtype = compressed.weight_dtype
        q = packed.unpack()
        self.register_buffer("base_weight", dequantize(q.values, q.scale, q.zero_point, packed.mode))  # W0, frozen
        self.register_buffer("zero_point", None if q.zero_point is None else q.zero_point.to(torch.float32))
        self.register_buffer("input_scale", packed.input_scale)
        self.register_buffer("base_scale", q.scale.to(torch.float32).clone())  # s0, as stored (float16 values)
        self.log_scale_factor = nn.Parameter(torch.zeros_like(self.base_scale))  # t: s = s0 exp(t)
        # LoRA's usual start: A uniform in +-1/sqrt(in) (kaiming with a = sqrt(5)), B = 0, so B A = 0
        bound = 1 / math.sqrt(in_features)
        device = packed.data.device
        a = torch.empty(rank, in_features).uniform_(-bound, bound, generator=generator)  # CPU generator
        self.lora_A = nn.Parameter(a.to(device))
        self.lora_B = nn.Parameter(torch.zeros(out, rank, device=device))
        self.bias = None if compressed.bias is None else nn.Parameter(compressed.bias.detach().clone(),
                                                                       requires_grad=False)

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    @property
    def scale(self) -> Tensor:
        """``s = s0 exp(t)`` (float32, differentiable in ``t``)."""
        return self.base_scale * self.log_scale_factor.exp()

    def weight(self) -> Tensor:
        """``W`` of the module docstring (float32)."""
        spec = mode_spec(self.mode)
        # the scale as it will be stored (float16), its rounding passed straight through
        scale = self.scale
        scale = scale + (scale.to(SCALE_DTYPE).to(scale.dtype) - scale).detach()
        w = fake_quantize_groups(self.base_weight + self.lora_B @ self.lora_A, scale, self.zero_point,
                                 spec.qmin, spec.qmax)
        return w if self.input_scale is None else w * self.input_scale

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def folded(self) -> PackedWeight:
        """The adapters folded into the weight and re-quantized with the trained scale in float16."""
        with torch.no_grad():
            scale = self.scale.detach().to(SCALE_DTYPE).to(torch.float32)
            merged = self.base_weight + self.lora_B.detach() @ self.lora_A.detach()
            zero_point = None if self.zero_point is None else self.zero_point.to(torch.uint8)
            q = quantize_with(merged, self.mode, self.group_size, scale, zero_point)
            return PackedWeight.pack(q, self.mode, input_scale=self.input_scale)

    def to_compressed(self) -> CompressedLinear:
        """An ordinary ``CompressedLinear`` holding ``folded()`` and the bias (``strip``)."""
        return CompressedLinear(self.folded(), None if self.bias is None else self.bias.detach().clone(),
                                self.weight_dtype)

    def extra_repr(self) -> str:
        return (f"{self.weight_shape[1]}, {self.weight_shape[0]}, mode={self.mode}, group_size={self.group_size}, "
                f"rank={self.rank}")


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def add_lora_adapters(model: nn.Module, rank: int, mode: str, seed: int = 0) -> list[str]:
    """Replace every ``CompressedLinear`` of ``model`` in the 4-bit ``mode`` by a
    ``LoRAQuantizedLinear`` of ``rank`` (at most the layer's smaller dimension), freeze every other
    parameter, and return the replaced module names. The adapters and scales are the only trainable
    parameters afterwards."""
    generator = torch.Generator().manual_seed(seed)
    replaced, capped = [], []
    for name, module in list(model.named_modules()):
        if isinstance(module, CompressedLinear) and module.mode == mode:
            r = min(rank, *module.packed.shape)
            if r < rank:
                capped.append(name)
            _set(model, name, LoRAQuantizedLinear(module, r, generator))
            replaced.append(name)
    for name, p in model.named_parameters():
        p.requires_grad_(name.rpartition(".")[2] in TRAINABLE
                         and isinstance(model.get_submodule(name.rpartition(".")[0]), LoRAQuantizedLinear))
    if capped:
        log.warning("lora_adapter_rank %d exceeds a dimension of %d layers (e.g. %s): their rank is that dimension",
                    rank, len(capped), capped[0])
    return replaced


def strip_lora(model: nn.Module) -> nn.Module:
    """Fold every ``LoRAQuantizedLinear`` of ``model`` into a ``CompressedLinear`` (in place);
    returns ``model``."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRAQuantizedLinear):
            _set(model, name, module.to_compressed())
    return model


def refuse_unstripped(model: nn.Module, what: str) -> None:
    """``StateError`` when ``model`` still holds ``LoRAQuantizedLinear`` layers: ``what`` (saving,
    export) needs the folded, packed form."""
    found = [name for name, m in model.named_modules() if isinstance(m, LoRAQuantizedLinear)]
    if found:
        raise StateError(f"{what} needs packed weights, but {len(found)} layers (e.g. {found[0]!r}) still train "
                         "LoRA adapters; expected purecomp.strip(model) first, which folds them into INT4")


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters of the ``LoRAQuantizedLinear`` modules: log scale factors and adapters."""
    return [getattr(m, name) for m in model.modules() if isinstance(m, LoRAQuantizedLinear) for name in TRAINABLE]
