"""NNCF's own sample configs through purecomp's front door (not a test: it needs NNCF's sources).

For each config of NNCF's ``examples/torch/*/configs`` (tag v2.17.0, plus the binarization ones
of v2.9.0) this script runs ``purecomp.Config.from_dict``, ``create_compressed_model`` on the
model the config names (torchvision models with ``weights=None``; SSD300, UNet and ICNet from
this repository's examples, narrowed), one training step, and ONNX export, and prints a table
``config | loaded | built | trained | exported | reason``.

    python bench/nncf_configs.py                       # extracts from the local NNCF mirror
    python bench/nncf_configs.py --dir path/to/configs # or reads a folder of *.json
    python bench/nncf_configs.py --mirror /path/to/nncf.git

Inputs are shrunk to keep it quick (``input_info.sample_size`` becomes ``[2, 3, S, S]`` with S the
smallest size the model takes, 32-80 px; SSD keeps 300 px on a 1/8-width network); AutoQ's
``iter_number`` is capped at 2 episodes and HAWQ's ``iter_number`` / ``num_data_points`` at 4
unless ``--full`` is given. Everything else is the
config as NNCF ships it. Configs whose model this repository cannot build are skipped and say so.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # examples/ (SSD300, UNet, ICNet)

import purecomp  # noqa: E402

DEFAULT_MIRROR = Path("/work/.mirror/openvinotoolkit+nncf/repo")
SOURCES = (("v2.17.0", "examples/torch/"), ("v2.9.0", "examples/torch/classification/configs/binarization/"))

# NNCF model name -> (builder(num_classes), input side in pixels)
TORCHVISION = {
    "resnet18": 32, "resnet34": 32, "resnet50": 32, "mobilenet_v2": 32, "mobilenet_v3_small": 32,
    "squeezenet1_1": 64, "googlenet": 32, "inception_v3": 80,
}


def _torchvision(name: str) -> Callable[[int], nn.Module]:
    def build(num_classes: int) -> nn.Module:
        kwargs: dict[str, Any] = {"weights": None, "num_classes": num_classes}
        if name in ("googlenet", "inception_v3"):
            kwargs.update(aux_logits=False, init_weights=False)
        if name == "inception_v3":
            kwargs["transform_input"] = True  # as NNCF's pretrained model, whose ignored_scopes name those ops
        return getattr(torchvision.models, name)(**kwargs)
    return build


def _ssd(num_classes: int) -> nn.Module:
    from examples.object_detection.model import SSD300
    return SSD300(num_classes, width=0.125)


def _segmentation(name: str) -> Callable[[int], nn.Module]:
    def build(num_classes: int) -> nn.Module:
        from examples.semantic_segmentation.models import build_segmentation_model
        return build_segmentation_model(name, num_classes, width=8)
    return build


def model_for(config: dict[str, Any]) -> tuple[Callable[[int], nn.Module] | None, int, str]:
    """``(builder, side, reason)``; builder is ``None`` when this repository has no such model."""
    name = config.get("model")
    if name in TORCHVISION:
        return _torchvision(name), TORCHVISION[name], ""
    if name == "ssd_vgg" and config.get("input_info", {}).get("sample_size", [0, 0, 300])[-1] == 300:
        return _ssd, 300, ""
    if name in ("unet", "icnet"):
        return _segmentation(name), 64, ""
    return None, 0, f"model {name!r} is not in torchvision or this repository's examples"


def extract(mirror: Path, dest: Path) -> list[Path]:
    out = []
    for tag, prefix in SOURCES:
        names = subprocess.run(["git", "-C", str(mirror), "ls-tree", "-r", "--name-only", tag, prefix],
                               check=True, capture_output=True, text=True).stdout.split()
        for name in names:
            if "/configs/" not in name or not name.endswith(".json"):
                continue
            if tag == "v2.9.0" and "binarization" not in name:
                continue
            text = subprocess.run(["git", "-C", str(mirror), "show", f"{tag}:{name}"],
                                  check=True, capture_output=True, text=True).stdout
            path = dest / tag / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            out.append(path)
    return out


def _shrink(config: dict[str, Any], side: int, quick: bool) -> dict[str, Any]:
    config = copy.deepcopy(config)
    infos = config.get("input_info")
    if isinstance(infos, dict) and len(infos.get("sample_size", [])) == 4:
        c = infos["sample_size"][1]
        infos["sample_size"] = [2, c, side, side]
    sections = config.get("compression", [])
    for section in sections if isinstance(sections, list) else [sections]:
        precision = section.get("initializer", {}).get("precision", {})
        if quick and precision.get("type") == "autoq":
            precision["iter_number"] = min(precision.get("iter_number", 2), 2)
            precision["warmup_iter_number"] = 1
        if quick and precision.get("type") == "hawq":  # NNCF's defaults: 200 iterations, 100 data points
            precision["iter_number"] = min(precision.get("iter_number", 4), 4)
            precision["num_data_points"] = min(precision.get("num_data_points", 4), 4)
    return config


def _loss(outputs: Any, targets: torch.Tensor) -> torch.Tensor:
    if isinstance(outputs, torch.Tensor) and outputs.dim() == 2:
        return nn.functional.cross_entropy(outputs, targets)
    leaves = [t for t in torch.utils._pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return sum(t.float().pow(2).mean() for t in leaves)


def run_one(path: Path, quick: bool) -> dict[str, Any]:
    row = {"config": path.as_posix().split("/configs/")[-1], "loaded": False, "built": False, "trained": False, "exported": False,
           "reason": "", "warnings": []}
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        row["reason"] = f"not JSON: {exc}"
        return row
    build, side, why = model_for(raw)
    config_data = _shrink(raw, side or 32, quick)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            config = purecomp.Config.from_dict(config_data)
            row["loaded"] = True
            if "compression" not in raw:
                row["reason"] = "no compression section (an FP32 baseline config)"
                return row
            if build is None:
                row["reason"] = "skipped: " + why
                return row
            torch.manual_seed(0)
            num_classes = raw.get("num_classes", 1000)
            model = build(num_classes)
            shape = config_data["input_info"]["sample_size"]
            batches = [(torch.rand(shape), torch.randint(0, num_classes, (shape[0],))) for _ in range(2)]

            def eval_fn(model_apply: Any, loader: Any) -> float:
                with torch.no_grad():
                    return -float(sum(_loss(model_apply(x), y) for x, y in loader))

            config = purecomp.register_default_init_args(config, batches, _loss, autoq_eval_fn=eval_fn)
            ctrl, module = purecomp.create_compressed_model(model, config)
            row["built"] = True
            module.train()
            opt = torch.optim.SGD(module.parameters(), lr=1e-3)
            x, y = batches[0]
            loss = _loss(module(x), y) + ctrl.loss()
            loss.backward()
            opt.step()
            ctrl.scheduler.step()
            ctrl.scheduler.epoch_step()
            if not torch.isfinite(loss):
                raise RuntimeError(f"loss is {loss.item()}")
            row["trained"] = True
            module.eval()
            with tempfile.TemporaryDirectory() as tmp:
                ctrl.export_model(Path(tmp) / "model.onnx")
            row["exported"] = True
        except Exception as exc:  # the bench reports every failure and goes on
            row["reason"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            row["traceback"] = traceback.format_exc()
        finally:
            row["warnings"] = sorted({str(w.message).splitlines()[0][:160] for w in caught
                                      if "purecomp" in str(w.filename) or "purecomp" in str(w.message)
                                      or issubclass(w.category, UserWarning)})
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, help="a folder of NNCF config files (*.json, searched recursively)")
    parser.add_argument("--mirror", type=Path, default=DEFAULT_MIRROR, help="NNCF's git directory")
    parser.add_argument("--full", action="store_true", help="keep AutoQ's iter_number as configured")
    parser.add_argument("--only", default="", help="run only configs whose file name contains this")
    parser.add_argument("--verbose", action="store_true", help="print tracebacks and warnings")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths = sorted(args.dir.rglob("*.json")) if args.dir else extract(args.mirror, Path(tmp))
        paths = [p for p in paths if args.only in p.name]
        rows = []
        for path in paths:
            t0 = time.perf_counter()
            row = run_one(path, quick=not args.full)
            row["seconds"] = round(time.perf_counter() - t0, 1)
            rows.append(row)
            mark = lambda b: "yes" if b else "-"  # noqa: E731
            print(f"{row['config'][:58]:58s} {mark(row['loaded']):>6s} {mark(row['built']):>5s} "
                  f"{mark(row['trained']):>7s} {mark(row['exported']):>8s}  {row['seconds']:5.1f}s  {row['reason']}",
                  flush=True)
            if args.verbose:
                for w in row["warnings"]:
                    print(f"    warning: {w}")
                if "traceback" in row:
                    print(row["traceback"])
    n = len(rows)
    with_model = [r for r in rows if not r["reason"].startswith(("skipped", "no compression"))]
    print(f"\n{n} configs: loaded {sum(r['loaded'] for r in rows)}, built {sum(r['built'] for r in rows)}, "
          f"trained {sum(r['trained'] for r in rows)}, exported {sum(r['exported'] for r in rows)}; "
          f"{sum(r['reason'].startswith('skipped') for r in rows)} skipped (no model here), "
          f"{sum(r['reason'].startswith('no compression') for r in rows)} without a compression section; "
          f"of the {len(with_model)} others, {sum(r['exported'] for r in with_model)} go all the way")
    if args.json:
        args.json.write_text(json.dumps([{k: v for k, v in r.items() if k != "traceback"} for r in rows], indent=1))


if __name__ == "__main__":
    main()
