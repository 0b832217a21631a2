"""Write tiny CIFAR-10 / CIFAR-100 data sets in the binary ("-bin") layout of the real ones.

    python examples/tinydata/cifar.py DIR [--classes 10|100] [--train 40] [--test 20]

CIFAR-10 (``cifar-10-batches-bin``): ``data_batch_1.bin .. data_batch_N.bin``, ``test_batch.bin``
and ``batches.meta.txt`` (one class name a line). Each record is 1 label byte followed by
3072 pixel bytes: the 32x32 red plane, then green, then blue, each row-major.

CIFAR-100 (``cifar-100-binary``): ``train.bin``, ``test.bin``, ``coarse_label_names.txt`` and
``fine_label_names.txt``. Each record is 1 coarse-label byte, 1 fine-label byte, 3072 pixel bytes.

Images are rendered shapes (``tinydata.classes``): CIFAR-10 label ``c`` shows class ``c``;
CIFAR-100 fine label ``f`` shows class ``f // 10`` (coarse label ``f // 5``). For tests only.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from tinydata.classes import CLASS_NAMES, balanced_labels, render_class_image

SIDE = 32
PIXELS = 3 * SIDE * SIDE


def encode_image(image: np.ndarray) -> bytes:
    """A 32x32x3 uint8 image as CIFAR's 3072 bytes (channel planes, each row-major)."""
    if image.shape != (SIDE, SIDE, 3) or image.dtype != np.uint8:
        raise ValueError(f"expected a {SIDE}x{SIDE}x3 uint8 image, got {image.shape} {image.dtype}")
    return np.ascontiguousarray(image.transpose(2, 0, 1)).tobytes()


def _cifar10_records(rng: np.random.Generator, count: int) -> bytes:
    labels = balanced_labels(rng, count, 10)
    return b"".join(bytes([int(c)]) + encode_image(render_class_image(rng, (SIDE, SIDE), int(c))) for c in labels)


def _cifar100_records(rng: np.random.Generator, count: int) -> bytes:
    fine = balanced_labels(rng, count, 100)
    return b"".join(bytes([int(f) // 5, int(f)]) + encode_image(render_class_image(rng, (SIDE, SIDE), int(f) // 10))
                    for f in fine)


def write_cifar10(root: str | Path, train: int = 40, test: int = 20, train_batches: int = 2, seed: int = 0) -> Path:
    """``train`` records spread over ``train_batches`` data_batch files, ``test`` in test_batch.bin."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sizes = [len(part) for part in np.array_split(np.arange(train), train_batches)]
    for i, n in enumerate(sizes, start=1):
        (root / f"data_batch_{i}.bin").write_bytes(_cifar10_records(rng, n))
    (root / "test_batch.bin").write_bytes(_cifar10_records(rng, test))
    (root / "batches.meta.txt").write_text("\n".join(CLASS_NAMES) + "\n\n")
    return root


def write_cifar100(root: str | Path, train: int = 100, test: int = 40, seed: int = 0) -> Path:
    """``train.bin`` and ``test.bin`` with two label bytes per record, and the two name lists."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    (root / "train.bin").write_bytes(_cifar100_records(rng, train))
    (root / "test.bin").write_bytes(_cifar100_records(rng, test))
    fine = [f"{CLASS_NAMES[f // 10]}_{f % 10}" for f in range(100)]
    (root / "fine_label_names.txt").write_text("\n".join(fine) + "\n")
    (root / "coarse_label_names.txt").write_text("\n".join(f"group_{k}" for k in range(20)) + "\n")
    return root


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", type=Path)
    ap.add_argument("--classes", type=int, choices=(10, 100), default=10)
    ap.add_argument("--train", type=int, default=None)
    ap.add_argument("--test", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.classes == 10:
        path = write_cifar10(args.root, args.train or 40, args.test or 20, seed=args.seed)
    else:
        path = write_cifar100(args.root, args.train or 100, args.test or 40, seed=args.seed)
    print(path)


if __name__ == "__main__":
    main()
