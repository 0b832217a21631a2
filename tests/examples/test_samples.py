"""The classification and segmentation samples run end to end on tiny data in each real format.

Tiny data sets of rendered shapes (examples/tinydata) are written to tmp_path; the samples
run one short epoch through ``main(argv)``, export ONNX and run it in ONNX Runtime. The
accuracies on these data mean nothing; the tests check that every piece ran and agrees.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))

from classification import main as classification  # noqa: E402
from classification.data import CifarBinary, DatasetLayoutError, cifar_split  # noqa: E402
from sample_runner import SampleError, WeightsError  # noqa: E402
from semantic_segmentation import main as segmentation  # noqa: E402
from semantic_segmentation.data import CamVid, CamVidLayoutError  # noqa: E402
from semantic_segmentation.metrics import confusion_matrix, iou_per_class, mean_iou  # noqa: E402
from tinydata.camvid import write_camvid  # noqa: E402
from tinydata.cifar import encode_image, write_cifar10, write_cifar100  # noqa: E402
from tinydata.imagefolder import write_imagefolder  # noqa: E402

SHORT = ["--epochs", "1", "--batch-size", "4", "--max-steps-per-epoch", "2", "--max-eval-batches", "1"]


def fast_config(name: str, directory: Path) -> Path:
    """A shipped config with calibration cut to 8 samples (the only change), written to ``directory``."""
    data = json.loads((EXAMPLES / "configs" / name).read_text())
    sections = data["compression"] if isinstance(data["compression"], list) else [data["compression"]]
    for section in sections:
        init = section.get("initializer", {})
        if "range" in init:
            init["range"]["num_init_samples"] = 8
        init.pop("batchnorm_adaptation", None)
    path = directory / name
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tinydata")
    return {
        "imagefolder": write_imagefolder(root / "imagefolder", train_per_class=1, val_per_class=1, size=16),
        "cifar10": write_cifar10(root / "cifar10", train=16, test=8),
        "cifar100": write_cifar100(root / "cifar100", train=16, test=8),
        "camvid": write_camvid(root / "camvid", train=4, val=2, test=2, height=32, width=64),
        "configs": root,
    }


def classify(data: dict[str, Path], out: Path, *extra: str):
    config = fast_config("resnet18_int8.json", data["configs"])
    return classification.main(["--config", str(config), "--input-size", "32", "--output-dir", str(out), *SHORT,
                                *extra])


# ---------------------------------------------------------------------------------- readers


def test_cifar_reader_decodes_records_of_both_layouts(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    (tmp_path / "c10.bin").write_bytes(b"".join(bytes([7 - i]) + encode_image(im) for i, im in enumerate(images)))
    (tmp_path / "c100.bin").write_bytes(b"".join(bytes([3, 90 + i]) + encode_image(im) for i, im in enumerate(images)))
    c10 = CifarBinary([tmp_path / "c10.bin"], 1, lambda im: torch.from_numpy(np.array(im)))
    c100 = CifarBinary([tmp_path / "c100.bin"], 2, lambda im: torch.from_numpy(np.array(im)))
    assert [c10[i][1] for i in range(3)] == [7, 6, 5]
    assert [c100[i][1] for i in range(3)] == [90, 91, 92], "the fine label (second byte)"
    for i in range(3):
        assert np.array_equal(c10[i][0].numpy(), images[i]) and np.array_equal(c100[i][0].numpy(), images[i])
    (tmp_path / "bad.bin").write_bytes(b"\x00" * 3000)
    with pytest.raises(DatasetLayoutError, match="3073-byte records"):
        CifarBinary([tmp_path / "bad.bin"], 1, lambda im: im)
    with pytest.raises(DatasetLayoutError, match="test_batch.bin"):
        cifar_split(tmp_path, 10, 32)


def test_camvid_reader_pairs_files_and_names_the_missing_directory(data, tmp_path):
    dataset = CamVid(data["camvid"], "train", (16, 32))
    x, y = dataset[0]
    assert x.shape == (3, 16, 32) and y.shape == (16, 32) and y.dtype == torch.long
    assert int(y[0, 0]) == 11, "the void frame of the tiny data survives the nearest resize"
    assert set(torch.unique(y).tolist()) <= set(range(12))
    with pytest.raises(CamVidLayoutError, match="valannot"):
        (tmp_path / "val").mkdir()
        CamVid(tmp_path, "val", (16, 32))


def test_miou_from_confusion_matrix_ignores_void():
    target = torch.tensor([0, 0, 1, 1, 2, 11])
    pred = torch.tensor([0, 1, 1, 1, 0, 2])
    conf = confusion_matrix(pred, target, 3, ignore_index=11)
    assert conf.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    # IoU_0 = 1 / (2 + 2 - 1), IoU_1 = 2 / (2 + 3 - 2), IoU_2 = 0 / (1 + 0 - 0)
    assert torch.allclose(iou_per_class(conf), torch.tensor([1 / 3, 2 / 3, 0.0], dtype=torch.float64))
    assert mean_iou(conf) == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)


def test_tinydata_command_line_writes_the_cifar100_layout(tmp_path):
    subprocess.run([sys.executable, str(EXAMPLES / "tinydata" / "cifar.py"), str(tmp_path), "--classes", "100",
                    "--train", "5", "--test", "3"], check=True, capture_output=True, timeout=120)
    assert (tmp_path / "train.bin").stat().st_size == 5 * 3074
    assert (tmp_path / "test.bin").stat().st_size == 3 * 3074
    assert len((tmp_path / "fine_label_names.txt").read_text().split()) == 100


# ---------------------------------------------------------------------------------- classification


def test_classification_default_data_is_digits(data, tmp_path):
    result = classify(data, tmp_path)  # no --dataset: the config names none, so digits
    assert 0 <= result.metrics["top1 %"] <= 100 and np.isfinite(result.metrics["train loss"])
    check = result.export
    assert check.path.is_file() and check.output_shapes[0][1] == 10
    assert check.max_abs_diff < 0.1 and check.argmax_agreement >= 75
    assert re.search(r"^dataset\s+digits$", result.table, re.M) and re.search(r"^classes\s+10$", result.table, re.M)
    assert re.search(r"^train / val samples\s+1437 / 360$", result.table, re.M)


def test_classification_imagefolder_trains_an_epoch_and_exports(data, tmp_path):
    result = classify(data, tmp_path, "--dataset", "imagefolder", "--data", str(data["imagefolder"]))
    assert re.search(r"^classes\s+10$", result.table, re.M), "one class per folder"
    check = result.export
    assert check.path == tmp_path / "resnet18_int8.onnx" and check.path.is_file()
    assert check.output_shapes == ((4, 10),), "ONNX Runtime ran the first evaluation batch of 4 images"
    assert check.max_abs_diff < 0.1 and check.argmax_agreement >= 75
    assert "QuantizeLinear" in {node.op_type for node in onnx.load(check.path).graph.node}


def test_classification_cifar100_train_then_test_and_export_from_the_checkpoint(data, tmp_path):
    args = ["--dataset", "cifar100", "--data", str(data["cifar100"])]
    trained = classify(data, tmp_path / "train", *args, "--no-export")
    assert trained.checkpoint == tmp_path / "train" / "last.pt" and (tmp_path / "train" / "best.pt").is_file()
    assert trained.export is None and not list((tmp_path / "train").glob("*.onnx"))
    saved = torch.load(trained.checkpoint, weights_only=True)
    assert saved["model"]["model.fc.weight"].shape[0] == 100, "the class count comes from the data"

    tested = classify(data, tmp_path / "test", *args, "--mode", "test", "--resume", str(trained.checkpoint),
                      "--no-export")
    assert tested.metrics == {k: trained.metrics[k] for k in ("top1 %", "top5 %")}, "the checkpoint restores the model"

    exported = classify(data, tmp_path / "export", *args, "--mode", "export", "--resume", str(trained.checkpoint))
    check = exported.export
    assert check.path == tmp_path / "export" / "resnet18_int8.onnx" and check.path.is_file()
    assert check.output_shapes == ((4, 100),) and check.max_abs_diff < 0.1 and check.argmax_agreement >= 75


def test_classification_weights_mismatch_and_wrong_files_raise_clear_errors(data, tmp_path):
    wrong = tmp_path / "resnet18_100.pth"
    torch.save(classification.build_model("resnet18", 100, 32).state_dict(), wrong)
    with pytest.raises(WeightsError, match=r"reshaped \[fc.bias: \[100\] in the file, \[10\] in the model, fc.weight: \[100, 512\] in the file"):
        classify(data, tmp_path, "--weights", str(wrong))
    with pytest.raises(SampleError, match="is not a checkpoint"):
        classify(data, tmp_path, "--mode", "test", "--resume", str(wrong))
    with pytest.raises(SampleError, match="unknown --arch 'resnet7'"):
        classify(data, tmp_path, "--arch", "resnet7")


def test_inception_keeps_its_auxiliary_head_only_where_it_fits_and_the_loss_weighs_it():
    assert classification.aux_kwargs("inception_v3", 299)["aux_logits"]
    assert not classification.aux_kwargs("inception_v3", 298)["aux_logits"], "the 5x5 aux conv needs 299 px"
    assert classification.aux_kwargs("resnet18", 299) == {}
    with pytest.raises(SampleError, match="too small for inception_v3; expected >= 75"):
        classification.build_model("inception_v3", 10, 64)
    from torchvision.models.inception import InceptionOutputs

    logits, aux, y = torch.randn(4, 10), torch.randn(4, 10), torch.tensor([1, 2, 3, 4])
    expected = torch.nn.functional.cross_entropy(logits, y) + 0.4 * torch.nn.functional.cross_entropy(aux, y)
    assert torch.allclose(classification.classification_loss(InceptionOutputs(logits, aux), y), expected)


# ---------------------------------------------------------------------------------- segmentation


@pytest.mark.parametrize("config", ["unet_camvid_int8_sparsity60.json", "icnet_camvid_int8.json"])
def test_segmentation_trains_an_epoch_on_camvid_and_exports(data, tmp_path, config):
    args = ["--config", str(fast_config(config, data["configs"])), "--data", str(data["camvid"]),
            "--input-size", "32x64", "--width", "4", "--class-weighting", "enet", *SHORT]
    result = segmentation.main([*args, "--output-dir", str(tmp_path)])
    assert 0 <= result.metrics["mIoU %"] <= 100 and np.isfinite(result.metrics["train loss"])
    check = result.export
    assert check.output_shapes == ((2, 11, 32, 64),), "eval batch of the 2 val images, 11 classes, full size"
    assert check.argmax_agreement > 99 and check.max_abs_diff < 0.1
    if "sparsity" not in config:
        return
    # polynomial schedule (power 3, concave) from sparsity_init 0.1 to 0.6 at epoch 10:
    # level(e) = 0.1 + 0.5 * (1 - (1 - e / 10) ** 3); a resumed run continues at epoch 1
    assert sparsity_level(result.statistics) == pytest.approx(0.1, abs=0.005)
    resumed = segmentation.main([*args, "--output-dir", str(tmp_path / "resumed"), "--epochs", "2", "--no-export",
                                 "--resume", str(result.checkpoint)])
    assert torch.load(resumed.checkpoint, weights_only=True)["epoch"] == 1
    assert sparsity_level(resumed.statistics) == pytest.approx(0.1 + 0.5 * (1 - 0.9**3), abs=0.005)


def sparsity_level(statistics: str) -> float:
    """The reached level of the ``MagnitudeSparsity  (all)`` row of ``ctrl.statistics()``."""
    row = next(line for line in statistics.splitlines() if "MagnitudeSparsity  (all)" in line)
    return float(row.split()[-2])


def test_segmentation_names_the_camvid_layout_when_data_is_missing(tmp_path):
    with pytest.raises(CamVidLayoutError, match=r"train is not a directory; the CamVid layout needs .*/train/ \(images\) and .*/trainannot/"):
        segmentation.main(["--data", str(tmp_path), "--output-dir", str(tmp_path)])
    with pytest.raises(SampleError, match="--data DIR is required"):
        segmentation.main(["--output-dir", str(tmp_path)])


# ---------------------------------------------------------------------------------- torchrun


@pytest.mark.slow
def test_classification_torchrun_two_processes_command_line(data, tmp_path):
    config = fast_config("resnet18_int8.json", data["configs"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(EXAMPLES / "classification" / "main.py"), "--config", str(config), "--input-size", "32",
           "--dataset", "cifar10", "--data", str(data["cifar10"]), "--output-dir", str(tmp_path), *SHORT,
           "--no-export"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"^processes\s+2$", result.stdout, re.M), result.stdout[-2000:]
    saved = torch.load(tmp_path / "last.pt", weights_only=True)
    assert saved["epoch"] == 0 and saved["model"]["model.fc.weight"].shape == (10, 512)


@pytest.mark.slow
def test_classification_runs_an_autoq_config_scored_by_the_task_metric(data, tmp_path):
    """A ``type: autoq`` config gets the sample's top-1 on the validation data as its metric
    (without one, building it raises ConfigError); a size ratio below INT8's 0.25 needs 4-bit weights."""
    config = json.loads(fast_config("resnet18_int8.json", data["configs"]).read_text())
    config["compression"]["initializer"]["precision"] = {
        "type": "autoq", "bits": [4, 8], "compression_ratio": 0.2, "iter_number": 2, "warmup_iter_number": 1}
    path = tmp_path / "resnet18_autoq.json"
    path.write_text(json.dumps(config))
    result = classification.main(["--config", str(path), "--input-size", "32", "--output-dir", str(tmp_path),
                                  *SHORT, "--no-export"])
    assert 0 <= result.metrics["top1 %"] <= 100
    assert re.search(r"^\S+\.weight\s+weight\s+4\s", result.statistics, re.M), result.statistics
