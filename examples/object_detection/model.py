"""SSD300 with a VGG16-BN backbone (Liu et al., 2016), returning raw ``(locations, confidences)``.

The network stops at the concatenated head outputs: ``locations`` [N, 8732, 4] (SSD offsets,
see ``boxes.encode``) and ``confidences`` [N, 8732, num_classes] (logits, class 0 is the
background). Decoding and NMS (``boxes.detect``) run outside the model, so the exported ONNX
file holds exactly this network.

Layout at 300x300: conv4_3 (38x38, L2-normalized, learned scale initialized to 20), conv7
(19x19, dilated fc6 + 1x1 fc7), and extras conv8_2 (10), conv9_2 (5), conv10_2 (3),
conv11_2 (1); 4, 6, 6, 6, 4, 4 default boxes per cell.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor, nn
from torchvision.models.vgg import make_layers

# VGG16 conv widths ("M" = 2x2 max pool), as torchvision's vgg16_bn ("D") without the last pool.
VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
CONV4_3_END = 33  # features[:33] ends with conv4_3's ReLU (3 modules per conv-BN-ReLU)
POOL3 = 23        # SSD's third pool rounds up (75 -> 38)

# Default boxes of SSD300 (the paper's scales as the reference implementations fix them).
FEATURE_MAPS = (38, 19, 10, 5, 3, 1)
STEPS = (8, 16, 32, 64, 100, 300)
MIN_SIZES = (30, 60, 111, 162, 213, 264)
MAX_SIZES = (60, 111, 162, 213, 264, 315)
ASPECT_RATIOS = ((2,), (2, 3), (2, 3), (2, 3), (2,), (2,))
INPUT_SIZE = 300


def default_boxes(size: int = INPUT_SIZE) -> Tensor:
    """Priors ``(cx, cy, w, h)`` in [0, 1], [8732, 4], ordered as the heads' outputs.

    Per cell ``(i, j)`` of a ``f``-cell map with step ``s``: centre ``((j + .5) s, (i + .5) s) / size``;
    boxes ``(m, m)``, ``(sqrt(m M), sqrt(m M))`` and ``(m sqrt(a), m / sqrt(a))``, ``(m / sqrt(a), m sqrt(a))``
    for each aspect ratio ``a``, with ``m, M`` the map's min and max sizes over ``size``. Clipped to [0, 1].
    """
    out: list[list[float]] = []
    for f, step, lo, hi, ratios in zip(FEATURE_MAPS, STEPS, MIN_SIZES, MAX_SIZES, ASPECT_RATIOS):
        cells = size / step
        for i, j in itertools.product(range(f), repeat=2):
            cx, cy = (j + 0.5) / cells, (i + 0.5) / cells
            m, big = lo / size, math.sqrt(lo * hi) / size
            out += [[cx, cy, m, m], [cx, cy, big, big]]
            for a in ratios:
                r = math.sqrt(a)
                out += [[cx, cy, m * r, m / r], [cx, cy, m / r, m * r]]
    return torch.tensor(out).clamp(0, 1)


def boxes_per_cell() -> list[int]:
    return [2 + 2 * len(r) for r in ASPECT_RATIOS]


class L2Norm(nn.Module):
    """``y = w_c * x / sqrt(sum_c x^2 + eps)`` over channels, one learned scale per channel."""

    def __init__(self, channels: int, scale: float = 20.0, eps: float = 1e-10) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((channels,), scale))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        norm = x.pow(2).sum(dim=1, keepdim=True).add(self.eps).sqrt()
        return x / norm * self.weight.view(1, -1, 1, 1)


def conv_bn_relu(cin: int, cout: int, kernel: int, **kw: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, **kw), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SSD300(nn.Module):
    """SSD300 over VGG16-BN. ``width`` scales every channel count (1.0 is the paper's model;
    smaller values exist for smoke tests and keep the layout and the default boxes)."""

    def __init__(self, num_classes: int, width: float = 1.0) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes counts the background too; expected >= 2, got {num_classes}")

        def w(c: int) -> int:
            return max(8, int(round(c * width)))

        self.num_classes = num_classes
        features = make_layers([c if c == "M" else w(c) for c in VGG16], batch_norm=True)
        features[POOL3].ceil_mode = True
        self.backbone = features  # same module names as torchvision's vgg16_bn().features
        self.l2norm = L2Norm(w(512))
        self.fc = nn.Sequential(
            nn.MaxPool2d(3, stride=1, padding=1),
            *conv_bn_relu(w(512), w(1024), 3, padding=6, dilation=6),   # fc6 as a dilated conv
            *conv_bn_relu(w(1024), w(1024), 1),                         # fc7
        )
        self.extras = nn.ModuleList([
            nn.Sequential(*conv_bn_relu(w(1024), w(256), 1), *conv_bn_relu(w(256), w(512), 3, stride=2, padding=1)),
            nn.Sequential(*conv_bn_relu(w(512), w(128), 1), *conv_bn_relu(w(128), w(256), 3, stride=2, padding=1)),
            nn.Sequential(*conv_bn_relu(w(256), w(128), 1), *conv_bn_relu(w(128), w(256), 3)),
            nn.Sequential(*conv_bn_relu(w(256), w(128), 1), *conv_bn_relu(w(128), w(256), 3)),
        ])
        sources = [w(512), w(1024), w(512), w(256), w(256), w(256)]
        counts = boxes_per_cell()
        self.loc = nn.ModuleList(nn.Conv2d(c, k * 4, 3, padding=1) for c, k in zip(sources, counts))
        self.conf = nn.ModuleList(nn.Conv2d(c, k * num_classes, 3, padding=1) for c, k in zip(sources, counts))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torchvision's VGG init for the backbone (He normal, fan out), SSD's Xavier uniform for the
        rest; zero biases, BatchNorm at identity. Activations keep their scale through the depth, so
        BatchNorm statistics stay well conditioned even before any training."""
        for name, module in self.named_modules():
            if isinstance(module, nn.Conv2d):
                if name.startswith("backbone."):
                    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                else:
                    nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def load_backbone(self, state_dict: dict[str, Tensor]) -> None:
        """Load torchvision ``vgg16_bn`` weights (keys ``features.N...``) into the backbone (width 1.0)."""
        own = {k.removeprefix("features."): v for k, v in state_dict.items() if k.startswith("features.")}
        if not own:
            raise ValueError("no 'features.*' keys in the backbone weights; expected a torchvision vgg16_bn state_dict")
        self.backbone.load_state_dict(own)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.backbone[:CONV4_3_END](x)
        sources = [self.l2norm(x)]
        x = self.fc(self.backbone[CONV4_3_END:](x))
        sources.append(x)
        for extra in self.extras:
            x = extra(x)
            sources.append(x)
        n = x.shape[0]
        loc = torch.cat([head(s).permute(0, 2, 3, 1).reshape(n, -1, 4) for head, s in zip(self.loc, sources)], 1)
        conf = torch.cat(
            [head(s).permute(0, 2, 3, 1).reshape(n, -1, self.num_classes) for head, s in zip(self.conf, sources)], 1
        )
        return loc, conf
