"""ONNX export of a weight-compressed HuggingFace causal LM, with a KV cache, for ONNX Runtime.

``export_compressed(model, path)`` materializes (DESIGN.md idea 9) a copy of a model that
``compress_weights`` compressed: every ``CompressedLinear`` becomes an ``NBitsLinear`` calling the
export op ``purecomp::matmul_nbits`` (``onnx_ops.py``), translated to ONNX Runtime's contrib op
``com.microsoft::MatMulNBits``; every ``CompressedEmbedding`` becomes an ``NBitsEmbedding``
(``purecomp::gather_nbits``: Gather of the packed rows and dequantization with standard ops). The
integers are purecomp's own, only re-laid out (no re-quantization):

- 4-bit modes: ``packed_weight [N, K / 2]`` already holds two values per byte, low nibble first,
  signed values stored as ``v + 8``; it is ``MatMulNBits``' ``B`` reshaped to
  ``[N, K / block, block / 2]``. ``int4_sym`` stores no zero point: ONNX Runtime's default 8
  gives ``(v + 8 - 8) s``; ``int4_asym`` zero points are packed the same way.
- 8-bit modes: ``int8_sym`` values ``v`` are stored as ``uint8 v + 128`` (default zero point
  128); ``int8_asym`` values and zero points are stored as they are.
- ``MatMulNBits`` needs a power-of-two block of at least 16 columns: the block is the largest power
  of two (at most ``max_block_size``) dividing the group size, and each group's scale (and zero
  point) is repeated ``group / block`` times, which leaves every dequantized value unchanged
  (per-channel INT8 of a 576-wide layer: blocks of 64, nine equal scales per row).
- Scales go from purecomp's float16 to float32 (exact).

So ONNX Runtime dequantizes to exactly the weights ``W'`` the PyTorch model uses
(``tests/transforms/weight_compression/test_export_onnx.py`` checks it bit for bit through
``MatMulNBits`` with an identity input). At the default ``accuracy_level=0``, 8-bit linears are
written as ``purecomp::dequantize_nbits`` (the same integers, dequantized by ``Cast``, ``Sub``,
``Mul``, ``Reshape``) and a float ``MatMul``: ONNX Runtime's CPU provider has no float kernel for
8-bit ``MatMulNBits`` (measured: 200+ ms for SmolLM2's LM head, 8 ms as float), and folds those
ops into a float matrix when it loads the model. A tied embedding and LM head read one table.

``weight_format="dequantize_linear"`` instead writes each linear as opset-21 blocked
``DequantizeLinear`` over an int4 / uint4 / int8 / uint8 initializer ``[K, N]`` (transposed
integers) followed by ``MatMul``.

The graph follows the layout of onnxruntime-genai / optimum decoder models: inputs
``input_ids [batch_size, sequence_length]`` (int64), ``attention_mask [batch_size,
total_sequence_length]`` (int64), ``position_ids [batch_size, sequence_length]`` (int64),
``past_key_values.{i}.key`` / ``.value [batch_size, kv_heads, past_sequence_length, head_dim]``;
outputs ``logits [batch_size, sequence_length, vocab]`` and ``present.{i}.key`` / ``.value
[batch_size, kv_heads, total_sequence_length, head_dim]``. The first call passes past tensors with
``past_sequence_length = 0``. ``generate_greedy`` runs that loop.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import inspect
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import Tensor, nn

from purecomp.errors import ConfigError
from purecomp.export.onnx_export import ExportError, strip_metadata

from . import onnx_ops
from .fq_lora import refuse_unstripped
from .grid import mode_spec
from .modules import CompressedEmbedding, CompressedLinear
from .packing import pack_int4, unpack_int4
from .state import PackedWeight

log = logging.getLogger(__name__)

WEIGHT_FORMATS = ("matmul_nbits", "dequantize_linear")
FALLBACKS = ("error", "float")


@dataclasses.dataclass(frozen=True)
class NBitsWeight:
    """One weight ``[n, k]`` in ``MatMulNBits``' layout (``onnx_ops`` module docstring)."""

    b: Tensor
    scales: Tensor
    zero_points: Tensor | None
    k: int
    n: int
    bits: int
    block_size: int

    def dequantize(self) -> Tensor:
        return onnx_ops.nbits_to_float(self.b, self.scales, self.zero_points, self.k, self.bits, self.block_size)


def nbits_block_size(group_size: int, max_block_size: int = 128) -> int | None:
    """The largest power of two ``<= max_block_size`` dividing ``group_size``, or ``None`` when it is
    below 16 (``MatMulNBits`` takes power-of-two blocks of at least 16)."""
    block = 1
    while group_size % (block * 2) == 0 and block * 2 <= max_block_size:
        block *= 2
    return block if block >= 16 else None


def to_nbits(packed: PackedWeight, block_size: int) -> NBitsWeight:
    """``packed`` in ``MatMulNBits``' layout with blocks of ``block_size`` columns (a divisor of the
    group size; any divisor when the result is only an intermediate for ``dequantize_linear``)."""
    spec = mode_spec(packed.mode)
    if spec.codebook:
        raise ExportError(f"{packed.mode} weights index a codebook; MatMulNBits and DequantizeLinear are linear grids")
    n, k = packed.shape
    g = packed.group_size
    if g % block_size or (spec.bits == 4 and block_size % 2):
        raise ExportError(f"block size {block_size} does not divide the group size {g} in whole bytes")
    repeat = g // block_size
    if spec.bits == 4:
        b = packed.data.reshape(n, k // block_size, block_size // 2)
    else:
        data = packed.data
        if data.dtype == torch.int8:  # int8_sym: v + 128, the default zero point 128 takes it back
            data = (data.to(torch.int16) + 128).to(torch.uint8)
        b = data.reshape(n, k // block_size, block_size)
    scales = packed.scale.to(torch.float32).repeat_interleave(repeat, dim=1)
    zero_points = None
    if packed.zero_point is not None:
        if spec.bits == 4:
            z = unpack_int4(packed.zero_point, packed.n_groups).repeat_interleave(repeat, dim=1)
            zero_points = pack_int4(z)
        else:
            zero_points = packed.zero_point.repeat_interleave(repeat, dim=1)
    return NBitsWeight(b.contiguous(), scales.contiguous(), None if zero_points is None else zero_points.contiguous(),
                       k, n, spec.bits, block_size)


class NBitsLinear(nn.Module):
    """``x W^T + bias`` with ``W`` in ``MatMulNBits``' layout (export form of ``CompressedLinear``):
    ``purecomp::matmul_nbits`` (one ``MatMulNBits`` node), or with ``fold=True``
    ``purecomp::dequantize_nbits`` (standard ops over the integer initializers, which ONNX Runtime
    folds into a float matrix when it loads the model) followed by a float ``MatMul``. A weight
    compressed with AWQ stores ``W' = W_q diag(input_scale)``: the input is multiplied by
    ``input_scale`` first (``x W'^T = (x * input_scale) W_q^T``)."""

    def __init__(self, weight: NBitsWeight, bias: Tensor | None, accuracy_level: int = 0,
                 input_scale: Tensor | None = None, fold: bool = False) -> None:
        super().__init__()
        self.k, self.n, self.bits, self.block_size = weight.k, weight.n, weight.bits, weight.block_size
        self.accuracy_level = accuracy_level
        self.fold = fold
        self.register_buffer("b", weight.b)
        self.register_buffer("scales", weight.scales)
        self.register_buffer("zero_points", weight.zero_points)
        self.register_buffer("input_scale", None if input_scale is None else input_scale.to(torch.float32))
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(torch.float32), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.input_scale is not None:
            x = x * self.input_scale
        if self.fold:
            w = torch.ops.purecomp.dequantize_nbits(self.b, self.scales, self.zero_points, self.k, self.bits,
                                                    self.block_size)
            return nn.functional.linear(x, w, self.bias)
        return torch.ops.purecomp.matmul_nbits(x, self.b, self.scales, self.zero_points, self.bias, self.k, self.n,
                                               self.bits, self.block_size, self.accuracy_level)

    def extra_repr(self) -> str:
        return (f"K={self.k}, N={self.n}, bits={self.bits}, block_size={self.block_size}, "
                + ("float MatMul of the folded weight" if self.fold else f"accuracy_level={self.accuracy_level}"))


class NBitsEmbedding(nn.Module):
    """``W[ids]`` with ``W`` in ``MatMulNBits``' layout (export form of ``CompressedEmbedding``)."""

    def __init__(self, weight: NBitsWeight, input_scale: Tensor | None = None) -> None:
        super().__init__()
        self.k, self.bits, self.block_size = weight.k, weight.bits, weight.block_size
        self.register_buffer("b", weight.b)
        self.register_buffer("scales", weight.scales)
        self.register_buffer("zero_points", weight.zero_points)
        self.register_buffer("input_scale", None if input_scale is None else input_scale.to(torch.float32))

    def forward(self, ids: Tensor) -> Tensor:
        rows = torch.ops.purecomp.gather_nbits(ids, self.b, self.scales, self.zero_points, self.k, self.bits,
                                               self.block_size)
        return rows if self.input_scale is None else rows * self.input_scale

    def extra_repr(self) -> str:
        return f"{self.scales.shape[0]}, {self.k}, bits={self.bits}, block_size={self.block_size}"


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def materialize_nbits(model: nn.Module, *, weight_format: str = "matmul_nbits", accuracy_level: int = 0,
                      max_block_size: int = 128, fallback: str = "error") -> nn.Module:
    """A copy of ``model`` (``model`` is untouched) whose compressed modules are ``NBitsLinear`` /
    ``NBitsEmbedding`` computing the same ``W'``. Modules that shared packed buffers share the new
    ones. A weight ``MatMulNBits`` cannot hold (``nf4``; a group size without a power-of-two divisor
    of at least 16) raises ``ExportError`` naming it, or with ``fallback="float"`` is stored as
    its dequantized float weight in a plain ``nn.Linear`` / ``nn.Embedding``. With
    ``weight_format="dequantize_linear"`` a group without such a divisor is one block (the
    ``DequantizeLinear`` rewrite takes any block size; ONNX Runtime then runs it unfused)."""
    if weight_format not in WEIGHT_FORMATS:
        raise ConfigError("weight_format", f"expected one of {list(WEIGHT_FORMATS)}, got {weight_format!r}")
    refuse_unstripped(model, "ONNX export")
    if fallback not in FALLBACKS:
        raise ConfigError("fallback", f"expected one of {list(FALLBACKS)}, got {fallback!r}")
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise ConfigError("accuracy_level", f"expected 0 (unset), 1 (fp32), 2 (fp16), 3 (bf16) or 4 (int8), "
                          f"got {accuracy_level!r}")
    copied = copy.deepcopy(model)
    converted: dict[int, NBitsWeight | None] = {}
    replaced: dict[int, nn.Module] = {}
    refused = []
    for path, module in list(copied.named_modules(remove_duplicate=False)):
        if not isinstance(module, (CompressedLinear, CompressedEmbedding)):
            continue
        if module.weight_dtype != torch.float32:
            raise ExportError(f"{path}: the compressed weight replaces a {module.weight_dtype} weight; the ONNX export "
                              "writes float32 models (convert the model with .float() before compress_weights)")
        if id(module) not in replaced:
            packed = module.packed
            key = id(module.packed_weight)
            if key not in converted:
                block = nbits_block_size(packed.group_size, max_block_size)
                if block is None and weight_format == "dequantize_linear":
                    block = packed.group_size  # DequantizeLinear takes any block size
                codebook = mode_spec(packed.mode).codebook
                converted[key] = None if block is None or codebook else to_nbits(packed, block)
            weight = converted[key]
            if weight is None:
                refused.append(f"{path} ({packed.label})")
                if isinstance(module, CompressedLinear):
                    new: nn.Module = nn.Linear(packed.shape[1], packed.shape[0], bias=module.bias is not None)
                    if module.bias is not None:
                        new.bias = module.bias
                else:
                    new = nn.Embedding(*packed.shape, padding_idx=module.padding_idx)
                new.weight = nn.Parameter(module.weight.detach(), requires_grad=False)
            elif isinstance(module, CompressedLinear):
                # MatMulNBits with 8-bit weights has no float kernel in ONNX Runtime's CPU provider: below
                # accuracy level 4 the weight is dequantized by foldable standard ops instead
                fold = weight.bits == 8 and accuracy_level < 4 and weight_format == "matmul_nbits"
                new = NBitsLinear(weight, module.bias, accuracy_level, getattr(packed, "input_scale", None), fold)
            else:
                new = NBitsEmbedding(weight, getattr(packed, "input_scale", None))
            replaced[id(module)] = new
        _set_module(copied, path, replaced[id(module)])
    if refused and fallback == "error":
        raise ExportError(f"MatMulNBits cannot hold {len(refused)} weight(s): {refused[:5]} (nf4 indexes a codebook; "
                          "other modes need a group size with a power-of-two divisor >= 16); pass fallback='float' "
                          "to store them as float weights, or weight_format='dequantize_linear' for the integer modes")
    if refused:
        log.warning("stored %d weight(s) as float: %s", len(refused), refused)
    return copied.eval()


class CausalLMWithCache(nn.Module):
    """A HuggingFace causal LM with flat KV-cache tensors: ``forward(input_ids, attention_mask,
    position_ids, *past)`` with ``past = (key_0, value_0, key_1, value_1, ...)``, each
    ``[batch, kv_heads, past_len, head_dim]``; returns ``(logits, *present)``. Inside, the past
    tensors fill a ``transformers.DynamicCache``, so attention is the model's own code."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        config = getattr(model, "config", None)
        if config is None or not hasattr(config, "num_hidden_layers"):
            raise ConfigError("model", f"expected a HuggingFace causal LM (a model with .config.num_hidden_layers), "
                              f"got {type(model).__name__}")
        self.model = model
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        self.num_layers = int(text.num_hidden_layers)
        self.num_kv_heads = int(getattr(text, "num_key_value_heads", None) or text.num_attention_heads)
        self.head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads)
        self.vocab_size = int(text.vocab_size)
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, *past: Tensor) -> tuple[Tensor, ...]:
        from transformers import DynamicCache

        cache = DynamicCache([(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)],
                             config=self.model.config)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, **{self._cache_arg: cache})
        cache = getattr(out, self._cache_arg)
        present: list[Tensor] = []
        for layer in cache.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)

    def input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "position_ids"] + [
            f"past_key_values.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]

    def output_names(self) -> list[str]:
        return ["logits"] + [f"present.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]

    def example_inputs(self, batch: int = 2, sequence: int = 3, past: int = 4) -> tuple[Tensor, ...]:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, self.vocab_size, (batch, sequence), generator=g)
        mask = torch.ones(batch, past + sequence, dtype=torch.long)
        positions = torch.arange(past, past + sequence).expand(batch, sequence).contiguous()
        kv = [torch.randn(batch, self.num_kv_heads, past, self.head_dim, generator=g) * 0.1
              for _ in range(2 * self.num_layers)]
        return (ids, mask, positions, *kv)

    def dynamic_shapes(self) -> dict[str, Any]:
        batch = torch.export.Dim("batch_size")
        sequence = torch.export.Dim("sequence_length")
        past = torch.export.Dim("past_sequence_length")
        total = torch.export.Dim("total_sequence_length")
        return {"input_ids": {0: batch, 1: sequence}, "attention_mask": {0: batch, 1: total},
                "position_ids": {0: batch, 1: sequence},
                "past": tuple({0: batch, 2: past} for _ in range(2 * self.num_layers))}


# -- ONNX post-processing --

PACKED_MIN_ELEMENTS = 1024


def optimize_keeping_packed_weights(model: Any) -> None:
    """What ``torch.onnx.export(optimize=True)`` runs (onnxscript's constant folding and
    redundancy elimination, then its ONNX fusions) on the ``onnx_ir`` model, except that no node
    reading an integer initializer of at least ``PACKED_MIN_ELEMENTS`` elements is folded: the
    exporter would otherwise fold the dequantization of a small packed weight into a float
    initializer in the file (ONNX Runtime folds it when it loads the model instead)."""
    import onnx_ir as ir
    import onnxscript

    integer = {ir.DataType.UINT8, ir.DataType.INT8, ir.DataType.UINT4, ir.DataType.INT4}

    def should_fold(node: Any) -> bool | None:
        for value in node.inputs:
            const = None if value is None else value.const_value
            if const is not None and value.dtype in integer and const.size >= PACKED_MIN_ELEMENTS:
                return False
        return None  # the optimizer's own rule

    onnxscript.optimizer.optimize_ir(model, should_fold=should_fold)
    onnxscript.rewriter.onnx_fusions.fuse(model)


def _rename_inputs(graph: onnx.GraphProto, mapping: dict[str, str]) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in mapping:
                node.input[i] = mapping[name]


def deduplicate_initializers(proto: onnx.ModelProto) -> int:
    """Keep one copy of initializers with equal dtype, shape and bytes (a tied embedding and LM head
    read one table); returns how many were removed."""
    graph = proto.graph
    seen: dict[tuple[int, tuple[int, ...], str], str] = {}
    mapping: dict[str, str] = {}
    kept = []
    for init in graph.initializer:
        array = numpy_helper.to_array(init)
        key = (init.data_type, tuple(init.dims), hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest())
        if key in seen:
            mapping[init.name] = seen[key]
        else:
            seen[key] = init.name
            kept.append(init)
    if mapping:
        del graph.initializer[:]
        graph.initializer.extend(kept)
        _rename_inputs(graph, mapping)
    return len(mapping)


def _attribute(node: onnx.NodeProto, name: str, default: int | None = None) -> int:
    for a in node.attribute:
        if a.name == name:
            return int(a.i)
    if default is None:
        raise ExportError(f"{node.name}: MatMulNBits without attribute {name}")
    return default


def matmul_nbits_to_dequantize_linear(proto: onnx.ModelProto) -> int:
    """Rewrite every ``MatMulNBits`` node over initializers as opset-21 blocked ``DequantizeLinear``
    (int4 / uint4 / int8 / uint8 ``[K, N]``, scales and zero points ``[K / block, N]``, axis 0) ->
    ``MatMul`` [-> ``Add`` bias]. The integers are the same, transposed; returns the node count."""
    graph = proto.graph
    inits = {init.name: init for init in graph.initializer}
    new_nodes, new_inits, count = [], [], 0
    for node in graph.node:
        if node.op_type != "MatMulNBits" or node.domain != onnx_ops.MSFT_DOMAIN or node.input[1] not in inits:
            new_nodes.append(node)
            continue
        k, n = _attribute(node, "K"), _attribute(node, "N")
        bits, block = _attribute(node, "bits", 4), _attribute(node, "block_size")
        b = torch.from_numpy(numpy_helper.to_array(inits[node.input[1]]).copy())
        scales = numpy_helper.to_array(inits[node.input[2]])
        zp_name = node.input[3] if len(node.input) > 3 else ""
        bias_name = node.input[5] if len(node.input) > 5 else ""
        k_blocks = b.shape[1]
        q = onnx_ops._unpack_bits(b, bits).reshape(n, k_blocks * block)[:, :k].T.contiguous().numpy()  # [K, N]
        base = node.input[1]
        if zp_name:
            z = onnx_ops._unpack_bits(torch.from_numpy(numpy_helper.to_array(inits[zp_name]).copy()), bits)
            z = z[:, :k_blocks].T.contiguous().numpy()
            dtype = onnx.TensorProto.UINT4 if bits == 4 else onnx.TensorProto.UINT8
        else:  # symmetric: q - 2^(bits - 1) in a signed container, zero point 0
            q = (q.astype(np.int16) - 2 ** (bits - 1)).astype(np.int8)
            z = None
            dtype = onnx.TensorProto.INT4 if bits == 4 else onnx.TensorProto.INT8
        q_init = onnx.helper.make_tensor(f"{base}_dq_q", dtype, [k, n], q.flatten().tolist()) if bits == 4 else \
            numpy_helper.from_array(q, f"{base}_dq_q")
        s_init = numpy_helper.from_array(np.ascontiguousarray(scales.T), f"{base}_dq_scales")
        dq_inputs = [q_init.name, s_init.name]
        new_inits += [q_init, s_init]
        if z is not None:
            z_init = onnx.helper.make_tensor(f"{base}_dq_zero_points", dtype, list(z.shape), z.flatten().tolist()) \
                if bits == 4 else numpy_helper.from_array(z, f"{base}_dq_zero_points")
            dq_inputs.append(z_init.name)
            new_inits.append(z_init)
        w = f"{node.output[0]}_dq_weight"
        new_nodes.append(onnx.helper.make_node("DequantizeLinear", dq_inputs, [w], axis=0, block_size=block,
                                               name=f"{node.name}_dq"))
        if bias_name:
            mm = f"{node.output[0]}_matmul"
            new_nodes.append(onnx.helper.make_node("MatMul", [node.input[0], w], [mm], name=f"{node.name}_matmul"))
            new_nodes.append(onnx.helper.make_node("Add", [mm, bias_name], [node.output[0]], name=f"{node.name}_bias"))
        else:
            new_nodes.append(onnx.helper.make_node("MatMul", [node.input[0], w], [node.output[0]],
                                                   name=f"{node.name}_matmul"))
        count += 1
    if count:
        del graph.node[:]
        graph.node.extend(new_nodes)
        used = {name for node in graph.node for name in node.input}
        kept = [init for init in graph.initializer if init.name in used]
        del graph.initializer[:]
        graph.initializer.extend(kept + new_inits)
    return count


def export_compressed(
    model: nn.Module,
    path: str | Path,
    *,
    weight_format: str = "matmul_nbits",
    accuracy_level: int = 0,
    max_block_size: int = 128,
    fallback: str = "error",
    opset: int = 21,
) -> Path:
    """Write a (weight-compressed or float) HuggingFace causal LM to ``path`` as ONNX with a KV
    cache (module docstring for the inputs, outputs and weight layout) and check it with
    ``onnx.checker``. ``model`` is not modified. Returns ``path``.

    ``weight_format``: ``matmul_nbits`` (default: ``com.microsoft::MatMulNBits``, what ONNX Runtime
    runs fastest) or ``dequantize_linear`` (standard opset-21 blocked ``DequantizeLinear`` +
    ``MatMul``, for runtimes without ONNX Runtime's contrib ops).

    ``accuracy_level`` (``MatMulNBits``' attribute): 0 (default) keeps PyTorch's arithmetic: 4-bit
    weights run in ``MatMulNBits``' float kernel, and 8-bit weights, for which ONNX Runtime's CPU
    provider has no float ``MatMulNBits`` kernel, are stored as integers behind standard
    dequantization ops that ONNX Runtime folds into a float matrix when it loads the model (the file
    stays small; memory and speed of those layers are float's). ONNX Runtime then computes with
    exactly PyTorch's weights ``W'``. 4: ``MatMulNBits`` for every compressed linear and ONNX
    Runtime quantizes each block of activations to int8 before its integer kernels: the fastest,
    but not PyTorch's arithmetic (greedy tokens drift; docs/weight_compression.md, Export).

    ``max_block_size``: the largest ``MatMulNBits`` block (a power of two dividing each group).
    ``fallback``: what to do with a weight ``MatMulNBits`` cannot hold (``materialize_nbits``).
    Float ``nn.Linear`` / ``nn.Embedding`` modules (ignored layers, an uncompressed model) are
    exported as float initializers."""
    if opset < 21:
        raise ConfigError("opset", f"expected >= 21 (int4 types, blocked DequantizeLinear), got {opset}")
    started = time.perf_counter()
    module = materialize_nbits(model, weight_format=weight_format, accuracy_level=accuracy_level,
                               max_block_size=max_block_size, fallback=fallback)
    wrapper = CausalLMWithCache(module).eval()
    args = wrapper.example_inputs()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with torch.no_grad():
            program = torch.onnx.export(
                wrapper, args, dynamo=True, opset_version=opset, dynamic_shapes=wrapper.dynamic_shapes(),
                input_names=wrapper.input_names(), output_names=wrapper.output_names(),
                custom_translation_table=onnx_ops.translation_table(), optimize=False, verbose=False)
            optimize_keeping_packed_weights(program.model)
    except Exception as exc:
        raise ExportError(f"torch.onnx.export failed for the materialized {type(model).__name__}: "
                          f"{type(exc).__name__}: {exc}") from exc
    proto = program.model_proto
    strip_metadata(proto)
    removed = deduplicate_initializers(proto)
    if weight_format == "dequantize_linear":
        rewritten = matmul_nbits_to_dequantize_linear(proto)
        log.info("rewrote %d MatMulNBits nodes as DequantizeLinear + MatMul", rewritten)
    large = proto.ByteSize() > 2**31 - 2**24 if _serializable(proto) else True
    onnx.save(proto, str(path), save_as_external_data=large, location=f"{path.name}.data" if large else None)
    onnx.checker.check_model(str(path), full_check=False)
    log.info("exported %s (%.1f MiB, %d shared initializers merged) in %.1f s", path, _file_bytes(path) / 2**20,
             removed, time.perf_counter() - started)
    return path


def _serializable(proto: onnx.ModelProto) -> bool:
    try:
        proto.ByteSize()
        return True
    except Exception:  # protobuf refuses messages over 2 GiB
        return False


def _file_bytes(path: Path) -> int:
    """The ONNX file plus its external data file, if any."""
    data = path.with_name(f"{path.name}.data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def file_bytes(path: str | Path) -> int:
    """Bytes on disk of an exported model (the ``.onnx`` file and its external data, if any)."""
    return _file_bytes(Path(path))


# -- running the exported model --

def session(path: str | Path, threads: int | None = None, **options: Any) -> Any:
    """An ``onnxruntime.InferenceSession`` on the CPU with ``threads`` intra-op threads (default:
    onnxruntime's choice); ``options`` are set on ``SessionOptions`` (e.g. ``graph_optimization_level``)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads is not None:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    for key, value in options.items():
        setattr(so, key, value)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _cache_spec(sess: Any) -> tuple[list[str], int, int]:
    names = [i.name for i in sess.get_inputs() if i.name.startswith("past_key_values.")]
    shape = next(i.shape for i in sess.get_inputs() if i.name.startswith("past_key_values."))
    return names, int(shape[1]), int(shape[3])


def prompt_feeds(sess: Any, input_ids: np.ndarray) -> dict[str, np.ndarray]:
    """The inputs of a first call on unpadded ``input_ids [batch, length]`` (int64): every position
    attended, positions ``0..length-1``, and empty ``past`` tensors (``past_sequence_length = 0``)."""
    past_names, kv_heads, head_dim = _cache_spec(sess)
    batch, length = input_ids.shape
    feeds = {name: np.zeros((batch, kv_heads, 0, head_dim), np.float32) for name in past_names}
    feeds["input_ids"] = input_ids
    feeds["attention_mask"] = np.ones((batch, length), np.int64)
    feeds["position_ids"] = np.arange(length, dtype=np.int64)[None].repeat(batch, 0)
    return feeds


def generate_greedy(sess: Any, input_ids: np.ndarray | Tensor, max_new_tokens: int,
                    eos_token_id: int | Sequence[int] | None = None, step_times: list[float] | None = None) -> np.ndarray:
    """Greedy decoding with an exported model: one call on the prompt (empty past), then one call
    per new token with the returned ``present`` tensors as ``past``. ``input_ids [batch, length]``
    (no padding). Returns the new tokens ``[batch, <= max_new_tokens]``; stops early when every
    sequence has produced ``eos_token_id``. ``step_times`` (if given) receives the wall time of
    every ``run`` call, the prompt's first."""
    if isinstance(input_ids, Tensor):
        input_ids = input_ids.cpu().numpy()
    ids = np.asarray(input_ids, dtype=np.int64)
    if ids.ndim != 2:
        raise ConfigError("input_ids", f"expected [batch, length], got shape {ids.shape}")
    past_names, _, _ = _cache_spec(sess)
    batch, length = ids.shape
    eos = set() if eos_token_id is None else {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
    feeds = prompt_feeds(sess, ids)
    output_names = [o.name for o in sess.get_outputs()]
    present_names = [name.replace("past_key_values.", "present.") for name in past_names]
    total = length
    new: list[np.ndarray] = []
    done = np.zeros(batch, dtype=bool)
    for _ in range(max_new_tokens):
        start = time.perf_counter()
        outputs = dict(zip(output_names, sess.run(None, feeds)))
        if step_times is not None:
            step_times.append(time.perf_counter() - start)
        nxt = outputs["logits"][:, -1].argmax(-1).astype(np.int64)
        new.append(nxt)
        done |= np.isin(nxt, list(eos))
        if done.all():
            break
        for past, present in zip(past_names, present_names):
            feeds[past] = outputs[present]
        feeds["input_ids"] = nxt[:, None]
        feeds["position_ids"] = np.full((batch, 1), total, dtype=np.int64)
        total += 1
        feeds["attention_mask"] = np.ones((batch, total), np.int64)
    return np.stack(new, axis=1) if new else np.zeros((batch, 0), np.int64)
