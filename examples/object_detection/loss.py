"""The SSD MultiBox loss: smooth L1 on matched offsets plus cross entropy with 3:1 hard negatives."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .boxes import match


class MultiBoxLoss(nn.Module):
    """``L = (L_loc + L_conf) / N`` over a batch, ``N`` = number of matched (positive) priors.

    - matching: ``boxes.match`` at IoU ``threshold`` (0.5); positives carry class ``label + 1``;
    - ``L_loc = sum_pos smoothL1(l - encode(g, d))`` with variances (0.1, 0.2);
    - ``L_conf = sum_{pos + hard neg} CE(c, y)``: negatives are the background priors with the
      largest background cross entropy, ``neg_pos_ratio`` (3) per positive of the same image.

    Targets: one tensor per image, ``[K, 5]`` rows ``(x0, y0, x1, y1, label)`` in [0, 1].
    """

    def __init__(self, priors: Tensor, threshold: float = 0.5, neg_pos_ratio: int = 3) -> None:
        super().__init__()
        self.register_buffer("priors", priors)
        self.threshold = threshold
        self.neg_pos_ratio = neg_pos_ratio

    def forward(self, outputs: tuple[Tensor, Tensor], targets: list[Tensor]) -> Tensor:
        loc, conf = outputs
        if len(targets) != loc.shape[0]:
            raise ValueError(f"got {len(targets)} target tensors for a batch of {loc.shape[0]} images")
        priors = self.priors.to(loc.device)
        matched = [match(t[:, :4].to(priors), t[:, 4].long().to(loc.device), priors, self.threshold) for t in targets]
        loc_t = torch.stack([m[0] for m in matched])
        conf_t = torch.stack([m[1] for m in matched])
        positive = conf_t > 0
        num_pos = positive.sum(dim=1, keepdim=True)

        loc_loss = F.smooth_l1_loss(loc[positive], loc_t[positive], reduction="sum")

        ce = F.cross_entropy(conf.reshape(-1, conf.shape[-1]), conf_t.reshape(-1), reduction="none").view_as(conf_t)
        mining = ce.detach().clone()
        mining[positive] = 0.0
        rank = mining.argsort(dim=1, descending=True).argsort(dim=1)
        num_neg = (self.neg_pos_ratio * num_pos).clamp(max=positive.shape[1] - 1)
        negative = rank < num_neg
        conf_loss = ce[positive | negative].sum()

        return (loc_loss + conf_loss) / num_pos.sum().clamp(min=1).to(loc.dtype)
