"""Rendered shapes: one coloured square, disc or triangle per object on a noisy background."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SHAPES = ("square", "disc", "triangle")


@dataclass(frozen=True)
class RenderedObject:
    """One shape in a scene: class index into SHAPES, box (x0, y0, x1, y1) inclusive, pixel mask."""

    label: int
    box: tuple[int, int, int, int]
    mask: np.ndarray


def shape_mask(kind: str, size: tuple[int, int], box: tuple[int, int, int, int]) -> np.ndarray:
    """Boolean HxW mask of `kind` filling the inclusive box (x0, y0, x1, y1)."""
    height, width = size
    x0, y0, x1, y1 = box
    ys, xs = np.mgrid[0:height, 0:width]
    inside = (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)
    if kind == "square":
        return inside
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if kind == "disc":
        rx, ry = max((x1 - x0) / 2, 0.5), max((y1 - y0) / 2, 0.5)
        return ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1.0
    if kind == "triangle":
        # apex at the top centre, base on the bottom edge: |x - cx| <= half width * depth
        depth = (ys - y0) / max(y1 - y0, 1)
        return inside & (np.abs(xs - cx) <= (x1 - x0) / 2 * depth)
    raise ValueError(f"unknown shape {kind!r}; expected one of {SHAPES}")


def render_scene(
    rng: np.random.Generator, size: tuple[int, int], num_objects: int, min_side: int = 6
) -> tuple[np.ndarray, list[RenderedObject]]:
    """An HxWx3 uint8 image with `num_objects` random shapes (later ones drawn over earlier)."""
    height, width = size
    if min(height, width) < 2 * min_side:
        raise ValueError(f"image size {size} is too small for shapes of side >= {min_side}")
    image = rng.integers(0, 60, size=(height, width, 3), dtype=np.uint8)
    objects: list[RenderedObject] = []
    for _ in range(num_objects):
        label = int(rng.integers(len(SHAPES)))
        side_w = int(rng.integers(min_side, max(min_side + 1, width // 2)))
        side_h = int(rng.integers(min_side, max(min_side + 1, height // 2)))
        x0 = int(rng.integers(0, width - side_w))
        y0 = int(rng.integers(0, height - side_h))
        box = (x0, y0, x0 + side_w - 1, y0 + side_h - 1)
        mask = shape_mask(SHAPES[label], size, box)
        image[mask] = rng.integers(120, 256, size=3, dtype=np.uint8)
        objects = [RenderedObject(o.label, o.box, o.mask & ~mask) for o in objects]
        objects.append(RenderedObject(label, box, mask))
    return image, objects


def label_map(size: tuple[int, int], objects: list[RenderedObject]) -> np.ndarray:
    """HxW int class map: 0 background, 1 + shape index where a shape is visible."""
    labels = np.zeros(size, dtype=np.int64)
    for obj in objects:
        labels[obj.mask] = obj.label + 1
    return labels
