"""Op-kind tables: which recorded op kinds (``OpNode.op``) play which role.

The one place these sets live; placement, pruning, sparsity, binarization and the exporter
import them from here. Op kinds are the names the recorder gives (``conv2d``, ``linear``,
``add``, ``batch_norm``...), not module classes.
"""

from __future__ import annotations

# ---------------------------------------------------------------- ops that read a weight

# convolutions; their weight's output channels are axis 0
CONV_OPS = frozenset({"conv1d", "conv2d", "conv3d"})
# transposed convolutions; their weight's output channels are axis 1
CONV_TRANSPOSE_OPS = frozenset({"conv_transpose1d", "conv_transpose2d", "conv_transpose3d"})
# fully connected layers (``F.linear``)
LINEAR_OPS = frozenset({"linear"})
# products of two tensors, either of which may be a parameter
MATMUL_OPS = frozenset({"matmul", "bmm", "mm", "addmm", "baddbmm"})
# table lookups: they return rows of their (quantized) table, so no activation quantizer follows them
EMBEDDING_OPS = frozenset({"embedding"})
# every op whose weight parameter is quantized / sparsified
WEIGHTED_OPS = CONV_OPS | CONV_TRANSPOSE_OPS | LINEAR_OPS | MATMUL_OPS | EMBEDDING_OPS

# ---------------------------------------------------------------- quantization placement

# normalizations whose input is quantized unless a norm-fusing producer feeds them
NORM_OPS = frozenset({"batch_norm", "layer_norm"})
# a norm directly after one of these is folded into it by runtimes: its input is not quantized
NORM_FUSING_PRODUCERS = CONV_OPS | CONV_TRANSPOSE_OPS | LINEAR_OPS
# conv / linear calls an eval-mode BatchNorm right after them is folded into at export
BN_FOLDABLE_OPS = CONV_OPS | LINEAR_OPS
# ops whose (activation) inputs are quantized: integer kernels exist for them
QUANTIZABLE_OPS = WEIGHTED_OPS | NORM_OPS | frozenset(
    {"add", "mul", "cat", "avg_pool1d", "avg_pool2d", "avg_pool3d",
     "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "mean"}
)
# elementwise ops quantized only where they join two activations (a residual add)
ELEMENTWISE_OPS = frozenset({"add", "mul"})
# quantization-agnostic ops: a quantizer on their output moves upstream to their input
AGNOSTIC_OPS = frozenset(
    {"reshape", "view", "flatten", "permute", "transpose", "t", "contiguous", "squeeze", "unsqueeze",
     "max_pool1d", "max_pool2d", "max_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d",
     "adaptive_max_pool3d", "dropout", "dropout1d", "dropout2d", "dropout3d", "pad", "expand",
     "clone", "identity", "getitem", "chunk", "split"}
)
# shape-only ops: repeating a quantize-dequantize after one changes no value (export re-quantizes there)
SHAPE_OPS = frozenset(
    {"reshape", "view", "flatten", "permute", "transpose", "t", "squeeze", "unsqueeze", "contiguous", "dropout"}
)
# ops that keep every element in place (eval-mode dropout, clone...): a reader sees the tensor itself
CHANNEL_PRESERVING_OPS = frozenset({"dropout", "clone", "identity", "contiguous"})
# elementwise activations acting on each channel alone: permuting channels commutes with them
CHANNELWISE_OPS = frozenset({"gelu", "relu", "silu", "tanh", "sigmoid", "hardswish", "leaky_relu", "elu"})

# ---------------------------------------------------------------- filter pruning

# ops that map a zero channel to a zero channel and keep the channel axis (activations, pools, pads)
ZERO_PRESERVING_OPS = frozenset(
    {
        "relu", "relu6", "hardtanh", "hardswish", "silu", "gelu", "tanh", "leaky_relu", "elu", "selu",
        "celu", "mish", "neg",
        "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
        "identity", "contiguous", "clone",
        "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
        "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
        "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d",
        "pad", "interpolate", "upsample", "upsample_nearest", "upsample_bilinear",
    }
)
# unary ops that keep the channel axis but turn a zero channel into a nonzero one (sigmoid(0) = 0.5)
NONZERO_UNARY_OPS = frozenset({"sigmoid", "hardsigmoid", "exp", "softplus", "cos", "log_sigmoid"})
# zero-preserving ops that may change the spatial size (pools, pads, resizes), never the channels
SPATIAL_OPS = frozenset(
    op for op in ZERO_PRESERVING_OPS if "pool" in op or op in ("pad", "interpolate") or op.startswith("upsample")
)
# binary arithmetic that unites channel-aligned operands position-wise
BINARY_OPS = frozenset({"add", "sub", "mul", "div"})
# reshapes a channel may survive as a block of features (``flatten`` to ``(N, C*H*W)``)
RESHAPE_OPS = frozenset({"flatten", "view", "reshape"})
