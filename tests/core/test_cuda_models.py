"""Every algorithm's config on a torchvision model on the GPU (GPU machines only; skipped elsewhere).

NNCF-style front door: ``register_default_init_args`` with CUDA batches, ``create_compressed_model``
(``input_info`` traced on the model's device), one training step with ``ctrl.loss()``, an eval
forward. The compression state must live on the GPU and the fake quantizers take the CUDA kernels.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import purecomp as pc
from purecomp.ops import record_paths

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (none here; these tests run on GPU machines)", allow_module_level=True)

CUDA = torch.device("cuda")
CONFIGS = Path(__file__).resolve().parents[2] / "examples" / "configs"
SAMPLE_CONFIGS = [
    "resnet18_int8",
    "resnet18_imagenet_binarization_xnor",
    "resnet18_imagenet_pruning_geometric_median",
    "mobilenet_v2_imagenet_mixed_int_hawq",
    "mobilenet_v2_imagenet_rb_sparsity_int8",
    "mobilenet_v3_small_imagenet_int8",
]
RANGE_TYPES = ["min_max", "mean_min_max", "threesigma", "percentile", "mean_percentile"]


def small(section: dict) -> dict:
    """The config section with few calibration samples and HAWQ probes."""
    init = section.get("initializer", {})
    if "range" in init:
        init["range"]["num_init_samples"] = 16
    if "batchnorm_adaptation" in init:
        init["batchnorm_adaptation"]["num_bn_adaptation_samples"] = 16
    if "precision" in init:
        init["precision"].update(num_data_points=8, iter_number=2)
    return section


def run_on_cuda(arch: str, compression: dict | list) -> tuple[torch.Tensor, list[str], nn.Module]:
    torch.manual_seed(0)
    data = [(torch.randn(8, 3, 64, 64, device=CUDA), torch.randint(0, 10, (8,), device=CUDA)) for _ in range(2)]
    sections = [small(s) for s in compression] if isinstance(compression, list) else small(compression)
    config = pc.Config.from_dict({"input_info": {"sample_size": [1, 3, 64, 64]}, "compression": sections})
    config = pc.register_default_init_args(config, data, nn.CrossEntropyLoss())
    model = getattr(torchvision.models, arch)(weights=None, num_classes=10).to(CUDA)
    with record_paths() as paths:
        ctrl, module = pc.create_compressed_model(model, config)
        module.train()
        opt = torch.optim.SGD(module.parameters(), lr=1e-3)
        ctrl.scheduler.epoch_step()
        ctrl.scheduler.step()
        loss = nn.functional.cross_entropy(module(data[0][0]), data[0][1]) + ctrl.loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        module.eval()
        with torch.no_grad():
            out = module(data[1][0])
    assert torch.isfinite(loss) and out.is_cuda and torch.isfinite(out).all()
    return out, paths, module


@pytest.mark.parametrize("name", SAMPLE_CONFIGS)
def test_sample_config_trains_on_cuda(name):
    config = json.loads((CONFIGS / f"{name}.json").read_text())
    _, paths, module = run_on_cuda(config["model"], config["compression"])
    assert "cpp" not in paths  # nothing fell back to CPU kernels
    if "int8" in name or "hawq" in name:
        assert "cuda" in paths
    parameters = [p for p in module.parameters() if p.requires_grad]
    assert all(p.is_cuda for p in parameters)


@pytest.mark.parametrize("range_type", RANGE_TYPES)
def test_every_range_init_type_on_cuda(range_type):
    section = {"algorithm": "quantization", "initializer": {"range": {"type": range_type}}}
    _, paths, module = run_on_cuda("resnet18", section)
    assert set(paths) == {"cuda"}
    assert all(t.is_cuda for t in module.state_dict().values() if isinstance(t, torch.Tensor))
