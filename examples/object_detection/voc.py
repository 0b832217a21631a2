"""Pascal VOC detection data read from a VOCdevkit directory (nothing is downloaded).

Layout, for each ``YEAR`` asked for (``VOC2007``, ``VOC2012``)::

    ROOT/VOC<YEAR>/JPEGImages/<id>.jpg
    ROOT/VOC<YEAR>/Annotations/<id>.xml
    ROOT/VOC<YEAR>/ImageSets/Main/<set>.txt      one image id per line

Annotation boxes are VOC's 1-based inclusive pixel indices ``xmin..xmax``; they become
continuous corners ``(xmin - 1, ymin - 1, xmax, ymax)`` (the pixels' extent), normalized by
the image size. Targets are ``[K, 6]`` rows ``(x0, y0, x1, y1, label, difficult)``.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics, as torchvision's VGG16-BN was trained with
STD = (0.229, 0.224, 0.225)
LAYOUT = "VOC<YEAR>/{JPEGImages/<id>.jpg, Annotations/<id>.xml, ImageSets/Main/<set>.txt}"


class VOCFormatError(ValueError):
    """A VOC directory, image list or annotation that does not have the expected layout."""


@dataclass(frozen=True)
class Annotation:
    """One image's objects: ``boxes`` [K, 4] continuous pixel corners, ``labels`` [K], ``difficult`` [K]."""

    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    difficult: np.ndarray


def read_classes(spec: str | None) -> tuple[str, ...]:
    """Class names: the 20 VOC classes for ``None``, else a file with one name per line or ``a,b,c``."""
    if spec is None:
        return VOC_CLASSES
    path = Path(spec)
    names = path.read_text().split() if path.is_file() else [s.strip() for s in spec.split(",")]
    names = [n for n in names if n]
    if not names or len(set(names)) != len(names):
        raise VOCFormatError(f"class list {spec!r}: expected distinct names (a file, one per line, or 'a,b,c'), got {names}")
    return tuple(names)


def _number(node: ET.Element, tag: str, path: Path) -> float:
    child = node.find(tag)
    if child is None or child.text is None:
        raise VOCFormatError(f"{path}: <{node.tag}> has no <{tag}>; expected VOC annotation XML")
    try:
        return float(child.text)
    except ValueError:
        raise VOCFormatError(f"{path}: <{tag}> is {child.text!r}; expected a number") from None


def read_annotation(path: Path, classes: Sequence[str]) -> Annotation:
    """Parse one VOC XML file; unknown class names and malformed files raise ``VOCFormatError``."""
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as e:
        raise VOCFormatError(f"{path}: cannot read the annotation XML ({e})") from None
    size = root.find("size")
    if size is None:
        raise VOCFormatError(f"{path}: no <size>; expected <annotation><size><width>..<height>..")
    width, height = int(_number(size, "width", path)), int(_number(size, "height", path))
    index = {name: i for i, name in enumerate(classes)}
    boxes, labels, difficult = [], [], []
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in index:
            raise VOCFormatError(f"{path}: object class {name!r} is not in the class list {list(classes)}")
        bndbox = obj.find("bndbox")
        if bndbox is None:
            raise VOCFormatError(f"{path}: object {name!r} has no <bndbox>")
        x0, y0, x1, y1 = (_number(bndbox, t, path) for t in ("xmin", "ymin", "xmax", "ymax"))
        if not (1 <= x0 <= x1 and 1 <= y0 <= y1):
            raise VOCFormatError(f"{path}: box {(x0, y0, x1, y1)} of {name!r}; expected 1 <= min <= max")
        boxes.append([x0 - 1, y0 - 1, x1, y1])
        labels.append(index[name])
        difficult.append(int(obj.findtext("difficult") or 0))
    return Annotation(
        width, height, np.array(boxes, dtype=np.float32).reshape(-1, 4),
        np.array(labels, dtype=np.int64), np.array(difficult, dtype=bool),
    )


def parse_sets(spec: str) -> list[tuple[str, str]]:
    """``"2007:trainval,2012:trainval"`` -> ``[("2007", "trainval"), ("2012", "trainval")]``."""
    out = []
    for part in spec.split(","):
        year, sep, name = part.strip().partition(":")
        if not sep or not year or not name:
            raise VOCFormatError(f"image set {part!r}: expected YEAR:SET, e.g. 2007:test")
        out.append((year, name))
    return out


class VOCDetection(Dataset):
    """Images resized to ``size`` x ``size``, normalized; targets ``[K, 6]`` normalized (see module doc).

    ``train=True`` applies SSD's augmentation (``augment``) and drops difficult objects, as SSD
    training does; evaluation keeps them, flagged, for the mAP rules.
    """

    def __init__(
        self, root: str | Path, sets: str, classes: Sequence[str] = VOC_CLASSES, size: int = 300,
        train: bool = False,
    ) -> None:
        self.root, self.classes, self.size, self.train = Path(root), tuple(classes), size, train
        self.items: list[tuple[Path, str]] = []
        if not self.root.is_dir():
            raise VOCFormatError(f"VOC root {self.root} is not a directory; expected {LAYOUT} under it")
        for year, name in parse_sets(sets):
            base = self.root / f"VOC{year}"
            listing = base / "ImageSets" / "Main" / f"{name}.txt"
            if not listing.is_file():
                raise VOCFormatError(f"missing {listing}; expected {LAYOUT} under {self.root}")
            ids = [line.split()[0] for line in listing.read_text().splitlines() if line.strip()]
            self.items += [(base, i) for i in ids]
        if not self.items:
            raise VOCFormatError(f"image sets {sets!r} under {self.root} list no image")

    def __len__(self) -> int:
        return len(self.items)

    def annotation(self, index: int) -> Annotation:
        base, image_id = self.items[index]
        return read_annotation(base / "Annotations" / f"{image_id}.xml", self.classes)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        base, image_id = self.items[index]
        path = base / "JPEGImages" / f"{image_id}.jpg"
        if not path.is_file():
            raise VOCFormatError(f"missing image {path}; expected {LAYOUT}")
        image = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
        ann = self.annotation(index)
        boxes, labels, difficult = ann.boxes, ann.labels, ann.difficult
        if self.train:
            keep = ~difficult
            boxes, labels, difficult = boxes[keep], labels[keep], difficult[keep]
            # drawn from torch's generator: seeded by torch.manual_seed, distinct per DataLoader worker
            rng = np.random.default_rng([int(torch.randint(2**31, ())), index])
            image, boxes, labels = augment(rng, image, boxes, labels)
            difficult = np.zeros(len(labels), dtype=bool)
        height, width = image.shape[:2]
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)[0]
        x = (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
        scale = np.array([width, height, width, height], dtype=np.float32)
        target = np.concatenate(
            [boxes / scale, labels[:, None].astype(np.float32), difficult[:, None].astype(np.float32)], axis=1
        )
        return x, torch.from_numpy(target.reshape(-1, 6))


def collate(batch: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, list[Tensor]]:
    """Stack the images; targets stay a list (each image has its own number of objects)."""
    return torch.stack([b[0] for b in batch]), [b[1] for b in batch]


def augment(
    rng: np.random.Generator, image: np.ndarray, boxes: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SSD training augmentation: photometric jitter, zoom out (x1..4 on a mean canvas, p=.5),
    IoU-constrained random crop, horizontal flip (p=.5). Boxes in pixel corners."""
    image = image * rng.uniform(0.875, 1.125) + rng.uniform(-0.125, 0.125)
    image = np.clip(image, 0.0, 1.0).astype(np.float32)
    if rng.random() < 0.5:
        image, boxes = _expand(rng, image, boxes)
    image, boxes, labels = _crop(rng, image, boxes, labels)
    if rng.random() < 0.5:
        image = image[:, ::-1]
        width = image.shape[1]
        boxes = np.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], axis=1)
    return image, boxes.reshape(-1, 4), labels


def _expand(rng: np.random.Generator, image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    height, width = image.shape[:2]
    ratio = rng.uniform(1, 4)
    canvas = np.empty((int(height * ratio), int(width * ratio), 3), dtype=np.float32)
    canvas[:] = MEAN
    top, left = int(rng.uniform(0, canvas.shape[0] - height)), int(rng.uniform(0, canvas.shape[1] - width))
    canvas[top : top + height, left : left + width] = image
    return canvas, boxes + np.array([left, top, left, top], dtype=np.float32)


def _crop(
    rng: np.random.Generator, image: np.ndarray, boxes: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SSD's patch sampling: a min IoU from {none, .1, .3, .5, .7, .9, 0}; up to 50 tries for a patch
    (sides in [.3, 1] of the image, aspect in [.5, 2]) whose IoU with some box reaches it; keep the
    boxes whose centres fall in the patch, clipped to it. ``none`` keeps the whole image."""
    if boxes.shape[0] == 0:
        return image, boxes, labels
    height, width = image.shape[:2]
    min_iou = rng.choice([-1.0, 0.1, 0.3, 0.5, 0.7, 0.9, 0.0])
    if min_iou < 0:
        return image, boxes, labels
    for _ in range(50):
        w, h = rng.uniform(0.3 * width, width), rng.uniform(0.3 * height, height)
        if not 0.5 <= h / w <= 2:
            continue
        left, top = rng.uniform(0, width - w), rng.uniform(0, height - h)
        patch = np.array([int(left), int(top), int(left + w), int(top + h)], dtype=np.float32)
        overlaps = _iou_np(boxes, patch)
        if overlaps.max() < min_iou:
            continue
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2
        keep = np.all((centres > patch[:2]) & (centres < patch[2:]), axis=1)
        if not keep.any():
            continue
        x0, y0, x1, y1 = patch.astype(int)
        kept = boxes[keep].copy()
        kept[:, :2] = np.maximum(kept[:, :2], patch[:2]) - patch[:2]
        kept[:, 2:] = np.minimum(kept[:, 2:], patch[2:]) - patch[:2]
        return image[y0:y1, x0:x1], kept, labels[keep]
    return image, boxes, labels


def _iou_np(boxes: np.ndarray, patch: np.ndarray) -> np.ndarray:
    inter = (np.minimum(boxes[:, 2:], patch[2:]) - np.maximum(boxes[:, :2], patch[:2])).clip(min=0).prod(axis=1)
    areas = (boxes[:, 2:] - boxes[:, :2]).prod(axis=1)
    return inter / (areas + (patch[2:] - patch[:2]).prod() - inter)
