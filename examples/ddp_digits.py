"""Distributed (DDP, gloo on CPU) compressed training through the NNCF-style front door.

    torchrun --nproc_per_node=2 examples/ddp_digits.py [--epochs 10]

Each rank trains the digits CNN with INT8 quantization and 50% magnitude sparsity on its
shard of the training set (DistributedSampler). ``ctrl.distributed()`` makes
``initialize`` broadcast rank 0's calibrated state, so every rank starts from identical
quantizers and masks; DDP keeps them identical. Rank 0 checks that, evaluates and exports.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

import purecomp as pc

from common import accuracy, digits_cnn, load_digits_split, onnx_accuracy

CONFIG = {
    "input_info": {"sample_size": [1, 1, 8, 8]},
    "compression": [
        {"algorithm": "magnitude_sparsity", "params": {"schedule": "polynomial", "sparsity_target": 0.5,
                                                       "sparsity_target_epoch": 4, "sparsity_freeze_epoch": 6}},
        {"algorithm": "quantization", "initializer": {"range": {"num_init_samples": 256}}},
    ],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epochs", type=int, default=10)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    torch.manual_seed(rank)  # ranks start different on purpose: the broadcast makes them equal
    train_set, test_set = load_digits_split()
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, seed=0)
    loader = DataLoader(train_set, batch_size=32, sampler=sampler)
    ctrl, module = pc.create_compressed_model(digits_cnn(), pc.Config.from_dict(CONFIG))
    ctrl.distributed()
    ctrl.initialize(loader)
    model = nn.parallel.DistributedDataParallel(module)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        ctrl.scheduler.epoch_step()
        model.train()
        for x, y in loader:
            ctrl.scheduler.step()
            loss = nn.functional.cross_entropy(model(x), y) + ctrl.loss()
            opt.zero_grad()
            loss.backward()
            opt.step()
    state = {k: v for k, v in module.state_dict().items() if k.startswith("compression.")}
    gathered: list = [None] * world
    dist.all_gather_object(gathered, state)
    if rank == 0:
        same = all(torch.equal(gathered[0][k], other[k]) for other in gathered[1:] for k in state)
        module.eval()
        test = DataLoader(test_set, batch_size=256)
        path = ctrl.export_model(Path(tempfile.mkdtemp(prefix="purecomp-ddp-")) / "digits_ddp.onnx")
        print(ctrl.statistics()["sparsity"].rows[-1])
        print(f"{world} ranks; compression state identical on all ranks: {same}")
        print(f"accuracy (PyTorch) {accuracy(module, test):.2f}%, (ONNX Runtime) {onnx_accuracy(path, test):.2f}%")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
