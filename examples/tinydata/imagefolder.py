"""Write a tiny ImageFolder tree: ``root/{train,val}/<class>/<n>.png`` (torchvision's layout).

    python examples/tinydata/imagefolder.py DIR [--train-per-class 4] [--val-per-class 2] [--size 32]

Ten classes of rendered shapes (``tinydata.classes``); for tests, never for results.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from PIL import Image

from tinydata.classes import CLASS_NAMES, render_class_image


def write_imagefolder(
    root: str | Path, train_per_class: int = 4, val_per_class: int = 2, size: int = 32, seed: int = 0
) -> Path:
    """Write ``root/train`` and ``root/val`` with one subdirectory of PNGs per class; returns ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for label, name in enumerate(CLASS_NAMES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                image = render_class_image(rng, (size, size), label)
                Image.fromarray(image).save(folder / f"{i:04d}.png")
    return root


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", type=Path)
    ap.add_argument("--train-per-class", type=int, default=4)
    ap.add_argument("--val-per-class", type=int, default=2)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(write_imagefolder(args.root, args.train_per_class, args.val_per_class, args.size, args.seed))


if __name__ == "__main__":
    main()
