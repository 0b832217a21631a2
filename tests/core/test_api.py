"""The NNCF-style front door: five-line integration, NNCF configs, checkpoints (bit-exact resume,
specific errors), the functional save/load, and 2-process DDP with identical compression state."""

from __future__ import annotations

import copy
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import purecomp as pc
from purecomp.checkpoint import encode_state
from purecomp.errors import CalibrationError, ConfigError, StateError

from models import torchvision_model

SIZE = 32


def batches(n: int = 3, seed: int = 0, batch: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, SIZE, SIZE, generator=gen), torch.randint(0, 10, (batch,), generator=gen))
            for _ in range(n)]


def resnet18() -> nn.Module:
    model, _ = torchvision_model("resnet18")
    return model.train()


INT8_RB = {
    "input_info": {"sample_size": [1, 3, SIZE, SIZE]},
    "compression": [
        {"algorithm": "rb_sparsity", "sparsity_init": 0.02,
         "params": {"schedule": "polynomial", "sparsity_target": 0.3, "sparsity_target_epoch": 2,
                    "sparsity_freeze_epoch": 3}},
        {"algorithm": "quantization", "initializer": {"range": {"num_init_samples": 8}}},
    ],
}


def train(ctrl, module, opt, data, epochs: int, start_epoch: int = 0, skip_steps: int = 0, stop_after: int | None = None):
    """NNCF's loop: epoch_step at each epoch start, step before each batch."""
    done = 0
    for _ in range(start_epoch, epochs):
        if skip_steps == 0:
            ctrl.scheduler.epoch_step()
        for i, (x, y) in enumerate(data):
            if skip_steps:
                if i < skip_steps:
                    continue
                skip_steps = 0
            ctrl.scheduler.step()
            loss = nn.functional.cross_entropy(module(x), y) + ctrl.loss()
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
            if stop_after is not None and done == stop_after:
                return


# ---------------------------------------------------------------- five lines


@pytest.mark.slow
def test_five_line_integration_trains_and_exports(tmp_path):
    import onnxruntime as ort

    data = batches()
    config = pc.register_default_init_args(pc.Config.from_dict(INT8_RB), data, nn.CrossEntropyLoss())
    ctrl, module = pc.create_compressed_model(resnet18(), config)
    opt = torch.optim.SGD(module.parameters(), lr=1e-2)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    train(ctrl, module, opt, data, epochs=2)
    after = module.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("compression."))
    assert "quantizers" in str(ctrl.statistics())
    assert ctrl.compression_stage() == pc.CompressionStage.PARTIALLY_COMPRESSED  # 0.3 is reached at epoch 2
    path = ctrl.export_model(tmp_path / "model.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = data[0][0]
    assert session.run(None, {session.get_inputs()[0].name: x.numpy()})[0].shape == (4, 10)
    assert isinstance(ctrl.strip(), nn.Module)


def test_initialize_needs_data():
    ctrl, module = pc.create_compressed_model(resnet18(), pc.Config.from_dict(INT8_RB))
    with pytest.raises(StateError, match="initialize"):
        module(batches(1)[0][0])
    with pytest.raises(CalibrationError, match="needs a data loader"):
        ctrl.initialize()


# ---------------------------------------------------------------- NNCF config files

NNCF_CONFIGS = {
    "quantization": {
        "model": "resnet18", "pretrained": False, "batch_size": 4, "epochs": 1,
        "input_info": {"sample_size": [1, 3, SIZE, SIZE]},
        "compression": {"algorithm": "quantization",
                        "initializer": {"range": {"num_init_samples": 8, "type": "min_max"},
                                        "batchnorm_adaptation": {"num_bn_adaptation_samples": 8}},
                        "weights": {"mode": "symmetric", "bits": 8, "per_channel": True},
                        "activations": {"mode": "asymmetric", "bits": 8}},
    },
    "magnitude_sparsity": {
        "model": "resnet18", "input_info": {"sample_size": [1, 3, SIZE, SIZE]},
        "compression": {"algorithm": "magnitude_sparsity", "sparsity_init": 0.1,
                        "params": {"schedule": "multistep", "multistep_steps": [1, 2],
                                   "multistep_sparsity_levels": [0.1, 0.3, 0.5]},
                        "ignored_scopes": ["fc"]},
    },
    "filter_pruning": {
        "model": "resnet18", "input_info": {"sample_size": [1, 3, SIZE, SIZE]},
        "compression": {"algorithm": "filter_pruning", "pruning_init": 0.1,
                        "params": {"schedule": "exponential", "pruning_target": 0.4, "pruning_steps": 3,
                                   "weight_importance": "geometric_median"}},
    },
    "binarization": {
        "model": "resnet18", "input_info": {"sample_size": [1, 3, SIZE, SIZE]},
        "compression": {"algorithm": "binarization", "mode": "xnor",
                        "params": {"activations_quant_start_epoch": 0, "weights_quant_start_epoch": 1,
                                   "lr_poly_drop_start_epoch": 1, "lr_poly_drop_duration_epochs": 1,
                                   "disable_wd_start_epoch": 1},
                        "ignored_scopes": ["conv1", "fc", "layer2.0.downsample", "layer3.0.downsample",
                                           "layer4.0.downsample"]},
    },
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(NNCF_CONFIGS))
def test_nncf_config_files_load_and_run(name, tmp_path):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(NNCF_CONFIGS[name]))
    data = batches(2)
    config = pc.register_default_init_args(pc.Config.from_json(path), data, nn.CrossEntropyLoss())
    ctrl, module = pc.create_compressed_model(resnet18(), config)
    opt = torch.optim.SGD(module.parameters(), lr=1e-3)
    train(ctrl, module, opt, data, epochs=2)
    assert torch.isfinite(module(data[0][0])).all()


def test_unimplemented_nncf_key_is_named():
    cfg = copy.deepcopy(NNCF_CONFIGS["binarization"])
    cfg["compression"]["params"]["batch_multiplier"] = 4  # the training loop's business: a warning
    with pytest.warns(pc.errors.NoEffectWarning, match=r"compression\.params\.batch_multiplier.*no effect"):
        pc.Config.from_dict(cfg)
    cfg = copy.deepcopy(NNCF_CONFIGS["binarization"])
    cfg["compression"]["compression_lr_multiplier"] = 10  # it would change training: an error
    with pytest.raises(ConfigError) as info:
        pc.Config.from_dict(cfg)
    assert info.value.path == "compression.compression_lr_multiplier"


# ---------------------------------------------------------------- checkpoints


def _checkpoint(ctrl, module, opt, path):
    torch.save({"model": module.state_dict(), "optimizer": opt.state_dict(),
                "compression": ctrl.get_compression_state()}, path)


@pytest.mark.slow
def test_resume_mid_training_is_bit_exact(tmp_path):
    data = batches(3)
    config = pc.register_default_init_args(pc.Config.from_dict(INT8_RB), data)

    torch.manual_seed(0)
    ctrl, module = pc.create_compressed_model(resnet18(), config)
    opt = torch.optim.Adam(module.parameters(), lr=1e-3)
    initial = copy.deepcopy(module.state_dict())
    train(ctrl, module, opt, data, epochs=3)
    reference = module.state_dict()

    ctrl_a, module_a = pc.create_compressed_model(resnet18(), pc.Config.from_dict(INT8_RB))
    module_a.model.load_state_dict({k[len("model."):]: v for k, v in initial.items() if k.startswith("model.")})
    ctrl_a.initialize(data)
    module_a.load_state_dict(initial)
    opt_a = torch.optim.Adam(module_a.parameters(), lr=1e-3)
    train(ctrl_a, module_a, opt_a, data, epochs=3, stop_after=4)  # stops inside epoch 1
    _checkpoint(ctrl_a, module_a, opt_a, tmp_path / "ckpt.pt")

    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    ctrl_b, module_b = pc.create_compressed_model(resnet18(), pc.Config.from_dict(INT8_RB), saved["compression"])
    module_b.load_state_dict(saved["model"])
    opt_b = torch.optim.Adam(module_b.parameters(), lr=1e-3)
    opt_b.load_state_dict(saved["optimizer"])
    train(ctrl_b, module_b, opt_b, data, epochs=3, start_epoch=1, skip_steps=1)
    resumed = module_b.state_dict()
    assert resumed.keys() == reference.keys()
    for key in reference:
        assert torch.equal(resumed[key], reference[key]), key
    assert ctrl_b.scheduler.state_dict() == ctrl.scheduler.state_dict()


def test_mismatched_or_malformed_checkpoints_raise_and_change_nothing():
    data = batches(1)
    ctrl, module = pc.create_compressed_model(resnet18(), pc.register_default_init_args(pc.Config.from_dict(INT8_RB), data))
    saved = ctrl.get_compression_state()

    other = copy.deepcopy(INT8_RB)
    other["compression"][1]["weights"] = {"bits": 4}
    ctrl2, module2 = pc.create_compressed_model(resnet18(), pc.register_default_init_args(pc.Config.from_dict(other), data))
    before = copy.deepcopy(module2.state_dict())
    with pytest.raises(StateError, match="another config"):
        ctrl2.load_compression_state(saved)
    with pytest.raises(StateError, match="another config"):
        ctrl2.load_state_dict(ctrl.state_dict())

    import torchvision

    wider = torchvision.models.resnet18(weights=None, num_classes=100)
    with pytest.raises(StateError, match="another model: 'fc.bias'"):
        pc.create_compressed_model(wider, pc.Config.from_dict(INT8_RB), saved)

    with pytest.raises(StateError, match="missing"):
        ctrl2.load_compression_state({"config": saved["config"]})
    after = module2.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)

    ctrl3, module3 = pc.create_compressed_model(resnet18(), pc.register_default_init_args(pc.Config.from_dict(INT8_RB), data))
    before = copy.deepcopy(module3.state_dict())
    broken = dict(saved, structure=saved["structure"].replace("purecomp.transforms.quantize.quantizer", "os"))
    with pytest.raises(StateError, match="not a purecomp class"):
        ctrl3.load_compression_state(broken)
    with pytest.raises(StateError, match="holds"):
        ctrl3.load_compression_state(dict(saved, tensors=saved["tensors"][:3]))
    after = module3.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_functional_save_and_load_state_round_trip(tmp_path):
    model, x = torchvision_model("resnet18")
    graph = pc.trace(model, (x,))
    params = dict(model.named_parameters())
    method = pc.chain(pc.rb_sparsity(0.5), pc.filter_pruning(0.3), pc.quantization())
    state = method.init(graph, params, [x])
    path = pc.save_state(tmp_path / "state.safetensors", state)
    loaded = pc.load_state(path)
    assert encode_state(loaded)[0] == encode_state(state)[0]
    assert torch.equal(pc.apply(model, method, params, loaded, x), pc.apply(model, method, params, state, x))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(StateError, match="cannot read"):
        pc.load_state(tmp_path / "junk.safetensors")


# ---------------------------------------------------------------- distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        torch.manual_seed(rank)  # different weights and data on each rank before the broadcast
        import torchvision

        model = torchvision.models.resnet18(weights=None, num_classes=10).train()
        data = batches(2, seed=rank)
        config = pc.Config.from_dict(INT8_RB)
        ctrl, module = pc.create_compressed_model(model, config)
        ctrl.distributed()
        ctrl.initialize(data)  # each rank calibrates on its own data; rank 0's module wins
        after_init = {k: v.clone() for k, v in module.state_dict().items() if k.startswith("compression.")}
        ddp = nn.parallel.DistributedDataParallel(module)
        opt = torch.optim.SGD(ddp.parameters(), lr=1e-2)
        for _ in range(2):
            ctrl.scheduler.epoch_step()
            for x, y in data:
                ctrl.scheduler.step()
                loss = nn.functional.cross_entropy(ddp(x), y) + ctrl.loss()
                opt.zero_grad()
                loss.backward()
                opt.step()
        # BatchNorm running statistics stay per rank under DDP (as without compression); the
        # weights and every compression tensor must agree
        trained = {name for name, _ in module.named_parameters()} | {
            name for name, _ in module.named_buffers() if name.startswith("compression.")}
        after_steps = {k: v.clone() for k, v in module.state_dict().items() if k in trained}
        masks = {k: v.clone() for k, v in ctrl.state[0].gates().items()}
        torch.save({"init": after_init, "steps": after_steps, "masks": masks}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_process_ddp_holds_identical_compression_state(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for part in ("init", "steps", "masks"):
        assert r0[part].keys() == r1[part].keys() and r0[part]
        for key in r0[part]:
            assert torch.equal(r0[part][key], r1[part][key]), (part, key)
