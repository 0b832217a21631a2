"""Draw docs/pruning_groups.png: the channel dependency groups of resnet18's stem, layer1 and
layer2.0, as computed by purecomp.transforms.prune.channel_groups on the traced graph.

    python docs/plot_groups.py
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402

import purecomp as pc  # noqa: E402
from purecomp.transforms.prune import channel_groups  # noqa: E402

SCOPES = ("conv1", "bn1", "relu", "maxpool", "layer1.", "layer1/", "layer2.0")
SHOWN_OPS = ("conv2d", "batch_norm", "relu", "max_pool2d", "add")


def main() -> None:
    model = torchvision.models.resnet18(weights=None).eval()
    graph = pc.trace(model, (torch.randn(1, 3, 64, 64),))
    groups = channel_groups(graph)
    group_of: dict[str, int] = {}
    for index, group in enumerate(groups.groups):
        for cls in group.classes:
            for slot in cls.slots:
                if slot.role in ("filter", "member", "norm"):
                    group_of.setdefault(slot.param, index)
    nodes = [n for n in graph if n.op in SHOWN_OPS and (n.scope + "/").startswith(SCOPES)]
    shown = {n.site: i for i, n in enumerate(nodes)}
    colors = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(9, 0.42 * len(nodes) + 1))
    for i, node in enumerate(nodes):
        params = [p for p in node.params if p.endswith("weight")]
        g = group_of.get(params[0]) if params else None
        if g is None:
            face, label = "#eeeeee", ""
        else:
            state = "prunable" if groups.groups[g].prunable else "kept: " + groups.groups[g].reasons[0][:48]
            face, label = colors(g % 10), f"group {g} ({state})"
        ax.text(0, -i, node.site, ha="center", va="center", fontsize=8,
                bbox=dict(boxstyle="round", facecolor=face, alpha=0.55 if g is not None else 1.0))
        ax.text(0.9, -i, label, ha="left", va="center", fontsize=7)
        for ref in node.inputs:
            src = shown.get(ref.name) if ref.kind == "node" else None
            if src is None:
                continue
            if src == i - 1:
                ax.annotate("", xy=(0, -i + 0.3), xytext=(0, -src - 0.3), arrowprops=dict(arrowstyle="->", lw=0.8))
            else:  # a skip connection
                ax.annotate("", xy=(-0.62, -i), xytext=(-0.62, -src),
                            arrowprops=dict(arrowstyle="->", lw=0.8, color="firebrick", connectionstyle="arc3,rad=0.35"))
    ax.set_xlim(-1.6, 2.6)
    ax.set_ylim(-len(nodes), 1)
    ax.axis("off")
    ax.set_title("resnet18 channel groups (one colour = channels removed together; red: skip connections)", fontsize=9)
    out = Path(__file__).with_name("pruning_groups.png")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
