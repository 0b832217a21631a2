"""Shared pieces of the examples: the small digits CNN, the data sets, a train and an eval loop.

Data: scikit-learn's digits (shipped with the package, 8x8, 1797 images, 360 held out) by
default; MNIST test-set IDX files when a directory is given (first 6,000 images train, last
4,000 evaluate). Nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import gzip
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

DEFAULT_MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"


def digits_cnn(num_classes: int = 10) -> nn.Module:
    """Three conv-BN-ReLU blocks, a max pool, global average pooling and a linear classifier."""

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(1, 16), *block(16, 32), nn.MaxPool2d(2), *block(32, 64),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes),
    )


def resnet18_style(num_classes: int = 10, width: int = 16) -> nn.Module:
    """ResNet-18's layout (torchvision BasicBlocks, [2, 2, 2, 2], 1x1 downsample convs) for 1-channel
    images, ``width`` channels in the first stage (ResNet-18 has 64), a 3x3 stride-1 stem and no max
    pool (the images are 8x8 or 28x28). Module names follow torchvision's (``layer2.0.downsample``)."""
    from collections import OrderedDict

    from torchvision.models.resnet import BasicBlock

    def stage(cin: int, cout: int, stride: int) -> nn.Sequential:
        down = None
        if stride != 1 or cin != cout:
            down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        return nn.Sequential(BasicBlock(cin, cout, stride, down), BasicBlock(cout, cout))

    w = width
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(1, w, 3, 1, 1, bias=False), bn1=nn.BatchNorm2d(w), relu=nn.ReLU(inplace=True),
        layer1=stage(w, w, 1), layer2=stage(w, 2 * w, 2), layer3=stage(2 * w, 4 * w, 2),
        layer4=stage(4 * w, 8 * w, 2), avgpool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(),
        fc=nn.Linear(8 * w, num_classes),
    ))


ARCHITECTURES: dict[str, Callable[[], nn.Module]] = {"digits_cnn": digits_cnn, "resnet18": resnet18_style}


def load_digits_split() -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn digits: images scaled to [0, 1], a stratified 80/20 split (seed 0)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    tr, te = train_test_split(np.arange(len(y)), test_size=0.2, random_state=0, stratify=digits.target)
    return TensorDataset(x[tr], y[tr]), TensorDataset(x[te], y[te])


def _read_idx(path: Path, header: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read()[header:], dtype=np.uint8)


def load_mnist_split(directory: Path = DEFAULT_MNIST) -> tuple[TensorDataset, TensorDataset]:
    """MNIST test-set IDX files: the first 6,000 images train, the last 4,000 evaluate."""
    directory = Path(directory)
    images_file = directory / "t10k-images-idx3-ubyte.gz"
    labels_file = directory / "t10k-labels-idx1-ubyte.gz"
    if not images_file.exists() or not labels_file.exists():
        raise FileNotFoundError(f"MNIST IDX files not found in {directory} (expected {images_file.name}, {labels_file.name})")
    images = _read_idx(images_file, 16).reshape(-1, 1, 28, 28)
    labels = _read_idx(labels_file, 8)
    x = torch.tensor(images, dtype=torch.float32) / 255.0
    y = torch.tensor(labels, dtype=torch.long)
    return TensorDataset(x[:6000], y[:6000]), TensorDataset(x[6000:], y[6000:])


def load_dataset(name: str) -> tuple[TensorDataset, TensorDataset]:
    if name == "digits":
        return load_digits_split()
    if name == "mnist":
        return load_mnist_split()
    raise ValueError(f"unknown dataset {name!r}; expected 'digits' or 'mnist'")


def loader(ds: TensorDataset, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=torch.Generator().manual_seed(seed))


Forward = Callable[[Tensor], Tensor]


def train_epochs(
    forward: Forward,
    parameters: Iterable[Tensor],
    data: DataLoader,
    epochs: int,
    lr: float,
    desc: str,
    extra_loss: Callable[[], Tensor] | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> None:
    """Adam with cosine decay over ``epochs``; ``forward(x)`` returns logits."""
    params = list(parameters)
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * len(data)))
    loss_fn = nn.CrossEntropyLoss()
    step = 0
    for epoch in tqdm(range(epochs), desc=desc, leave=False, disable=None):
        for x, y in data:
            loss = loss_fn(forward(x), y)
            if extra_loss is not None:
                loss = loss + extra_loss()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if on_step is not None:
                on_step(step, epoch)
            step += 1


@torch.no_grad()
def accuracy(forward: Forward, data: DataLoader) -> float:
    """Top-1 accuracy in percent."""
    correct = total = 0
    for x, y in data:
        correct += int((forward(x).argmax(1) == y).sum())
        total += len(y)
    return 100.0 * correct / total


def onnx_session(path: str | Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_accuracy(path: str | Path, data: DataLoader) -> float:
    """Top-1 accuracy (percent) of an ONNX classifier run in onnxruntime."""
    session = onnx_session(path)
    name = session.get_inputs()[0].name
    correct = total = 0
    for x, y in data:
        logits = session.run(None, {name: x.numpy()})[0]
        correct += int((logits.argmax(1) == y.numpy()).sum())
        total += len(y)
    return 100.0 * correct / total


def onnx_latencies(paths: dict[str, str | Path], x: Tensor, repeats: int = 200, warmup: int = 20) -> dict[str, float]:
    """Median latency (ms) of each file on ``x``, the files alternated call by call."""
    import statistics
    import time

    sessions = {k: onnx_session(p) for k, p in paths.items()}
    feeds = {k: {s.get_inputs()[0].name: x.numpy()} for k, s in sessions.items()}
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for i in range(warmup + repeats):
        for k, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feeds[k])
            if i >= warmup:
                times[k].append((time.perf_counter() - start) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


@dataclasses.dataclass
class Baseline:
    """A trained FP32 digits CNN with its data: what every example compresses."""

    train_set: TensorDataset
    test_set: TensorDataset
    train: DataLoader
    test: DataLoader
    model: nn.Module
    accuracy: float

    def parts(self) -> tuple[TensorDataset, TensorDataset, DataLoader, DataLoader, nn.Module, float]:
        """``(train_set, test_set, train, test, model, accuracy)`` (no copies)."""
        return self.train_set, self.test_set, self.train, self.test, self.model, self.accuracy


def train_baseline(dataset: str, epochs: int, seed: int, arch: str = "digits_cnn") -> Baseline:
    """Load ``dataset``, train ``arch`` (``ARCHITECTURES``) in FP32 (Adam 3e-3, cosine) and evaluate it."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {sorted(ARCHITECTURES)}")
    torch.manual_seed(seed)
    train_set, test_set = load_dataset(dataset)
    train, test = loader(train_set, 64, True, seed), loader(test_set, 256, False)
    model = ARCHITECTURES[arch]()
    train_epochs(model, model.parameters(), train, epochs, 3e-3, "FP32 training")
    model.eval()
    return Baseline(train_set, test_set, train, test, model, accuracy(model, test))
