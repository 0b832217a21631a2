"""The digits demo's INT8 QAT + 50% magnitude sparsity as a pure ``torch.func`` training loop.

    python examples/functional_loop.py [--dataset digits|mnist] [--epochs 30] [--qat-epochs 12]
        [--optimizer adam|sgd] [--lr 3e-4] [--max-steps N]

No ``torch.optim`` object and no ``.backward()``: the weights θ and the trainable leaves φ of the
compression state (quantizer ranges) are flat lists of tensors (``pc.struct.tree_flatten``), and
one step is a function of values only:

    (g_θ, g_φ), (L, buffers') = grad_and_value(loss)(θ, φ; frozen, buffers, x, y)
    L = cross_entropy(apply(model, method, θ ∪ buffers, state(φ, frozen), x), y) + method.loss
    SGD:  θ' = θ - lr g
    Adam: m' = β1 m + (1-β1) g,  v' = β2 v + (1-β2) g²,  θ' = θ - lr m'/(1-β1^t) / (sqrt(v'/(1-β2^t)) + ε)
    state' = method.step(state(φ', frozen), Progress(t), θ')

BatchNorm's running statistics (buffers) are cloned inside the loss and returned as its auxiliary
output, so the step never mutates its inputs. The FP32 network is trained with the same loop
(``pc.identity()``), then compressed (the demo's ``sparse_int8_method``), evaluated, exported with
``pc.export.to_onnx`` and run in onnxruntime.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from digits_demo import sparse_int8_method
from torch import Tensor, nn
from tqdm.auto import tqdm

import purecomp as pc
from purecomp import export

from common import accuracy, digits_cnn, load_dataset, loader, onnx_session


@dataclasses.dataclass(frozen=True)
class Split:
    """Compressed-model values as flat lists: trainable leaves, the rest, and how to rebuild."""

    weights: list[Tensor]  # θ (model parameters) then φ (trainable state leaves)
    frozen: list  # non-trainable state leaves (masks, statics) in state order, None where trainable
    buffers: dict[str, Tensor]
    n_params: int
    param_names: tuple[str, ...]
    param_spec: object
    state_spec: object
    trainable: tuple[bool, ...]  # per state leaf

    def params(self, weights: list[Tensor], buffers: dict[str, Tensor]) -> dict[str, Tensor]:
        return pc.struct.tree_unflatten(self.param_spec, weights[: self.n_params]) | buffers

    def state(self, weights: list[Tensor]):
        it = iter(weights[self.n_params:])
        leaves = [next(it) if t else f for t, f in zip(self.trainable, self.frozen)]
        return pc.struct.tree_unflatten(self.state_spec, leaves)


def split(model: nn.Module, params: dict[str, Tensor], state) -> Split:
    """Flatten ``params`` and ``state``; trainable = model parameters and state leaves with
    ``requires_grad``. Every tensor is detached: gradients come from ``torch.func``, not autograd."""
    names = tuple(n for n, _ in model.named_parameters())
    p_leaves, p_spec = pc.struct.tree_flatten({n: params[n] for n in names})
    s_leaves, s_spec = pc.struct.tree_flatten(state)
    trainable = tuple(isinstance(t, Tensor) and t.requires_grad for t in s_leaves)
    detach = [t.detach() if isinstance(t, Tensor) else t for t in s_leaves]
    weights = [t.detach() for t in p_leaves] + [t for t, tr in zip(detach, trainable) if tr]
    frozen = [None if tr else t for t, tr in zip(detach, trainable)]
    buffers = {n: b.detach().clone() for n, b in params.items() if n not in names}
    return Split(weights, frozen, buffers, len(names), names, p_spec, s_spec, trainable)


def with_state(s: Split, state) -> Split:
    """``s`` with the state's leaves replaced by those of ``state`` (same structure, e.g. after ``step``)."""
    leaves, spec = pc.struct.tree_flatten(state)
    if len(leaves) != len(s.trainable):
        raise ValueError(f"the stepped state has {len(leaves)} leaves, the split {len(s.trainable)}")
    detach = [t.detach() if isinstance(t, Tensor) else t for t in leaves]
    weights = s.weights[: s.n_params] + [t for t, tr in zip(detach, s.trainable) if tr]
    frozen = [None if tr else t for t, tr in zip(detach, s.trainable)]
    return dataclasses.replace(s, weights=weights, frozen=frozen, state_spec=spec)


def make_loss(model: nn.Module, method: pc.Compression, s: Split) -> Callable:
    """``loss(weights, buffers, x, y) -> (L, (L, buffers'))``: pure in its arguments."""

    def loss(weights: list[Tensor], buffers: dict[str, Tensor], x: Tensor, y: Tensor):
        buffers = {k: v.clone() for k, v in buffers.items()}  # BatchNorm updates these copies
        params, state = s.params(weights, buffers), s.state(weights)
        value = nn.functional.cross_entropy(pc.apply(model, method, params, state, x), y)
        value = value + method.loss(params, state)
        return value, (value.detach(), buffers)

    return loss


@dataclasses.dataclass(frozen=True)
class AdamState:
    t: int
    m: list[Tensor]
    v: list[Tensor]


def adam_init(weights: list[Tensor]) -> AdamState:
    return AdamState(0, [torch.zeros_like(w) for w in weights], [torch.zeros_like(w) for w in weights])


def adam_update(weights, grads, opt: AdamState, lr: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
    """One Adam step (bias-corrected), out of place: ``(weights', opt')``."""
    t = opt.t + 1
    m = [b1 * mi + (1 - b1) * g for mi, g in zip(opt.m, grads)]
    v = [b2 * vi + (1 - b2) * g * g for vi, g in zip(opt.v, grads)]
    new = [w - lr * (mi / (1 - b1**t)) / ((vi / (1 - b2**t)).sqrt() + eps) for w, mi, vi in zip(weights, m, v)]
    return new, AdamState(t, m, v)


def sgd_update(weights, grads, opt, lr: float):
    """Plain SGD, out of place: ``(weights - lr * grads, opt)``."""
    return [w - lr * g for w, g in zip(weights, grads)], opt


UPDATES = {"adam": (adam_init, adam_update), "sgd": (lambda w: None, sgd_update)}


def train(model, method, params, state, data, epochs: int, lr: float, optimizer: str = "adam",
          max_steps: int | None = None, desc: str = "train"):
    """The functional loop; returns ``(params, state, losses)`` (one loss per step)."""
    init, update = UPDATES[optimizer]
    s = split(model, params, state)
    weights, buffers, opt = s.weights, s.buffers, init(s.weights)
    step_fn = torch.func.grad_and_value(make_loss(model, method, s), has_aux=True)
    losses: list[float] = []
    step, model_training = 0, model.training
    model.train()
    try:
        for epoch in tqdm(range(epochs), desc=desc, leave=False, disable=None):
            if max_steps is not None and step >= max_steps:
                break
            for x, y in data:
                if max_steps is not None and step >= max_steps:
                    break
                grads, (_, (value, buffers)) = step_fn(weights, buffers, x, y)
                weights, opt = update(weights, grads, opt, lr)
                step += 1
                progress = pc.Progress(step=step, epoch=epoch, steps_per_epoch=len(data))
                state = method.step(s.state(weights), progress, s.params(weights, buffers))
                s = with_state(dataclasses.replace(s, weights=weights), state)
                weights = s.weights
                losses.append(float(value))
            state = method.step(s.state(weights), pc.Progress(step=step, epoch=epoch + 1, steps_per_epoch=len(data)),
                                s.params(weights, buffers))
            s = with_state(dataclasses.replace(s, weights=weights), state)
            weights = s.weights
    finally:
        model.train(model_training)
    return s.params(weights, buffers), s.state(weights), losses


def onnx_logits(path: Path, x: Tensor) -> np.ndarray:
    session = onnx_session(path)
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="digits", choices=["digits", "mnist"])
    ap.add_argument("--epochs", type=int, default=30, help="FP32 epochs (Adam 3e-3, same loop)")
    ap.add_argument("--qat-epochs", type=int, default=12, help="INT8 + 50%% sparsity epochs")
    ap.add_argument("--optimizer", default="adam", choices=sorted(UPDATES))
    ap.add_argument("--lr", type=float, default=3e-4, help="compression fine-tuning learning rate")
    ap.add_argument("--max-steps", type=int, default=None, help="stop each phase after this many steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="ONNX directory (default: a temporary one)")
    args = ap.parse_args(argv)
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    train_set, test_set = load_dataset(args.dataset)
    data, test = loader(train_set, 64, True, args.seed), loader(test_set, 256, False)
    model = digits_cnn()
    fp32_params = dict(model.named_parameters()) | dict(model.named_buffers())
    fp32_params, _, fp32_losses = train(model, pc.identity(), fp32_params, (), data, args.epochs, 3e-3,
                                        "adam", args.max_steps, "FP32")
    model.eval()
    fp32 = accuracy(lambda x: pc.apply(model, pc.identity(), fp32_params, (), x), test)

    method = sparse_int8_method(args.qat_epochs)
    example = train_set.tensors[0][:2]
    graph = pc.trace(model, (example,))
    state = method.init(graph, fp32_params, data)  # calibrated with the FP32 params in eval mode
    params, state, losses = train(model, method, fp32_params, state, data, args.qat_epochs, args.lr,
                                  args.optimizer, args.max_steps, "INT8 + 50% sparsity")
    model.eval()

    def forward(x):
        return pc.apply(model, method, params, state, x)

    compressed = accuracy(forward, test)
    out_dir = args.out or Path(tempfile.mkdtemp(prefix="purecomp-functional-"))
    path = export.to_onnx(model, method, params, state, (example,), out_dir / "digits_functional.onnx")
    x_test, y_test = test_set.tensors
    ort = onnx_logits(path, x_test)
    with torch.no_grad():
        ref = forward(x_test).numpy()
    ort_acc = 100.0 * float((ort.argmax(1) == y_test.numpy()).mean())
    level = pc.statistics(graph, state)["sparsity"].rows[-1]["sparsity"]
    result = dict(fp32=fp32, compressed=compressed, onnx=ort_acc, sparsity=level, fp32_losses=fp32_losses,
                  losses=losses, max_abs_diff=float(np.abs(ort - ref).max()),
                  argmax_agreement=float((ort.argmax(1) == ref.argmax(1)).mean()), path=path,
                  model=copy.deepcopy(model), method=method, params=params, state=state)
    print(f"dataset {args.dataset}; {len(fp32_losses)} FP32 steps, {len(losses)} compression steps "
          f"({args.optimizer}, lr {args.lr}); sparsity {level:.3f}")
    print(f"FP32 {fp32:.2f}%  INT8 + 50% sparsity {compressed:.2f}% (PyTorch), {ort_acc:.2f}% (ONNX Runtime); "
          f"max |ORT - pc.apply| logit {result['max_abs_diff']:.2e}; time {time.perf_counter() - started:.0f} s")
    return result


if __name__ == "__main__":
    main()
