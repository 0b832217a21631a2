"""UNet and ICNet, built here (no download), for the semantic segmentation sample.

UNet (Ronneberger et al., 2015): an encoder of ``depth`` double 3x3 conv blocks with 2x2 max
pooling, a decoder of 2x2 transposed convs whose outputs are concatenated with the encoder's
feature map of the same size, and a 1x1 classifier. Convs are padded and batch-normalized
(the usual variant), so the output has the input's size; H and W must be divisible by
``2 ** (depth - 1)``.

ICNet (Zhao et al., 2018, "ICNet for Real-time Semantic Segmentation on High-resolution Images"):
three branches on the full, 1/2 and 1/4 resolution inputs, fused by cascade feature fusion.

- medium branch: the 1/2 image through the first stages of a dilated ResNet (stem, stage 1,
  stage 2) to 1/16 of the full resolution ("conv3_1");
- low branch: conv3_1 downsampled by 2 (the 1/4 resolution input after the shared layers),
  then dilated stages 3 and 4 (dilation 2, 4) and a pyramid pooling module summing average
  pools over 1, 2, 3 and 6 bins, to 1/32;
- high branch: three stride-2 3x3 convs on the full image, to 1/8;
- cascade feature fusion CFF(F1, F2): F1 upsampled x2, a 3x3 conv with dilation 2 and BN;
  F2 through a 1x1 conv and BN; their sum through ReLU. The upsampled F1 also feeds a 1x1
  auxiliary classifier (cascade label guidance);
- the classifier on the 1/8 fused map, upsampled to the input size.

In training ``forward`` returns ``(logits, aux_1/8, aux_1/16)`` for the guided loss
``L = L(logits) + 0.4 L(aux_1/8) + 0.4 L(aux_1/16)``; in eval it returns ``logits``. The channel
widths scale with ``width`` (32 gives the paper's 32/64 high branch and 128-channel fusion;
the backbone is a BasicBlock ResNet rather than the paper's ResNet-50). H and W must be
divisible by 32.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

MODELS = ("unet", "icnet")
AUX_WEIGHT = 0.4


def conv_bn_relu(cin: int, cout: int, kernel: int = 3, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    """Conv (padding keeps the size at stride 1) -> BatchNorm -> ReLU."""
    pad = dilation * (kernel // 2)
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, pad, dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _require_divisible(x: Tensor, factor: int, model: str) -> None:
    h, w = x.shape[-2:]
    if h % factor or w % factor:
        raise ValueError(f"{model} needs an input whose height and width are divisible by {factor}; got {h}x{w}")


# ---------------------------------------------------------------------------------- UNet


class UNet(nn.Module):
    """UNet with ``depth`` levels, ``width`` channels at the first (64 in the paper), doubling per level."""

    def __init__(self, num_classes: int, in_channels: int = 3, depth: int = 5, width: int = 64) -> None:
        super().__init__()
        if depth < 2:
            raise ValueError(f"UNet depth must be >= 2, got {depth}")
        widths = [width * 2**i for i in range(depth)]
        self.depth = depth
        self.down = nn.ModuleList()
        cin = in_channels
        for w in widths:
            self.down.append(nn.Sequential(conv_bn_relu(cin, w), conv_bn_relu(w, w)))
            cin = w
        self.up = nn.ModuleList()
        self.up_conv = nn.ModuleList()
        for w in reversed(widths[:-1]):
            self.up.append(nn.ConvTranspose2d(cin, w, 2, stride=2))
            self.up_conv.append(nn.Sequential(conv_bn_relu(2 * w, w), conv_bn_relu(w, w)))
            cin = w
        self.classifier = nn.Conv2d(cin, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        _require_divisible(x, 2 ** (self.depth - 1), "UNet")
        skips = []
        for i, block in enumerate(self.down):
            x = block(x)
            if i < self.depth - 1:
                skips.append(x)
                x = F.max_pool2d(x, 2)
        for up, block, skip in zip(self.up, self.up_conv, reversed(skips)):
            x = block(torch.cat([up(x), skip], dim=1))
        return self.classifier(x)


# ---------------------------------------------------------------------------------- ICNet


class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convs) with an optional stride / dilation and a 1x1 projection."""

    def __init__(self, cin: int, cout: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.project = None
        if stride != 1 or cin != cout:
            self.project = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.project is None else self.project(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + identity)


class PyramidPooling(nn.Module):
    """PSPNet's pyramid pooling as ICNet uses it: x + sum over bins b of upsample(avgpool_b(x))."""

    def __init__(self, bins: tuple[int, ...] = (1, 2, 3, 6)) -> None:
        super().__init__()
        self.bins = bins

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        out = x
        for b in self.bins:
            pooled = F.adaptive_avg_pool2d(x, (min(b, size[0]), min(b, size[1])))
            out = out + F.interpolate(pooled, size=size, mode="bilinear", align_corners=False)
        return out


class CascadeFeatureFusion(nn.Module):
    """CFF: ReLU(BN(dilated 3x3 conv(up2(F1))) + BN(1x1 conv(F2))); also the auxiliary logits of up2(F1)."""

    def __init__(self, low_channels: int, high_channels: int, out_channels: int, num_classes: int) -> None:
        super().__init__()
        self.low = nn.Sequential(nn.Conv2d(low_channels, out_channels, 3, padding=2, dilation=2, bias=False),
                                 nn.BatchNorm2d(out_channels))
        self.high = nn.Sequential(nn.Conv2d(high_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))
        self.aux = nn.Conv2d(low_channels, num_classes, 1)

    def forward(self, low: Tensor, high: Tensor) -> tuple[Tensor, Tensor | None]:
        up = F.interpolate(low, size=high.shape[-2:], mode="bilinear", align_corners=False)
        fused = F.relu(self.low(up) + self.high(high))
        return fused, self.aux(up) if self.training else None


class ICNet(nn.Module):
    """ICNet: high (1/1), medium (1/2) and low (1/4) resolution branches fused by two CFF units."""

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 32) -> None:
        super().__init__()
        w = width
        self.high_branch = nn.Sequential(conv_bn_relu(in_channels, w, stride=2), conv_bn_relu(w, w, stride=2),
                                         conv_bn_relu(w, 2 * w, stride=2))
        self.stem = nn.Sequential(conv_bn_relu(in_channels, w, stride=2), conv_bn_relu(w, w),
                                  conv_bn_relu(w, 2 * w), nn.MaxPool2d(3, 2, 1))
        self.stage1 = BasicBlock(2 * w, 2 * w)
        self.stage2 = BasicBlock(2 * w, 4 * w, stride=2)
        self.stage3 = BasicBlock(4 * w, 8 * w, dilation=2)
        self.stage4 = BasicBlock(8 * w, 16 * w, dilation=4)
        self.pyramid = PyramidPooling()
        self.reduce = conv_bn_relu(16 * w, 8 * w, kernel=1)
        self.cff_low = CascadeFeatureFusion(8 * w, 4 * w, 4 * w, num_classes)
        self.cff_high = CascadeFeatureFusion(4 * w, 2 * w, 4 * w, num_classes)
        self.classifier = nn.Conv2d(4 * w, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor, Tensor]:
        _require_divisible(x, 32, "ICNet")
        h, w = x.shape[-2:]
        half = F.interpolate(x, size=(h // 2, w // 2), mode="bilinear", align_corners=False)
        conv3_1 = self.stage2(self.stage1(self.stem(half)))  # 1/16
        quarter = F.interpolate(conv3_1, size=(h // 32, w // 32), mode="bilinear", align_corners=False)
        low = self.reduce(self.pyramid(self.stage4(self.stage3(quarter))))  # 1/32
        fused_16, aux_16 = self.cff_low(low, conv3_1)
        fused_8, aux_8 = self.cff_high(fused_16, self.high_branch(x))
        logits = F.interpolate(self.classifier(fused_8), size=(h, w), mode="bilinear", align_corners=False)
        if self.training:
            assert aux_8 is not None and aux_16 is not None
            return logits, aux_8, aux_16
        return logits


def build_segmentation_model(name: str, num_classes: int, width: int | None = None) -> nn.Module:
    """``unet`` (default width 64) or ``icnet`` (default width 32)."""
    if name == "unet":
        return UNet(num_classes, width=width or 64)
    if name == "icnet":
        return ICNet(num_classes, width=width or 32)
    raise ValueError(f"unknown segmentation model {name!r}; expected one of {MODELS}")
