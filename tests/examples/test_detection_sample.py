"""The object detection sample: box coding, matching, MultiBox loss, VOC mAP, the VOC reader on the
tiny rendered set, and SSD300 run end to end (train, test from the checkpoint, ONNX in ONNX Runtime)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))

from object_detection import main as detection_main  # noqa: E402
from object_detection.boxes import corners, decode, encode, iou, match  # noqa: E402
from object_detection.loss import MultiBoxLoss  # noqa: E402
from object_detection.model import SSD300, boxes_per_cell, default_boxes  # noqa: E402
from object_detection.voc import (  # noqa: E402
    VOC_CLASSES,
    VOCDetection,
    VOCFormatError,
    collate,
    read_annotation,
    read_classes,
)
from object_detection.voc_map import ImageTruth, VOCEvaluator, average_precision  # noqa: E402
from tinydata.shapes import SHAPES, RenderedObject  # noqa: E402
from tinydata.voc import annotation_xml, write_voc  # noqa: E402

import purecomp as pc  # noqa: E402

CONFIGS = ROOT / "examples" / "configs"
SHAPE_CLASSES = ",".join(SHAPES)


# ---------------------------------------------------------------- boxes


def test_default_boxes_follow_the_ssd300_layout():
    priors = default_boxes()
    expected = sum(f * f * k for f, k in zip((38, 19, 10, 5, 3, 1), boxes_per_cell()))
    assert priors.shape == (expected, 4) == (8732, 4)
    # first cell of conv4_3: centre (0.5 * 8 / 300), boxes 30/300 and sqrt(30 * 60)/300
    assert torch.allclose(priors[0], torch.tensor([4 / 300, 4 / 300, 0.1, 0.1]))
    assert math.isclose(float(priors[1, 2]), math.sqrt(30 * 60) / 300, rel_tol=1e-6)
    assert math.isclose(float(priors[2, 2] / priors[2, 3]), 2.0, rel_tol=1e-5)
    # the last map is one cell centred in the image
    assert torch.allclose(priors[-4:, :2], torch.full((4, 2), 0.5))


def test_iou_by_hand():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [5.0, 5.0, 6.0, 6.0]])
    assert torch.allclose(iou(a, b), torch.tensor([[1 / 7, 1.0, 0.0]]))


def test_encode_decode_round_trip_and_zero_offsets_on_the_prior():
    priors = default_boxes()[::97]
    assert torch.allclose(encode(corners(priors), priors), torch.zeros_like(priors), atol=1e-5)
    g = torch.rand(len(priors), 2) * 0.5
    boxes = torch.cat([g, g + 0.05 + torch.rand(len(priors), 2) * 0.4], dim=1)
    offsets = encode(boxes, priors)
    # t_x = (g_cx - d_cx) / (0.1 d_w)
    cx = (boxes[:, 0] + boxes[:, 2]) / 2
    assert torch.allclose(offsets[:, 0], (cx - priors[:, 0]) / (0.1 * priors[:, 2]), atol=1e-4)
    assert torch.allclose(decode(offsets, priors), boxes, atol=1e-5)


def test_match_labels_priors_above_half_iou_and_forces_a_best_prior():
    priors = torch.tensor([[0.25, 0.25, 0.5, 0.5], [0.3, 0.3, 0.5, 0.5], [0.75, 0.75, 0.5, 0.5], [0.9, 0.1, 0.1, 0.1]])
    truths = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.85, 0.05, 0.86, 0.06]])  # the second overlaps nothing well
    offsets, labels = match(truths, torch.tensor([2, 0]), priors)
    # prior 0 is truth 0 (IoU 1), prior 1 overlaps it at IoU .2025 / .2975 = .68, prior 2 not at all;
    # prior 3 meets truth 1 at IoU .01 only but is its best prior, so it is forced to match
    assert labels.tolist() == [3, 3, 0, 1]
    assert torch.allclose(offsets[0], torch.zeros(4), atol=1e-5)


def test_multibox_loss_mines_three_negatives_per_positive():
    priors = torch.tensor([[0.1 + 0.1 * i, 0.5, 0.1, 0.1] for i in range(8)])
    target = [torch.tensor([[0.05, 0.45, 0.15, 0.55, 1.0, 0.0]])]  # exactly prior 0, class 1 -> label 2
    loc = torch.zeros(1, 8, 4)
    loc[0, 0, 0] = 2.0                                              # smooth L1: 2 - 0.5
    conf = torch.zeros(1, 8, 3)
    conf[0, :, 0] = 10.0                                            # confident background everywhere...
    conf[0, 0] = torch.tensor([0.0, 0.0, 10.0])                    # ...and the right class on the positive
    for prior, logit in zip(range(1, 6), (1.0, 2.0, 3.0, 4.0, 5.0)):
        conf[0, prior, 1] = 10.0 + logit                            # five wrong negatives of growing loss
    ce = torch.nn.functional.cross_entropy
    expected_conf = ce(conf[0, 0:1], torch.tensor([2]), reduction="sum") + sum(
        ce(conf[0, p : p + 1], torch.tensor([0]), reduction="sum") for p in (3, 4, 5)
    )
    loss = MultiBoxLoss(priors)((loc, conf), target)
    assert torch.isclose(loss, 1.5 + expected_conf, atol=1e-5)


# ---------------------------------------------------------------- mAP


def _truth(boxes, labels, difficult=None):
    n = len(boxes)
    return ImageTruth(torch.tensor(boxes, dtype=torch.float32), torch.tensor(labels),
                      torch.tensor(difficult if difficult is not None else [False] * n))


def _ap(truths, detections, num_classes=1):
    evaluator = VOCEvaluator(num_classes)
    for truth, (boxes, scores, labels) in zip(truths, detections):
        evaluator.add(truth, torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), torch.tensor(scores),
                      torch.tensor(labels, dtype=torch.long))
    return evaluator.compute()


A, B, FAR = [0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]


def test_map_perfect_predictions_is_one():
    mean, aps = _ap([_truth([A, B], [0, 1])], [([A, B], [0.9, 0.8], [0, 1])], num_classes=2)
    assert mean == 1.0 and aps == [1.0, 1.0]


def test_map_false_positive_between_true_positives():
    # TP 0.9, FP 0.8, TP 0.7: precision 1 up to recall .5, then 2/3 at recall 1
    mean, _ = _ap([_truth([A, B], [0, 0])], [([A, FAR, B], [0.9, 0.8, 0.7], [0, 0, 0])])
    assert math.isclose(mean, 0.5 + 0.5 * 2 / 3)


def test_map_duplicate_detection_is_a_false_positive_and_a_miss_halves_recall():
    mean, _ = _ap([_truth([A, B], [0, 0])], [([A, A, B], [0.9, 0.8, 0.7], [0, 0, 0])])
    assert math.isclose(mean, 0.5 + 0.5 * 2 / 3)
    mean, _ = _ap([_truth([A, B], [0, 0])], [([A], [0.9], [0])])
    assert math.isclose(mean, 0.5)


def test_map_difficult_objects_are_neither_hits_nor_misses():
    # detection on the difficult object (ignored), a false positive, then the true positive: AP 1/2
    truths = [_truth([A, B], [0, 0], [False, True])]
    mean, _ = _ap(truths, [([B, FAR, A], [0.9, 0.85, 0.8], [0, 0, 0])])
    assert math.isclose(mean, 0.5)
    mean, _ = _ap(truths, [([A], [0.9], [0])])                       # the difficult one undetected: AP 1
    assert mean == 1.0
    mean, _ = _ap([_truth([A, B], [0, 0])], [([B, FAR, A], [0.9, 0.85, 0.8], [0, 0, 0])])
    assert math.isclose(mean, 0.5 + 0.5 * 2 / 3)                     # not difficult: a hit


def test_map_leaves_classes_without_ground_truth_out_of_the_mean():
    mean, aps = _ap([_truth([A], [0])], [([A, B], [0.9, 0.9], [0, 1])], num_classes=2)
    assert aps[0] == 1.0 and math.isnan(aps[1]) and mean == 1.0


def test_average_precision_is_the_area_under_the_precision_envelope():
    # precision 0.5 at recall 0.5 rises to 1.0 at recall 1.0: the envelope is 1.0 everywhere
    assert math.isclose(average_precision(np.array([0.5, 1.0]), np.array([0.5, 1.0])), 1.0)
    assert math.isclose(average_precision(np.array([0.25, 0.5]), np.array([1.0, 0.5])), 0.25 + 0.25 * 0.5)


# ---------------------------------------------------------------- VOC reader and writer


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
    return write_voc(tmp_path_factory.mktemp("voc"), num_train=4, num_test=2)


def test_annotation_round_trip_uses_one_based_inclusive_pixels(tmp_path):
    mask = np.zeros((20, 30), dtype=bool)
    xml = annotation_xml("x", (20, 30), [RenderedObject(2, (3, 4, 12, 9), mask)])
    assert "<xmin>4</xmin><ymin>5</ymin><xmax>13</xmax><ymax>10</ymax>" in xml
    path = tmp_path / "x.xml"
    path.write_text(xml)
    ann = read_annotation(path, SHAPES)
    # pixels 3..12 (0-based, inclusive) cover the continuous extent [3, 13)
    assert (ann.width, ann.height) == (30, 20)
    assert ann.boxes.tolist() == [[3.0, 4.0, 13.0, 10.0]] and ann.labels.tolist() == [2]
    assert ann.difficult.tolist() == [False]


def test_voc_dataset_reads_the_tiny_set(voc_root):
    data = VOCDetection(voc_root, "2007:test", read_classes(SHAPE_CLASSES))
    assert len(data) == 2
    image, target = data[0]
    assert image.shape == (3, 300, 300) and target.shape[1] == 6
    ann = data.annotation(0)
    expected = ann.boxes / np.array([ann.width, ann.height] * 2, dtype=np.float32)
    assert np.allclose(target[:, :4].numpy(), expected) and target[:, 4].tolist() == ann.labels.tolist()
    train = VOCDetection(voc_root, "2007:train,2007:val", read_classes(SHAPE_CLASSES), train=True)
    assert len(train) == 4
    for i in range(len(train)):  # augmented boxes stay inside the image and non-empty
        _, t = train[i]
        assert ((t[:, :4] >= 0) & (t[:, :4] <= 1)).all() and (t[:, 2:4] > t[:, :2]).all()


def test_voc_errors_name_what_is_wrong(tmp_path, voc_root):
    with pytest.raises(VOCFormatError, match=r"not a directory; expected VOC<YEAR>/\{JPEGImages"):
        VOCDetection(tmp_path / "nowhere", "2007:test")
    with pytest.raises(VOCFormatError, match=r"missing .*VOC2012/ImageSets/Main/train.txt"):
        VOCDetection(voc_root, "2012:train")
    with pytest.raises(VOCFormatError, match="expected YEAR:SET"):
        VOCDetection(voc_root, "test")
    bad = tmp_path / "bad.xml"
    bad.write_text("<annotation><size><width>3</width>")
    with pytest.raises(VOCFormatError, match=r"bad\.xml: cannot read the annotation XML"):
        read_annotation(bad, SHAPES)
    with pytest.raises(VOCFormatError, match=r"000000\.xml: object class '(square|disc|triangle)' is not in the class list \['aeroplane'"):
        read_annotation(voc_root / "VOC2007" / "Annotations" / "000000.xml", VOC_CLASSES)


def test_evaluation_of_encoded_ground_truth_is_perfect(voc_root):
    """Raw outputs that encode the matched ground truth decode (NMS, VOC rules) to mAP 1."""
    classes = read_classes(SHAPE_CLASSES)
    data = VOCDetection(voc_root, "2007:test", classes)
    priors = default_boxes()
    images, targets = collate([data[i] for i in range(len(data))])
    locs, confs = [], []
    for t in targets:
        offsets, labels = match(t[:, :4], t[:, 4].long(), priors)
        locs.append(offsets)
        confs.append(torch.nn.functional.one_hot(labels, len(classes) + 1).float() * 20)
    outputs = (torch.stack(locs), torch.stack(confs))
    args = detection_main.parse_args(["--data", str(voc_root)])
    metrics = detection_main.make_evaluate(priors, classes, args)(lambda x: outputs, [(images, targets)])
    assert metrics["mAP@0.5"] == 1.0
    assert list(metrics) == ["mAP@0.5"] + [f"AP {c}" for c in classes]


# ---------------------------------------------------------------- model, configs, end to end


def test_int8_config_builds_and_quantizes_l2norm_at_its_output_only():
    model = SSD300(len(SHAPES) + 1, width=0.125)
    batch = (torch.randn(2, 3, 300, 300),)
    config = pc.register_default_init_args(pc.Config.from_json(CONFIGS / "ssd300_voc_int8.json"), [batch])
    ctrl, module = pc.create_compressed_model(model, config)
    loc, conf = module(*batch)
    assert loc.shape == (2, 8732, 4) and conf.shape == (2, 8732, len(SHAPES) + 1)
    acts = ctrl.state.activations
    # where the heads read it, never inside the norm (sum of squares, eps, the learned scale)
    assert "l2norm/mul#0:out0" in acts and not any(k.startswith("l2norm/") and k != "l2norm/mul#0:out0" for k in acts)
    # each head's conv output is quantized before the permute / reshape / concat
    assert all(f"{head}.{i}/conv2d#0:out0" in acts for head in ("loc", "conf") for i in range(6))
    assert len(ctrl.state.weights) == 13 + 2 + 8 + 12  # every conv: backbone, fc6/fc7, extras, heads


def test_ssd300_int8_sparsity_trains_tests_and_exports_on_tiny_voc(voc_root, tmp_path):
    """One short epoch in train mode, test mode from its checkpoint (same mAP), ONNX in ONNX Runtime."""
    common = ["--config", str(CONFIGS / "ssd300_voc_int8_sparsity70.json"), "--data", str(voc_root),
              "--train-sets", "2007:trainval", "--test-set", "2007:test", "--classes", SHAPE_CLASSES,
              "--width", "0.125", "--batch-size", "2", "--output-dir", str(tmp_path)]
    trained = detection_main.main([*common, "--epochs", "1", "--max-steps-per-epoch", "2", "--no-export"])
    assert 0.0 <= trained.metrics["mAP@0.5"] <= 1.0 and trained.checkpoint == tmp_path / "last.pt"
    tested = detection_main.main([*common, "--mode", "test", "--resume", str(trained.checkpoint)])
    for key, value in trained.metrics.items():  # the checkpoint restores the same detector
        if key.startswith(("mAP", "AP")):
            assert value == tested.metrics[key] or (math.isnan(value) and math.isnan(tested.metrics[key]))
    check = tested.export
    assert check is not None and check.path.is_file()
    assert check.output_shapes == ((2, 8732, 4), (2, 8732, len(SHAPES) + 1))
    assert math.isfinite(check.max_abs_diff)
    # ONNX Runtime runs every convolution as an integer kernel
    assert pc.export.fused_op_counts(check.path)["QLinearConv"] == 35
    # the first multistep level (30% of the conv weights, globally) is baked into the int8 weights
    import onnx
    from onnx import numpy_helper

    weights = [numpy_helper.to_array(t) for t in onnx.load(str(check.path)).graph.initializer
               if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    assert len(weights) == 35
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.size for w in weights)
    assert 0.29 <= zeros < 0.5  # a few weights are exactly zero either way
