"""Ten image classes of rendered shapes, for the classification formats (ImageFolder, CIFAR).

Class 0 is an empty noisy background; classes 1..9 are one shape (square, disc, triangle) in
one colour (red, green, blue): ``1 + 3 * shape + colour``. Accuracies on them mean nothing.
"""
from __future__ import annotations

import numpy as np

from tinydata.shapes import SHAPES, shape_mask

COLOURS = ("red", "green", "blue")
CLASS_NAMES = ("empty",) + tuple(f"{c}_{s}" for s in SHAPES for c in COLOURS)


def render_class_image(rng: np.random.Generator, size: tuple[int, int], label: int) -> np.ndarray:
    """An HxWx3 uint8 image of class ``label`` (index into ``CLASS_NAMES``) on a noisy background."""
    if not 0 <= label < len(CLASS_NAMES):
        raise ValueError(f"label {label} out of range; expected 0..{len(CLASS_NAMES) - 1}")
    height, width = size
    image = rng.integers(0, 60, size=(height, width, 3), dtype=np.uint8)
    if label == 0:
        return image
    shape, colour = divmod(label - 1, len(COLOURS))
    side_h = int(rng.integers(max(3, height // 3), max(4, height * 3 // 4)))
    side_w = int(rng.integers(max(3, width // 3), max(4, width * 3 // 4)))
    y0 = int(rng.integers(0, height - side_h + 1))
    x0 = int(rng.integers(0, width - side_w + 1))
    mask = shape_mask(SHAPES[shape], size, (x0, y0, x0 + side_w - 1, y0 + side_h - 1))
    paint = rng.integers(0, 50, size=3, dtype=np.uint8)
    paint[colour] = rng.integers(180, 256)
    image[mask] = paint
    return image


def balanced_labels(rng: np.random.Generator, count: int, num_classes: int = len(CLASS_NAMES)) -> np.ndarray:
    """``count`` labels cycling through the classes, shuffled (every class appears when count >= classes)."""
    return rng.permutation(np.arange(count) % num_classes)
