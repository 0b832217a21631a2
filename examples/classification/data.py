"""Classification data sets of the sample: ImageFolder, CIFAR-10/100 binary, scikit-learn digits.

Every reader returns ``(train, val)`` data sets of ``(3xHxW float tensor, int label)`` at the
model's input size, normalized with ImageNet's mean and std. Nothing is downloaded.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import Dataset
from torchvision import transforms

DATASETS = ("digits", "imagefolder", "cifar10", "cifar100")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR_SIDE = 32
CIFAR_PIXELS = 3 * CIFAR_SIDE * CIFAR_SIDE


class DatasetLayoutError(FileNotFoundError):
    """A data directory does not have the layout its format expects."""


def image_transform(size: int, train: bool) -> Callable[[Image.Image], Tensor]:
    """Resize to ``size`` x ``size`` (random horizontal flip when training), to tensor, normalize."""
    steps: list = [transforms.Resize((size, size))]
    if train:
        steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ToTensor(), transforms.Normalize(MEAN, STD)]
    return transforms.Compose(steps)


def imagefolder_split(root: Path, size: int) -> tuple[Dataset, Dataset, int]:
    """``root/train/<class>/*`` and ``root/val/<class>/*`` (torchvision ImageFolder); returns the class count."""
    from torchvision.datasets import ImageFolder

    root = Path(root)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DatasetLayoutError(
                f"{root / split} is not a directory; an ImageFolder data set needs {root}/train/<class>/<image> "
                f"and {root}/val/<class>/<image> (ImageNet: the val images sorted into class folders)"
            )
    train = ImageFolder(str(root / "train"), transform=image_transform(size, True))
    val = ImageFolder(str(root / "val"), transform=image_transform(size, False))
    if train.classes != val.classes:
        raise DatasetLayoutError(f"{root}: train has classes {train.classes[:5]}..., val {val.classes[:5]}...; "
                                 "expected the same class folders in both")
    return train, val, len(train.classes)


class CifarBinary(Dataset):
    """Records of a CIFAR binary file set: ``label_bytes`` label bytes then 3072 pixel bytes
    (red, green, blue 32x32 planes). The last label byte is the label (CIFAR-100: the fine label)."""

    def __init__(self, files: list[Path], label_bytes: int, transform: Callable[[Image.Image], Tensor]) -> None:
        record = label_bytes + CIFAR_PIXELS
        chunks = []
        for path in files:
            raw = np.fromfile(path, dtype=np.uint8)
            if raw.size == 0 or raw.size % record:
                raise DatasetLayoutError(f"{path}: {raw.size} bytes is not a whole number of {record}-byte records "
                                         f"({label_bytes} label byte(s) + {CIFAR_PIXELS} pixels)")
            chunks.append(raw.reshape(-1, record))
        data = np.concatenate(chunks)
        self.labels = data[:, label_bytes - 1].astype(np.int64)
        self.images = data[:, label_bytes:].reshape(-1, 3, CIFAR_SIDE, CIFAR_SIDE).transpose(0, 2, 3, 1)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


def _require(files: list[Path], root: Path, layout: str) -> list[Path]:
    missing = [p.name for p in files if not p.is_file()]
    if not files or missing:
        raise DatasetLayoutError(f"{root}: missing {missing or 'data files'}; expected the binary layout {layout}")
    return files


def cifar_split(root: Path, classes: int, size: int) -> tuple[Dataset, Dataset, int]:
    """CIFAR-10 (``data_batch_*.bin``, ``test_batch.bin``) or CIFAR-100 (``train.bin``, ``test.bin``) binary files."""
    root = Path(root)
    if classes == 10:
        layout = "of cifar-10-batches-bin: data_batch_1.bin .. data_batch_5.bin, test_batch.bin"
        train_files = _require(sorted(root.glob("data_batch_*.bin")), root, layout)
        test_files = _require([root / "test_batch.bin"], root, layout)
        label_bytes = 1
    elif classes == 100:
        layout = "of cifar-100-binary: train.bin, test.bin"
        train_files = _require([root / "train.bin"], root, layout)
        test_files = _require([root / "test.bin"], root, layout)
        label_bytes = 2
    else:
        raise ValueError(f"CIFAR has 10 or 100 classes, got {classes}")
    train = CifarBinary(train_files, label_bytes, image_transform(size, True))
    val = CifarBinary(test_files, label_bytes, image_transform(size, False))
    return train, val, classes


class ResizedDigits(Dataset):
    """scikit-learn digits (8x8, [0, 1]) bilinearly resized to ``size``, replicated to 3 channels, normalized."""

    def __init__(self, images: Tensor, labels: Tensor, size: int) -> None:
        self.images, self.labels, self.size = images, labels, size
        self.mean = torch.tensor(MEAN).view(3, 1, 1)
        self.std = torch.tensor(STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = F.interpolate(self.images[index][None], size=(self.size, self.size), mode="bilinear",
                              align_corners=False)[0]
        return (image.expand(3, -1, -1) - self.mean) / self.std, int(self.labels[index])


def digits_split(size: int) -> tuple[Dataset, Dataset, int]:
    """The examples' digits split (stratified 80/20, seed 0) at ``size`` x ``size``, 3 channels."""
    from common import load_digits_split

    train, test = load_digits_split()
    return (ResizedDigits(*train.tensors, size), ResizedDigits(*test.tensors, size), 10)


def load_classification_data(name: str, root: Path | None, size: int) -> tuple[Dataset, Dataset, int]:
    """``(train, val, num_classes)`` of data set ``name`` (one of ``DATASETS``) under ``root``."""
    if name == "digits":
        return digits_split(size)
    if root is None:
        raise DatasetLayoutError(f"--dataset {name} needs --data DIR (the directory holding the data set)")
    if name == "imagefolder":
        return imagefolder_split(root, size)
    if name in ("cifar10", "cifar100"):
        return cifar_split(root, int(name.removeprefix("cifar")), size)
    raise ValueError(f"unknown dataset {name!r}; expected one of {DATASETS}")
