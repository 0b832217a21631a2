"""Every JSON in examples/configs validates (``pc.Config.from_json``) and builds: the compressed
model is created for the model the config names and runs.

To keep the file affordable (~90 s on an idle 2-core machine) the build uses, per config:

- a small input: ``input_info`` resized to 32x32 (Inception-v3: 75x75, its minimum;
  SSD300: its fixed 300x300 at width 1/8; BERT: 16 tokens on a 2-layer, 32-wide model of the
  same class, as the real one is built from a download);
- two random calibration batches of two samples; range-init / BN-adaptation counts capped at 4;
- HAWQ: 2 samples and 1 Hutchinson probe; AutoQ: 2 episodes (1 of warm-up), scored by top-1
  on the calibration batches.

The cost of a build grows with the number of quantizer sites (Python work per site), not with
the FLOPs: MobileNet-v2 takes several times ResNet-50's. ``slow`` (skipped by ``make test-quick``):
every Inception-v3 config, the EfficientNet-B0 variants other than ``efficientnet_b0_imagenet_int8``,
and the mixed-precision (HAWQ / AutoQ) builds of ResNet-50, MobileNet-v2 and Inception-v3.

Torchvision classifiers come from ``get_model(name, weights=None, num_classes=...)``; SSD, UNet
and ICNet from the samples' own builders (examples/object_detection, examples/semantic_segmentation),
skipped with the reason while a sample module is missing.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import purecomp as pc
from purecomp.struct import tree_flatten

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
CONFIGS = sorted((EXAMPLES / "configs").glob("*.json"))
HEAVY = {"resnet50", "mobilenet_v2", "inception_v3"}  # their mixed-precision builds are slow
SLOW_MODELS = {"inception_v3"}  # every build of these is slow
SLOW_CONFIGS = {"efficientnet_b0_imagenet_int8_per_tensor_symmetric", "efficientnet_b0_imagenet_int8_per_tensor_asymmetric",
                "efficientnet_b0_imagenet_rb_sparsity_int8"}


def _load_module(relative: str, name: str):
    path = EXAMPLES / relative
    assert path.is_file(), f"{relative} is missing: the sample that builds this config's model must exist"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _algorithms(data: dict) -> list[dict]:
    section = data["compression"]
    return section if isinstance(section, list) else [section]


def _precision(data: dict) -> dict | None:
    for section in _algorithms(data):
        precision = section.get("initializer", {}).get("precision")
        if precision is not None:
            return precision
    return None


def _small(data: dict) -> dict:
    """The config with the cheap overrides of the module docstring."""
    data = copy.deepcopy(data)
    for section in _algorithms(data):
        init = section.get("initializer", {})
        if "range" in init:
            init["range"]["num_init_samples"] = min(init["range"].get("num_init_samples", 4), 4)
        if "batchnorm_adaptation" in init:
            init["batchnorm_adaptation"]["num_bn_adaptation_samples"] = 4
        precision = init.get("precision")
        if precision is not None and precision["type"] == "hawq":
            precision.update(num_data_points=2, iter_number=1)
        if precision is not None and precision["type"] == "autoq":
            precision.update(iter_number=2, warmup_iter_number=1)
    return data


def build_model(data: dict) -> tuple[nn.Module, dict]:
    """The model the config names (small variant where documented) and its small ``input_info``."""
    name = data["model"]
    classes = data.get("num_classes")
    if name.startswith("ssd300"):
        model_py = _load_module("object_detection/model.py", "od_model_for_configs")
        return model_py.SSD300(classes or 21, width=0.125), {"sample_size": [1, 3, 300, 300]}
    if name in ("unet", "icnet"):
        models_py = _load_module("semantic_segmentation/models.py", "ss_models_for_configs")
        model = models_py.build_segmentation_model(name, classes or 11, width=16 if name == "unet" else 8)
        return model, {"sample_size": [1, 3, 64, 64]}
    if name.startswith("bert"):
        transformers = pytest.importorskip("transformers")
        small = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=37, max_position_embeddings=64, num_labels=classes or 2)
        squad = "squad" in data.get("dataset", "")
        model = (transformers.BertForQuestionAnswering if squad else transformers.BertForSequenceClassification)(small)
        info = [dict(entry, sample_size=[1, 16]) for entry in data["input_info"]]
        return model, info
    import torchvision

    kwargs = {"aux_logits": False, "init_weights": False} if name == "inception_v3" else {}
    model = torchvision.models.get_model(name, weights=None, num_classes=classes or 1000, **kwargs)
    size = 75 if name == "inception_v3" else 32
    return model, {"sample_size": [1, 3, size, size]}


def _batches(info, classes: int) -> list:
    """Two random batches of two samples in the form the model takes."""
    gen = torch.Generator().manual_seed(0)
    if isinstance(info, list):  # keyword token inputs
        return [{entry["keyword"]: torch.randint(0, 2 if entry["keyword"] != "input_ids" else 64,
                                                   [2, *entry["sample_size"][1:]], generator=gen)
                 for entry in info} for _ in range(2)]
    shape = [2, *info["sample_size"][1:]]
    return [(torch.rand(shape, generator=gen), torch.randint(0, classes, (2,), generator=gen)) for _ in range(2)]


def _first_tensor(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return _first_tensor(out[0])
    if hasattr(out, "logits"):
        return out.logits
    if hasattr(out, "start_logits"):
        return out.start_logits
    raise TypeError(f"unexpected model output {type(out).__name__}")


def _call(fn, batch):
    return fn(**batch) if isinstance(batch, dict) else fn(batch[0])


def _top1(model_apply, loader) -> float:
    """AutoQ's metric for the build: top-1 agreement with the labels of the batches."""
    hits = total = 0
    for x, y in loader:
        hits += int((_first_tensor(model_apply(x)).argmax(1) == y).sum())
        total += len(y)
    return 100.0 * hits / total


def _cases():
    for path in CONFIGS:
        data = json.loads(path.read_text())
        precision = _precision(data)
        heavy = (precision is not None and data.get("model") in HEAVY) or data.get("model") in SLOW_MODELS \
            or path.stem in SLOW_CONFIGS
        yield pytest.param(path, id=path.stem, marks=[pytest.mark.slow] if heavy else [])


def test_there_are_configs_for_every_algorithm_of_the_paper_tables():
    names = {p.stem for p in CONFIGS}
    for expected in ("resnet50_imagenet_int8", "inception_v3_imagenet_int8", "mobilenet_v2_imagenet_int8",
                     "resnet50_imagenet_rb_sparsity_int8", "resnet18_imagenet_binarization_xnor",
                     "resnet18_imagenet_binarization_dorefa", "resnet50_imagenet_pruning_geometric_median",
                     "resnet50_imagenet_mixed_int_hawq", "resnet50_imagenet_mixed_int_autoq",
                     "bert_base_chinese_xnli_int8"):
        assert expected in names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_validates_and_names_its_model(path: Path):
    config = pc.Config.from_json(path)
    assert isinstance(config["model"], str) and config["model"]
    assert "input_info" in config and "compression" in config
    stem = re.sub(r"[^a-z0-9]+", "_", config["model"].lower())
    # <model>_<dataset>_<algorithm>; the BERT names shorten the HuggingFace id
    assert path.stem.split("_")[0] == stem.split("_")[0], (path.stem, config["model"])


@pytest.mark.parametrize("path", list(_cases()))
def test_config_builds_a_compressed_model_that_runs(path: Path):
    data = json.loads(path.read_text())
    torch.manual_seed(0)
    model, info = build_model(data)
    model.eval()
    small = _small(data)
    small["input_info"] = info
    classes = data.get("num_classes") or 2
    batches = _batches(info, classes)
    with torch.no_grad():
        reference = _first_tensor(_call(model, batches[0]))
    precision = _precision(small)
    if precision is not None and precision["type"] == "autoq":
        # the front door takes no metric, so AutoQ is built through CompressionConfig.method
        cconfig = pc.load_config(small)
        method = cconfig.method(eval_fn=_top1, eval_data=batches)
        graph = cconfig.trace(model)
        params = dict(model.named_parameters()) | {k: v.clone() for k, v in model.named_buffers()}
        state = method.init(graph, params, batches)
        weight_bits = {q.bits for q in state.weights.values()}
        assert weight_bits <= set(precision["bits"])

        def run(*args, **kwargs):
            return pc.apply(model, method, params, state, *args, **kwargs)
    else:
        config = pc.register_default_init_args(pc.Config.from_dict(small), batches, nn.CrossEntropyLoss())
        ctrl, module = pc.create_compressed_model(model, config)
        module.eval()
        state = module.state
        run = module
    leaves = [t for t in tree_flatten(state)[0] if isinstance(t, torch.Tensor)]
    assert leaves, "the config placed no compression"
    with torch.no_grad():
        out = _first_tensor(_call(run, batches[0]))
    assert out.shape == reference.shape
    assert all(math.isfinite(v) for v in out.flatten().tolist())
