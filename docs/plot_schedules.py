"""Draw docs/schedules.png: the sparsity schedules of purecomp.schedules, evaluated (not drawn by hand).

    python docs/plot_schedules.py
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import purecomp as pc  # noqa: E402
from purecomp.schedules import AdaptiveLevel, adaptive_step  # noqa: E402

EPOCHS, STEPS_PER_EPOCH = 12, 20


def main() -> None:
    init, target, target_epoch = 0.1, 0.7, 8
    curves = {
        "polynomial (power 3, concave)": pc.schedules.polynomial(init, target, target_epoch, 3, True),
        "polynomial (power 3, convex)": pc.schedules.polynomial(init, target, target_epoch, 3, False),
        "polynomial, per optimizer step": pc.schedules.polynomial(
            init, target, target_epoch, 3, True, update_per_optimizer_step=True, steps_per_epoch=STEPS_PER_EPOCH),
        "exponential": pc.schedules.exponential(init, target, target_epoch),
        "multistep [2, 5, 8]": pc.schedules.multistep([2, 5, 8], [init, 0.3, 0.5, target]),
    }
    steps = range(EPOCHS * STEPS_PER_EPOCH + 1)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, schedule in curves.items():
        xs = [s / STEPS_PER_EPOCH for s in steps]
        ys = [schedule(pc.Progress(step=s, epoch=s // STEPS_PER_EPOCH, steps_per_epoch=STEPS_PER_EPOCH)) for s in steps]
        ax.plot(xs, ys, label=label)
    # adaptive: the level rises by 0.1 after each 2 epochs whose loss stayed small (simulated losses)
    state, xs, ys = AdaptiveLevel(init, 2), [], []
    for epoch in range(EPOCHS + 1):
        xs.append(epoch)
        ys.append(state.level)
        state = adaptive_step(state, 1e-3 if epoch % 3 else 0.5, target=target, patience=2, step=0.1)
    ax.step(xs, ys, where="post", label="adaptive (patience 2, step 0.1)", linestyle="--")
    ax.axvline(target_epoch, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("epoch")
    ax.set_ylabel("sparsity level")
    ax.set_title(f"purecomp.schedules: init {init}, target {target} at epoch {target_epoch}")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    out = Path(__file__).with_name("schedules.png")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
