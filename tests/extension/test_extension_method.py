"""A method defined outside purecomp (``ternary.py``) runs end to end through the public
extension points: a JSON config, the front door, training, statistics, a checkpoint loaded with
``weights_only=True``, ``materialize`` and ONNX in onnxruntime. Nothing in ``purecomp/`` names it."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import purecomp as pc
from purecomp.errors import ConfigError, StateError

from ternary import Clip, TernaryState, register, ternarization

REPO = Path(__file__).resolve().parents[2]

CONFIG = {
    "input_info": {"sample_size": [2, 3, 32, 32]},
    "compression": [
        {"algorithm": "ternarization", "factor": 0.7, "start_epoch": 1, "ignored_scopes": ["conv1"]},
        {"algorithm": "magnitude_sparsity", "sparsity_init": 0.2,
         "params": {"schedule": "polynomial", "sparsity_target": 0.3, "sparsity_target_epoch": 1}},
    ],
}


@pytest.fixture(scope="module", autouse=True)
def registered():
    register()
    yield


def resnet18() -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=10)


def batches(n: int = 4, size: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(4, 3, size, size, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(n)]


def test_core_modules_import_no_method():
    """stats, export, api, checkpoint and config know no method: grep finds no import of transforms."""
    files = [REPO / "purecomp" / name for name in ("stats.py", "api.py", "checkpoint.py", "config.py")]
    files += sorted((REPO / "purecomp" / "export").glob("*.py"))
    offenders = [str(f.relative_to(REPO)) for f in files if "purecomp.transforms" in f.read_text()
                 or "from ..transforms" in f.read_text() or "from .transforms" in f.read_text()]
    assert offenders == []


def test_config_validation_uses_the_registered_schema():
    bad = {**CONFIG, "compression": [{"algorithm": "ternarization", "factor": -1.0}]}
    with pytest.raises(ConfigError, match=r"compression\[0\]\.factor"):
        pc.Config.from_dict(bad)
    unknown = {**CONFIG, "compression": [{"algorithm": "ternarization", "bits": 2}]}
    with pytest.raises(ConfigError, match=r"compression\[0\]\.bits"):
        pc.Config.from_dict(unknown)


def test_register_algorithm_rejects_bad_schemas_and_taken_names():
    with pytest.raises(ConfigError, match="names no definition"):
        pc.register_algorithm("broken", lambda s, o: ternarization(), schema={"$ref": "#/$defs/nothing"})
    with pytest.raises(ConfigError, match="already registered"):
        pc.register_algorithm("ternarization", lambda s, o: ternarization())
    with pytest.raises(ConfigError, match="state_classes"):
        pc.register_algorithm("broken", lambda s, o: ternarization(), state_classes=(int,))


def train(ctrl, module, data, epochs: int, optimizer) -> list[float]:
    losses = []
    criterion = nn.CrossEntropyLoss()
    for _ in range(epochs):
        ctrl.scheduler.epoch_step()
        for x, y in data:
            ctrl.scheduler.step()
            loss = criterion(module(x), y) + ctrl.loss()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    return losses


@pytest.mark.slow
def test_a_method_from_outside_runs_end_to_end(tmp_path):
    data = batches()
    config = pc.register_default_init_args(pc.Config.from_dict(CONFIG), data)
    ctrl, module = pc.create_compressed_model(resnet18(), config)
    state = ctrl.state
    assert isinstance(state[0], TernaryState) and not state[0].enabled
    assert ctrl.compression_stage() == pc.CompressionStage.PARTIALLY_COMPRESSED
    assert "layer1.0.conv1/conv2d#0:in0" in state[0].clips and not any(k.startswith("conv1/") for k in state[0].clips)
    # the clip bounds are trainable parameters of the front door, named by their state path
    names = dict(module.named_parameters())
    clip_name = "compression.ternarization.clips.layer1.0.conv1/conv2d#0:in0.bound"
    assert clip_name in names
    optimizer = torch.optim.SGD(module.parameters(), lr=0.01, momentum=0.9)
    before = names[clip_name].detach().clone()
    train(ctrl, module, data, 2, optimizer)
    state = ctrl.state
    assert state[0].enabled and ctrl.compression_stage() == pc.CompressionStage.FULLY_COMPRESSED
    assert dict(module.named_parameters())[clip_name] is names[clip_name]  # the optimizer's tensor
    assert not torch.equal(names[clip_name].detach(), before)  # it trained

    # weights the method ternarizes take three values per output channel
    w = ctrl.method.params(module.model_params(), state)["layer1.0.conv1.weight"]
    assert all(len(torch.unique(row)) <= 3 for row in w.detach().reshape(w.shape[0], -1))

    report = ctrl.statistics()
    assert len(report["ternarization"]) == len(state[0].clips)
    assert len(report["sparsity"]) > 0

    # checkpoint: tensors and strings only, loadable with weights_only=True, bit-exact
    buffer = io.BytesIO()
    torch.save(ctrl.get_compression_state(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    ctrl2, module2 = pc.create_compressed_model(resnet18(), pc.Config.from_dict(CONFIG), compression_state=saved)
    module2.model.load_state_dict(module.model.state_dict())
    for (name, a), (name2, b) in zip(module.state_dict().items(), module2.state_dict().items()):
        assert name == name2 and torch.equal(a, b)
    path = pc.save_state(tmp_path / "ternary.safetensors", state)
    again = pc.load_state(path)
    assert isinstance(again[0], TernaryState) and isinstance(again[0].clips["layer1.0.conv1/conv2d#0:in0"], Clip)

    # materialize computes what apply computes; ONNX runs it in onnxruntime
    x = batches(1)[0][0]
    module.eval()
    with torch.no_grad():
        expected = module(x)
        stripped = ctrl.strip()
        assert torch.allclose(stripped(x), expected, atol=1e-4, rtol=1e-4)
    onnx_path = ctrl.export_model(tmp_path / "ternary.onnx", (x,))
    import onnx
    import onnxruntime as ort

    ops = {node.op_type for node in onnx.load(str(onnx_path)).graph.node}
    assert {"DequantizeLinear", "Clip"} <= ops
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    np.testing.assert_allclose(out, expected.numpy(), atol=1e-3, rtol=1e-3)


def test_an_unregistered_state_class_is_refused(tmp_path):
    """A checkpoint naming a class nobody registered is refused, and nothing is imported."""
    code = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
import torch, purecomp as pc
from purecomp.errors import StateError
from ternary import Clip
path = {str(tmp_path / 'clip.safetensors')!r}
pc.save_state(path, (Clip(torch.ones(())),))
try:
    pc.load_state(path)
except StateError as exc:
    assert "not a purecomp class" in str(exc), exc
    print("refused")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "refused"
    assert StateError  # the same error class, raised in the child process
