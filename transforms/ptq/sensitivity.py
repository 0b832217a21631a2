"""``sensitivity``: how much each quantizer of a quantized model costs, in SQNR.

For a reference ``y`` and its quantized version ``y_q``, ``SQNR = 10 log10(sum y^2 / sum (y - y_q)^2)``
dB (higher is better; ``inf`` when they agree exactly). Per quantizer, on the data:

- ``layer SQNR``: of the output of the op it belongs to (a weight quantizer's layer; an
  activation quantizer's first consumer) with only that quantizer on, against float;
- ``model SQNR``: of the model output with only that quantizer on, against the float model.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from purecomp.api import CompressedModule
from purecomp.apply import call_with_sites
from purecomp.compression import compose_sites, with_training
from purecomp.errors import ConfigError
from purecomp.stats import Table
from purecomp.transforms.quantize import QuantizationState

from .chain_state import quantization_state, without_quantization
from .dataset import Dataset
from .pipeline import calibration_batches


def sqnr(reference: Sequence[Tensor], quantized: Sequence[Tensor]) -> float:
    """``10 log10(sum y^2 / sum (y - y_q)^2)`` over matching tensors, in dB."""
    signal = sum(float(r.double().square().sum()) for r in reference)
    noise = sum(float((r.double() - q.double()).square().sum()) for r, q in zip(reference, quantized))
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(max(signal, 1e-30) / noise)


@dataclasses.dataclass(frozen=True)
class SensitivityReport:
    """Rows ``(quantizer, kind, layer site, layer SQNR dB, model SQNR dB)``, least model SQNR first."""

    rows: tuple[dict[str, Any], ...]

    def table(self) -> Table:
        return Table("quantizer sensitivity (SQNR, dB; one quantizer on at a time)", self.rows)

    def __str__(self) -> str:
        return str(self.table())

    def plot(self, path: str | Path, top: int = 30) -> Path:
        """A PNG bar chart of the ``top`` quantizers with the lowest model SQNR."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = list(self.rows[:top])
        fig, ax = plt.subplots(figsize=(8, 0.3 * len(rows) + 1.2))
        finite = [min(r["model_sqnr_db"], 200.0) for r in rows]
        ax.barh(range(len(rows)), finite, color="#4477aa")
        ax.set_yticks(range(len(rows)), [r["quantizer"] for r in rows], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("model output SQNR with only this quantizer on (dB)")
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def _layer_site(state: Any, key: str) -> str | None:
    """The op whose output a quantizer's layer SQNR is measured on."""
    if key in state.weights:
        return None  # found from the graph: the op that reads the weight
    consumers = [c for c in state.consumers_of(key) if c != "output"]
    return consumers[0] if consumers else None


def sensitivity(model: CompressedModule, dataset: Dataset | Iterable[Any], subset_size: int = 64,
                progress_bar: bool = True) -> SensitivityReport:
    """Per quantizer of a ``quantize`` / ``create_compressed_model`` result, the SQNR of its
    layer's output and of the model output with only that quantizer on (module docstring), on
    ``subset_size`` samples of ``dataset``."""
    batches = calibration_batches(dataset, subset_size)
    full = with_training(model.state, False)
    state = quantization_state(full)
    if not isinstance(state, QuantizationState):
        raise ConfigError("model", "sensitivity measures quantization results (pc.quantize, or create_compressed_model "
                          "with a quantization section last); this one's state ends in "
                          f"{type(state).__name__}")
    inner = model.model
    # the reference is the float model with the earlier chain members applied (SmoothQuant: exact)
    base = without_quantization(full)
    params = model.method.params(model.model_params() | dict(inner.named_buffers()), base)
    base_sites = model.method.sites(base)
    graph = getattr(model, "graph", None)
    readers = {name: node.site for node in (graph or []) for name in node.params} if graph is not None else {}
    keys = list(state.weights) + list(state.activations)
    layer_sites = {k: (readers.get(k) if k in state.weights else _layer_site(state, k)) for k in keys}
    observed = sorted({s for s in layer_sites.values() if s})

    def run(only: str | None) -> tuple[list[Tensor], dict[str, list[Tensor]]]:
        """Model outputs and the observed layer outputs with only quantizer ``only`` on (None: float)."""
        p = dict(params)
        sites: dict[str, Any] = {}
        if only in state.weights:
            p[only] = state.weights[only](p[only])
        elif only is not None:
            sites = {only: state.activations[only]}
        seen: dict[str, list[Tensor]] = {s: [] for s in observed}
        watch = {f"{s}:out0": (lambda x, s=s: seen[s].append(x.detach().clone()) or x) for s in observed}
        outs = []
        was_training = inner.training
        inner.eval()
        try:
            with torch.no_grad():
                for args, kwargs in batches:
                    out = call_with_sites(inner, p, compose_sites([base_sites, sites, watch]), args, kwargs)
                    outs.append(out if isinstance(out, Tensor) else out[0])
        finally:
            inner.train(was_training)
        return outs, seen

    reference, reference_layers = run(None)
    rows = []
    for key in tqdm(keys, desc="sensitivity", disable=not progress_bar or None, leave=False):
        outs, layers = run(key)
        site = layer_sites[key]
        rows.append({
            "quantizer": key, "kind": "weight" if key in state.weights else "activation", "layer": site or "",
            "layer_sqnr_db": sqnr(reference_layers[site], layers[site]) if site else math.nan,
            "model_sqnr_db": sqnr(reference, outs),
        })
    return SensitivityReport(tuple(sorted(rows, key=lambda r: r["model_sqnr_db"])))
