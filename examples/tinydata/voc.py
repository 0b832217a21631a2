"""A tiny Pascal VOC detection set of rendered shapes, written in the real VOCdevkit layout.

``write_voc(root)`` creates ``root/VOC2007/{JPEGImages, Annotations, ImageSets/Main}`` with
``train``, ``val``, ``trainval`` and ``test`` lists. Object names are the shape names
(``SHAPES``); boxes are 1-based inclusive pixel indices, ``difficult`` is 0. For tests only:
numbers measured on it are not results.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from xml.sax.saxutils import escape

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from PIL import Image

from tinydata.shapes import SHAPES, RenderedObject, render_scene


def annotation_xml(image_id: str, size: tuple[int, int], objects: list[RenderedObject]) -> str:
    """VOC annotation XML: 0-based inclusive shape boxes become 1-based ``xmin..xmax``."""
    height, width = size
    parts = [
        "<annotation>", "  <folder>VOC2007</folder>", f"  <filename>{escape(image_id)}.jpg</filename>",
        f"  <size><width>{width}</width><height>{height}</height><depth>3</depth></size>",
        "  <segmented>0</segmented>",
    ]
    for obj in objects:
        x0, y0, x1, y1 = obj.box
        parts += [
            "  <object>", f"    <name>{SHAPES[obj.label]}</name>", "    <pose>Unspecified</pose>",
            "    <truncated>0</truncated>", "    <difficult>0</difficult>",
            f"    <bndbox><xmin>{x0 + 1}</xmin><ymin>{y0 + 1}</ymin><xmax>{x1 + 1}</xmax><ymax>{y1 + 1}</ymax></bndbox>",
            "  </object>",
        ]
    parts.append("</annotation>")
    return "\n".join(parts) + "\n"


def write_voc(
    root: str | Path, num_train: int = 8, num_test: int = 4, size: tuple[int, int] = (120, 160),
    max_objects: int = 3, seed: int = 0,
) -> Path:
    """Write the set under ``root`` (a VOCdevkit-like directory) and return ``root``.

    The first ``num_train`` images form ``trainval`` (split in half into ``train`` / ``val``),
    the next ``num_test`` form ``test``. Each image holds 1..``max_objects`` shapes.
    """
    rng = np.random.default_rng(seed)
    base = Path(root) / "VOC2007"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    ids = [f"{i:06d}" for i in range(num_train + num_test)]
    for image_id in ids:
        image, objects = render_scene(rng, size, int(rng.integers(1, max_objects + 1)))
        objects = [o for o in objects if o.mask.any()]  # a shape fully drawn over is not an object
        Image.fromarray(image).save(base / "JPEGImages" / f"{image_id}.jpg", quality=95)
        (base / "Annotations" / f"{image_id}.xml").write_text(annotation_xml(image_id, size, objects))
    trainval, test = ids[:num_train], ids[num_train:]
    lists = {"trainval": trainval, "train": trainval[: num_train // 2], "val": trainval[num_train // 2 :], "test": test}
    for name, members in lists.items():
        (base / "ImageSets" / "Main" / f"{name}.txt").write_text("".join(f"{i}\n" for i in members))
    return Path(root)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("root", type=Path, help="output directory (VOC2007/ is created in it)")
    parser.add_argument("--train", type=int, default=8)
    parser.add_argument("--test", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write_voc(args.root, args.train, args.test, seed=args.seed)
    print(f"wrote a tiny VOC set under {args.root}; classes: {','.join(SHAPES)}")


if __name__ == "__main__":
    main()
