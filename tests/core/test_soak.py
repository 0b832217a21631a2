"""Soak: 1,000 QAT steps of a small residual network with RB sparsity + INT8 through the front door.

The config's schedule crosses its transitions inside the run (``scheduler.epoch_step()`` every 100
steps: the sparsity target is reached at epoch 4, the masks freeze at epoch 7). Checked:

- no NaN or inf in any loss, weight or compression-state tensor;
- resident memory (VmRSS) grows by less than 5% from step 100 (after warm-up) to step 1,000;
- the state at step 1,000 is bit-identical to that of a run resumed at step 500 from a checkpoint
  (model + compression tensors, optimizer state, ``ctrl.get_compression_state()``) written with
  ``torch.save`` and read back with ``torch.load(weights_only=True)``; the data order is a function
  of the epoch, and RB sparsity's gate noise is carried in its state.

The measured numbers are printed (``-s`` shows them); docs/reliability.md records a run.
"""

from __future__ import annotations

import gc
import math
import time
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import purecomp as pc

pytestmark = pytest.mark.slow

STEPS, STEPS_PER_EPOCH, RESUME_AT, WARMUP, BATCH = 1000, 100, 500, 100, 8
CONFIG = {
    "input_info": {"sample_size": [BATCH, 1, 16, 16]},
    "compression": [
        {"algorithm": "rb_sparsity", "sparsity_init": 0.05,
         "params": {"schedule": "polynomial", "sparsity_target": 0.5, "sparsity_target_epoch": 4,
                    "sparsity_freeze_epoch": 7}},
        {"algorithm": "quantization", "initializer": {"range": {"num_init_samples": 64},
                                                      "batchnorm_adaptation": {"num_bn_adaptation_samples": 64}}},
    ],
}


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.down is None else self.down(x)
        return F.relu(out + identity)


def resnet_small() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(
        stem=nn.Conv2d(1, 8, 3, 1, 1, bias=False), bn=nn.BatchNorm2d(8), relu=nn.ReLU(),
        layer1=Block(8, 8, 1), layer2=Block(8, 16, 2), layer3=Block(16, 16, 1),
        pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), fc=nn.Linear(16, 10),
    ))


def digits16() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    return (x - 0.3) / 0.4, torch.tensor(d.target, dtype=torch.long)


def epoch_batches(x: torch.Tensor, y: torch.Tensor, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The batches of one epoch: a permutation that depends on the epoch only."""
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(1000 + epoch))
    return [(x[order[i * BATCH:(i + 1) * BATCH]], y[order[i * BATCH:(i + 1) * BATCH]]) for i in range(STEPS_PER_EPOCH)]


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def finite_tree(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if torch.is_tensor(t) and t.is_floating_point())


def build(data, compression_state=None):
    config = pc.register_default_init_args(pc.Config.from_dict(CONFIG), data)
    ctrl, module = pc.create_compressed_model(resnet_small(), config, compression_state=compression_state)
    opt = torch.optim.SGD(module.parameters(), lr=0.02, momentum=0.9, weight_decay=1e-4)
    return ctrl, module, opt


def train(ctrl, module, opt, x, y, first_epoch: int, last_epoch: int, watch: dict | None = None) -> list[float]:
    losses = []
    module.train()
    for epoch in range(first_epoch, last_epoch):
        ctrl.scheduler.epoch_step()
        for xb, yb in epoch_batches(x, y, epoch):
            ctrl.scheduler.step()
            loss = F.cross_entropy(module(xb), yb) + ctrl.loss()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            assert math.isfinite(losses[-1]), f"loss {losses[-1]} at step {len(losses)} of epoch {epoch}"
            step = epoch * STEPS_PER_EPOCH + (len(losses) - 1) % STEPS_PER_EPOCH + 1
            if watch is not None and step in watch:
                gc.collect()
                watch[step] = rss_kib()
        assert finite_tree(module.state_dict().values()), f"non-finite weight or state after epoch {epoch}"
    return losses


def compression_state_equal(a: dict, b: dict) -> list[str]:
    diffs = [k for k in a if k != "tensors" and a[k] != b[k]]
    if len(a["tensors"]) != len(b["tensors"]):
        return diffs + ["tensors (count)"]
    return diffs + [f"tensors[{i}]" for i, (s, t) in enumerate(zip(a["tensors"], b["tensors"]))
                    if s.dtype != t.dtype or not torch.equal(s, t)]


def optimizer_state_equal(a: dict, b: dict) -> list[str]:
    diffs = [] if a["param_groups"] == b["param_groups"] else ["param_groups"]
    if a["state"].keys() != b["state"].keys():
        return diffs + ["state keys"]
    for k in a["state"]:
        for name, v in a["state"][k].items():
            w = b["state"][k][name]
            if not (torch.equal(v, w) if torch.is_tensor(v) else v == w):
                diffs.append(f"state[{k}].{name}")
    return diffs


def test_soak_1000_qat_steps_rb_sparsity_int8(tmp_path):
    started = time.perf_counter()
    x, y = digits16()
    calibration = [(x[i:i + BATCH], y[i:i + BATCH]) for i in range(0, 64, BATCH)]
    watch = {WARMUP: 0, STEPS: 0}

    # the long run, with a checkpoint at step 500
    ctrl, module, opt = build(calibration)
    epochs, resume_epoch = STEPS // STEPS_PER_EPOCH, RESUME_AT // STEPS_PER_EPOCH
    losses = train(ctrl, module, opt, x, y, 0, resume_epoch, watch)
    torch.save({"model": module.state_dict(), "optimizer": opt.state_dict(),
                "compression": ctrl.get_compression_state()}, tmp_path / "step500.pt")
    losses += train(ctrl, module, opt, x, y, resume_epoch, epochs, watch)
    assert len(losses) == STEPS
    assert ctrl.state[0].frozen, "the masks should have frozen at epoch 7"
    assert ctrl.compression_stage() == pc.CompressionStage.FULLY_COMPRESSED
    final = {"model": module.state_dict(), "optimizer": opt.state_dict(), "compression": ctrl.get_compression_state()}
    assert finite_tree(final["compression"]["tensors"])
    growth = (watch[STEPS] - watch[WARMUP]) / watch[WARMUP]
    long_run_s = time.perf_counter() - started

    # the resumed run: a fresh model, everything from the checkpoint, the last 500 steps again
    saved = torch.load(tmp_path / "step500.pt", weights_only=True)
    ctrl2, module2, opt2 = build(calibration, compression_state=saved["compression"])
    module2.load_state_dict(saved["model"])
    opt2 = torch.optim.SGD(module2.parameters(), lr=0.02, momentum=0.9, weight_decay=1e-4)
    opt2.load_state_dict(saved["optimizer"])
    resumed_losses = train(ctrl2, module2, opt2, x, y, resume_epoch, epochs)
    assert resumed_losses == losses[RESUME_AT:]
    a, b = final["model"], module2.state_dict()
    assert a.keys() == b.keys()
    assert not [k for k in a if not torch.equal(a[k], b[k])]
    assert not optimizer_state_equal(final["optimizer"], opt2.state_dict())
    assert not compression_state_equal(final["compression"], ctrl2.get_compression_state())

    print(f"\nsoak: {STEPS} steps, loss first/last 20 {sum(losses[:20]) / 20:.3f} / {sum(losses[-20:]) / 20:.3f}; "
          f"RSS step {WARMUP} {watch[WARMUP] / 1024:.1f} MiB, step {STEPS} {watch[STEPS] / 1024:.1f} MiB, "
          f"growth {100 * growth:+.2f}%; long run {long_run_s:.0f} s, total {time.perf_counter() - started:.0f} s")
    assert growth < 0.05, f"RSS grew {100 * growth:.1f}% from step {WARMUP} to {STEPS}"
    assert sum(losses[-100:]) / 100 < sum(losses[:100]) / 100  # it trained
