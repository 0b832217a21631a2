"""Crash-safe checkpoints: a writer killed mid-write, or failing between write and rename, leaves
the previous checkpoint loadable; a truncated or corrupted checkpoint raises ``StateError``.

Covers ``purecomp.checkpoint.atomic_write`` / ``save_torch`` / ``load_torch``, the record file
(``save_state`` / ``save_record``), the samples' ``last.pt`` / ``best.pt`` (``save_checkpoint`` /
``load_checkpoint``), the controller's ``load_compression_state`` and the transformers state file.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import purecomp as pc
from purecomp.checkpoint import (
    atomic_write,
    load_record,
    load_state,
    load_torch,
    save_state,
    save_torch,
)
from purecomp.errors import StateError

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
sys.path.insert(0, str(EXAMPLES))
import sample_runner as sr  # noqa: E402

# Counted in docs/reliability.md.
CORRUPTION_EXAMPLES = 60


class Pickled:
    """A class a weights-only load must refuse to rebuild."""


def small_payload(tag: float) -> dict:
    return {"model": {"w": torch.full((4, 4), tag)}, "epoch": int(tag), "metrics": {"top1": tag}}


def temporaries(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.tmp"))


# ---------------------------------------------------------------------- a writer killed mid-write

CHILD = textwrap.dedent("""
    import os, sys, time, torch
    from purecomp.checkpoint import atomic_write, save_state, save_torch
    path, how = sys.argv[1], sys.argv[2]
    if how == "halfway":  # a torch.save payload written half, then the process hangs until killed
        import io
        buffer = io.BytesIO()
        torch.save({"model": {"w": torch.ones(256, 256)}, "epoch": 2}, buffer)
        data = buffer.getvalue()
        def write(f):
            f.write(data[: len(data) // 2])
            f.flush()
            print("halfway", flush=True)
            time.sleep(60)
            f.write(data[len(data) // 2:])
        atomic_write(path, write)
    elif how == "in-place":  # what the samples did before: torch.save straight over the old file
        import io
        buffer = io.BytesIO()
        torch.save({"model": {"w": torch.ones(256, 256)}, "epoch": 2}, buffer)
        data = buffer.getvalue()
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            print("halfway", flush=True)
            time.sleep(60)
    elif how == "record":  # a record file whose writer hangs inside the write
        import purecomp.checkpoint as ck
        real = ck.atomic_write
        def slow(p, write):
            def wrapped(f):
                f.write(b"partial bytes of a safetensors file")
                f.flush()
                print("halfway", flush=True)
                time.sleep(60)
                write(f)
            return real(p, wrapped)
        ck.atomic_write = slow
        save_state(path, {"step": 2, "w": torch.zeros(3)})
    else:  # "loop": large checkpoints back to back until killed
        print("halfway", flush=True)
        i = 0
        while True:
            i += 1
            save_torch(path, {"model": {"w": torch.full((1024, 1024), float(i))}, "epoch": i})
""")


def run_child(path: Path, how: str, delay: float = 0.0) -> None:
    """Start the writer, wait until it says it is mid-write (plus ``delay``), SIGKILL it."""
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), how], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline()
        assert line.strip() == "halfway", child.stderr.read()
        time.sleep(delay)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL


def test_a_torch_checkpoint_writer_killed_mid_write_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    save_torch(path, small_payload(1.0))
    run_child(path, "halfway")
    saved = load_torch(path)
    assert saved["epoch"] == 1 and torch.equal(saved["model"]["w"], torch.full((4, 4), 1.0))
    assert len(temporaries(tmp_path)) == 1, "the killed writer's half file is left beside, never over, last.pt"
    save_torch(path, small_payload(3.0))  # the next save is not disturbed by it
    assert load_torch(path)["epoch"] == 3


def test_an_in_place_writer_killed_mid_write_destroys_the_checkpoint_and_load_torch_says_so(tmp_path):
    """The control: writing over the file (what the samples did) loses it; the loader names it."""
    path = tmp_path / "last.pt"
    save_torch(path, small_payload(1.0))
    run_child(path, "in-place")
    with pytest.raises(StateError, match="last.pt"):
        load_torch(path)


def test_a_record_writer_killed_mid_write_leaves_the_previous_state(tmp_path):
    path = tmp_path / "state.safetensors"
    save_state(path, {"step": 1, "w": torch.ones(3)})
    run_child(path, "record")
    state = load_state(path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))


@pytest.mark.parametrize("delay", [0.0, 0.3])
def test_a_writer_killed_at_any_moment_leaves_a_whole_checkpoint(tmp_path, delay):
    """4 MiB checkpoints written back to back, killed after ``delay``: the file is always one
    whole checkpoint, the first or a later one, never a mix."""
    path = tmp_path / "last.pt"
    save_torch(path, {"model": {"w": torch.zeros(1024, 1024)}, "epoch": 0})
    run_child(path, "loop", delay)
    saved = load_torch(path)
    w = saved["model"]["w"]
    assert w.shape == (1024, 1024) and torch.equal(w, torch.full_like(w, float(saved["epoch"])))


# ---------------------------------------------------------------------- failures between write and rename


@pytest.mark.parametrize("fail_at", ["write", "fsync", "replace"])
def test_a_failed_save_torch_leaves_the_previous_file_and_no_temporary(tmp_path, monkeypatch, fail_at):
    path = tmp_path / "best.pt"
    save_torch(path, small_payload(1.0))
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk gone")

    if fail_at == "write":
        monkeypatch.setattr(torch, "save", boom)
    else:
        monkeypatch.setattr(os, fail_at, boom)
    with pytest.raises(OSError, match="disk gone"):
        save_torch(path, small_payload(2.0))
    monkeypatch.undo()
    assert path.read_bytes() == before and load_torch(path)["epoch"] == 1
    assert temporaries(tmp_path) == []


def test_a_failed_write_function_propagates_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "plan.json"
    atomic_write(path, lambda f: f.write(b"old"))

    def half(f):
        f.write(b"ne")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, half)
    assert path.read_bytes() == b"old" and temporaries(tmp_path) == []


def test_atomic_files_get_an_ordinary_mode_and_their_folder_is_made(tmp_path):
    path = save_torch(tmp_path / "runs" / "deep" / "last.pt", small_payload(1.0))
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, "not mkstemp's 0600"
    assert temporaries(path.parent) == []


# ---------------------------------------------------------------------- truncated and corrupted files


def torch_file(tmp_path: Path) -> bytes:
    return save_torch(tmp_path / "good.pt", small_payload(1.0)).read_bytes()


def record_file(tmp_path: Path) -> bytes:
    state = {"quant": pc.Progress(step=3, epoch=1), "w": torch.randn(8, 8), "levels": [0.5, "x"]}
    return save_state(tmp_path / "good.safetensors", state).read_bytes()


@pytest.mark.parametrize("kind", ["torch", "record"])
def test_truncated_checkpoints_raise_state_error(tmp_path, kind):
    data = torch_file(tmp_path) if kind == "torch" else record_file(tmp_path)
    load = load_torch if kind == "torch" else load_state
    for cut in sorted({0, 1, 8, 64, len(data) // 3, len(data) // 2, len(data) - 22, len(data) - 1}):
        broken = tmp_path / f"cut{cut}"
        broken.write_bytes(data[:cut])
        with pytest.raises(StateError, match=f"cut{cut}"):
            load(broken)


def test_missing_and_foreign_files_raise_state_error(tmp_path):
    with pytest.raises(StateError, match="missing.pt"):
        load_torch(tmp_path / "missing.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(StateError, match="text.pt"):
        load_torch(tmp_path / "text.pt")
    torch.save({"obj": Pickled()}, tmp_path / "code.pt")  # weights_only refuses to rebuild the class
    with pytest.raises(StateError, match="code.pt"):
        load_torch(tmp_path / "code.pt")
    (tmp_path / "torch.safetensors").write_bytes(torch_file(tmp_path))
    with pytest.raises(StateError):
        load_state(tmp_path / "torch.safetensors")


@settings(max_examples=CORRUPTION_EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["torch", "record"]), data=st.data())
def test_corrupted_checkpoints_load_or_raise_state_error(tmp_path, kind, data):
    """Bytes overwritten anywhere (header, metadata, zip directory, tensor data): the loader returns
    (a flip inside tensor data is not detected, no checksum) or raises ``StateError``; nothing else."""
    blob = bytearray(torch_file(tmp_path) if kind == "torch" else record_file(tmp_path))
    for _ in range(data.draw(st.integers(1, 4), label="flips")):
        at = data.draw(st.integers(0, len(blob) - 1), label="at")
        chunk = data.draw(st.binary(min_size=1, max_size=16), label="bytes")
        blob[at:at + len(chunk)] = chunk
    if data.draw(st.booleans(), label="truncate"):
        blob = blob[:data.draw(st.integers(0, len(blob)), label="cut")]
    broken = tmp_path / f"broken.{kind}"
    broken.write_bytes(bytes(blob))
    try:
        (load_torch if kind == "torch" else load_state)(broken)
    except StateError:
        pass


def test_damaged_record_metadata_raises_state_error(tmp_path):
    from safetensors.torch import save_file

    for name, record in [("list", "[1, 2]"), ("number", "3"), ("text", "\"x\"")]:
        save_file({"state.0": torch.ones(1)}, str(tmp_path / f"{name}.safetensors"),
                  metadata={"format": "purecomp-record-1", "record": record})
        with pytest.raises(StateError, match="damaged"):
            load_record(tmp_path / f"{name}.safetensors")
    save_file({"state.0": torch.ones(1)}, str(tmp_path / "legacy.safetensors"),
              metadata={"format": "purecomp-transformers-1", "structure": "{oops"})
    with pytest.raises(StateError, match="damaged"):
        load_record(tmp_path / "legacy.safetensors")


# ---------------------------------------------------------------------- the controller and the samples


def small_controller():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))
    config = pc.Config.from_dict({"input_info": {"sample_size": [2, 1, 4, 4]},
                                  "compression": {"algorithm": "quantization"}})
    ctrl, module = pc.create_compressed_model(model, config)
    ctrl.initialize([torch.randn(2, 1, 4, 4) for _ in range(2)])
    return ctrl, module


@pytest.mark.parametrize("key, value", [
    ("config", 3), ("config", "{oops"), ("signature", None), ("scheduler", "[]"),
    ("scheduler", json.dumps({"current_step": "a", "current_epoch": 0, "steps_in_epoch": 0, "steps_per_epoch": None})),
    ("structure", "{oops"), ("tensors", "abc"),
])
def test_a_damaged_compression_state_raises_state_error_and_changes_nothing(key, value):
    ctrl, _ = small_controller()
    saved = ctrl.get_compression_state()
    before = [t.clone() for t in pc.struct.tree_leaves(ctrl.state)]
    with pytest.raises(StateError):
        ctrl.load_compression_state({**saved, key: value})
    assert all(torch.equal(a, b) for a, b in zip(before, pc.struct.tree_leaves(ctrl.state)))


def test_the_samples_checkpoints_are_written_atomically_and_damage_raises_state_error(tmp_path, monkeypatch):
    ctrl, module = small_controller()
    path = sr.save_checkpoint(tmp_path / "last.pt", module, ctrl, None, 0, {"top1 %": 50.0})
    assert sr.load_checkpoint(path)["epoch"] == 0

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        sr.save_checkpoint(path, module, ctrl, None, 1, {"top1 %": 60.0})
    monkeypatch.undo()
    assert sr.load_checkpoint(path)["epoch"] == 0 and temporaries(tmp_path) == []
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(StateError, match="last.pt"):
        sr.load_checkpoint(path)
    with pytest.raises(StateError, match="last.pt"):
        sr.load_weights(module.model, path)


def test_the_transformers_state_file_is_written_atomically(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    from purecomp.integrations.hf_compress import read_compression_state, save_compression_state

    ctrl, _ = small_controller()
    path = save_compression_state(ctrl, tmp_path / "compression_state.safetensors", {})
    saved, _ = read_compression_state(path)
    before = path.read_bytes()
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError("io error")))
    with pytest.raises(OSError, match="io error"):
        save_compression_state(ctrl, path, {})
    monkeypatch.undo()
    assert path.read_bytes() == before and temporaries(tmp_path) == []
    path.write_bytes(before[: len(before) // 2])
    with pytest.raises(StateError, match="compression_state"):
        read_compression_state(path)
