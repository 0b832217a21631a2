"""Post-training INT8 quantization of a MobileNet-style CNN and of the digits CNN, one call each,
and what each PTQ algorithm contributes, on a plain network and on a badly scaled copy.

    python examples/ptq_cnn.py --dataset mnist        # first 6,000 MNIST test images train, last 4,000 evaluate
    python examples/ptq_cnn.py --dataset digits       # scikit-learn's digits (the default)
    python examples/ptq_cnn.py --dataset mnist --accuracy-control   # also pc.quantize_with_accuracy_control

``--accuracy-control`` runs ``pc.quantize_with_accuracy_control`` (defaults, no cross-layer
equalization, ``max_drop`` 0.005: half a point of top-1 accuracy as a fraction, NNCF's
convention) on the badly scaled copy and prints the layers it returned to float and how many
times it called the validation function. Its validation data is the test set, as in NNCF's
examples: the drop it reaches is measured on the data it was controlled on.

The badly scaled copy computes the same function: output channel ``c`` of every conv -> BN ->
ReLU6 block is multiplied by a factor spread log-uniformly over [0.1, 10] (BatchNorm's gamma
and beta), its ReLU6 clips at ``6 f_c`` (``ChannelClip``), and the next conv's input channel
``c`` is divided by ``f_c``. Per-tensor weight quantization then loses the channels with small
factors; cross-layer equalization undoes the scaling.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import purecomp as pc  # noqa: E402
from purecomp.transforms.ptq import ChannelClip  # noqa: E402

from common import accuracy, digits_cnn, load_dataset, loader, onnx_session, train_epochs  # noqa: E402


def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU6(inplace=True)) if act else nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand -> 3x3 depthwise -> 1x1 project, residual when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int = 4) -> None:
        super().__init__()
        hidden = cin * expand
        self.conv = nn.Sequential(conv_bn(cin, hidden, 1), conv_bn(hidden, hidden, 3, stride, groups=hidden),
                                  conv_bn(hidden, cout, 1, act=False))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.residual else out


def mobilenet_style(num_classes: int = 10) -> nn.Module:
    """A small MobileNetV2: a conv stem, four inverted residual blocks (two with a residual add),
    a 1x1 head conv, global average pooling and a linear classifier."""
    return nn.Sequential(
        conv_bn(1, 16, 3),
        InvertedResidual(16, 24, 2), InvertedResidual(24, 24, 1),
        InvertedResidual(24, 32, 2), InvertedResidual(32, 32, 1),
        conv_bn(32, 64, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes),
    )


def badly_scaled(model: nn.Module, seed: int = 0, spread: float = 10.0) -> nn.Module:
    """An equivalent copy with badly scaled channels (module docstring)."""
    out = copy.deepcopy(model).eval()
    g = torch.Generator().manual_seed(seed)
    blocks = [m for m in out.modules() if isinstance(m, nn.Sequential) and len(m) == 3
              and isinstance(m[0], nn.Conv2d) and isinstance(m[2], nn.ReLU6)]
    # in forward order: each block's output is read by the next conv, the last one's (through
    # average pooling, which keeps channels) by the classifier
    layers = [m for m in out.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        for block in blocks:
            conv, bn = block[0], block[1]
            following = layers[layers.index(conv) + 1]
            f = spread ** (2 * torch.rand(conv.out_channels, generator=g) - 1)
            bn.weight.mul_(f)
            bn.bias.mul_(f)
            block[2] = ChannelClip(6.0 * f)
            if isinstance(following, nn.Linear):
                following.weight.div_(f.reshape(1, -1))
            elif following.groups == 1:
                following.weight.div_(f.reshape(1, -1, 1, 1))
            else:  # depthwise: its output channel c scales too; its BatchNorm sees a scaled input
                following.weight.div_(f.reshape(-1, 1, 1, 1))
    return out


def ptq_rows() -> list[tuple[str, dict]]:
    """The cumulative algorithm rows of the contribution table: ``(name, quantize keyword arguments)``."""
    plain = dict(weights_per_channel=False, activations_range_estimator="min_max", batchnorm_folding=False,
                 disable_bias_correction=True)
    rows = [("min-max, per-tensor weights", plain)]
    rows.append(("+ BatchNorm folding", {**rows[-1][1], "batchnorm_folding": True}))
    rows.append(("+ cross-layer equalization", {**rows[-1][1], "cross_layer_equalization": True}))
    rows.append(("+ bias correction", {**rows[-1][1], "disable_bias_correction": False}))
    rows.append(("+ MSE ranges", {**rows[-1][1], "weights_range_estimator": "mse",
                                  "activations_range_estimator": "mse"}))
    return [(name, dict(advanced_parameters=adv)) for name, adv in rows] + [("pc.quantize defaults", {})]


def openvino_predictions(path: Path, data: torch.utils.data.DataLoader) -> torch.Tensor | None:
    """Predicted classes of an ONNX classifier compiled by OpenVINO for the CPU (None without it).
    The ops OpenVINO does not run in int8 run in f32 (``INFERENCE_PRECISION_HINT``): on a CPU with
    bf16 support its default is bf16, which PyTorch's and ONNX Runtime's float parts are not."""
    try:
        import openvino as ov
    except ImportError:
        return None
    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return torch.cat([torch.from_numpy(compiled([x.numpy()])[0]).argmax(1) for x, _ in data])


def onnx_predictions(path: Path, data: torch.utils.data.DataLoader) -> torch.Tensor:
    """Predicted classes of an ONNX classifier in ONNX Runtime (all graph optimizations on)."""
    session = onnx_session(path)
    name = session.get_inputs()[0].name
    return torch.cat([torch.from_numpy(session.run(None, {name: x.numpy()})[0]).argmax(1) for x, _ in data])


@torch.no_grad()
def predictions(forward: nn.Module, data: torch.utils.data.DataLoader) -> torch.Tensor:
    return torch.cat([forward(x).argmax(1) for x, _ in data])


def runtimes(quantized: nn.Module, reference: torch.Tensor, example: torch.Tensor,
             test: torch.utils.data.DataLoader, folder: Path, label: str) -> str:
    """ONNX Runtime and OpenVINO accuracy of the exported model, how many test images each
    predicts differently from PyTorch's ``reference`` predictions, and the fused integer ops."""
    path = pc.export_quantized(quantized, (example,), folder / f"{label}.onnx")
    fused = pc.export.fused_op_counts(path)
    integer = sum(n for op, n in fused.items() if op.startswith("QLinear") or op.endswith("Integer"))
    labels = torch.cat([y for _, y in test])
    texts = []
    for runtime, preds in (("ORT", onnx_predictions(path, test)), ("OpenVINO", openvino_predictions(path, test))):
        if preds is None:
            texts.append(f"{runtime}    -   ")
            continue
        acc = 100.0 * int((preds == labels).sum()) / len(labels)
        texts.append(f"{runtime} {acc:6.2f}% ({int((preds != reference).sum())} differ)")
    return "  ".join(texts) + f"  ({integer} fused integer ops)"


def accuracy_control(net: nn.Module, calibration: pc.Dataset, test: torch.utils.data.DataLoader,
                     subset_size: int, max_drop: float) -> nn.Module:
    """``pc.quantize_with_accuracy_control`` with defaults on ``net``, the test set as validation data;
    prints its table, the layers it returned to float and the validation call count."""

    def validate(model: nn.Module, data: torch.utils.data.DataLoader) -> float:
        return accuracy(model, data) / 100.0  # a fraction, as NNCF's validation functions return

    start = time.perf_counter()
    quantized = pc.quantize_with_accuracy_control(net, calibration, pc.Dataset(test, lambda batch: batch[0]),
                                                  validate, max_drop=max_drop, subset_size=subset_size)
    report = quantized.accuracy_control
    print(f"  accuracy control ({time.perf_counter() - start:.1f} s):")
    print("    " + str(report.table()).replace("\n", "\n    "))
    print(f"    returned to float: {', '.join(report.reverted) or '(none)'}; "
          f"validation_fn called {report.validation_calls} times")
    return quantized


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=["digits", "mnist"], default="digits")
    parser.add_argument("--epochs", type=int, default=None, help="FP32 epochs (default: 30 digits, 6 MNIST)")
    parser.add_argument("--subset-size", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--accuracy-control", action="store_true",
                        help="also run pc.quantize_with_accuracy_control on the badly scaled copy (no CLE)")
    parser.add_argument("--max-drop", type=float, default=0.005, help="accuracy control's max_drop (a fraction)")
    args = parser.parse_args()
    epochs = args.epochs or (30 if args.dataset == "digits" else 6)
    torch.manual_seed(args.seed)
    train_set, test_set = load_dataset(args.dataset)
    train, test = loader(train_set, 64, True, args.seed), loader(test_set, 256, False)
    calibration = pc.Dataset(loader(train_set, 32, True, args.seed + 1), lambda batch: batch[0])
    networks = {"mobilenet-style": mobilenet_style(), "digits CNN": digits_cnn()}
    example = next(iter(test))[0][:1]
    labels = torch.cat([y for _, y in test])
    folder = Path(tempfile.mkdtemp(prefix="ptq_cnn_"))
    print(f"dataset {args.dataset}: {len(train_set)} train, {len(test_set)} test images")
    for name, model in networks.items():
        train_epochs(model, model.parameters(), train, epochs, 3e-3, f"FP32 {name}")
        model.eval()
        fp32 = accuracy(model, test)
        variants = {"plain": model}
        if name == "mobilenet-style":
            variants["badly scaled"] = badly_scaled(model, args.seed)
        for variant, net in variants.items():
            print(f"\n{name}, {variant}: FP32 {accuracy(net, test):.2f}%")
            rows = ptq_rows() if name == "mobilenet-style" else ptq_rows()[-1:]
            for label, kwargs in rows:
                start = time.perf_counter()
                quantized = pc.quantize(net, calibration, subset_size=args.subset_size, **kwargs)
                seconds = time.perf_counter() - start
                preds = predictions(quantized, test)
                acc = 100.0 * int((preds == labels).sum()) / len(labels)
                tag = f"{name}-{variant}-{len(label)}".replace(" ", "_")
                print(f"  {label:<30} {acc:6.2f}%  ({acc - fp32:+.2f} points, {seconds:4.1f} s)  "
                      f"{runtimes(quantized, preds, example, test, folder, tag)}")
            if args.accuracy_control and variant == "badly scaled":
                quantized = accuracy_control(net, calibration, test, args.subset_size, args.max_drop)
                preds = predictions(quantized, test)
                acc = 100.0 * int((preds == labels).sum()) / len(labels)
                print(f"  {'accuracy control':<30} {acc:6.2f}%  ({acc - fp32:+.2f} points)  "
                      f"{runtimes(quantized, preds, example, test, folder, f'{name}-accuracy-control')}")


if __name__ == "__main__":
    main()
