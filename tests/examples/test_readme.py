"""The README's examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.slow
def test_readme_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks()
    assert len(blocks) == 2
    assert all(len(b.strip().splitlines()) <= 11 for b in blocks)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102
    assert (tmp_path / "model.onnx").stat().st_size > 0
    assert namespace["state"] is not None
    ctrl = namespace["ctrl"]
    assert ctrl.export_model(tmp_path / "model_int8.onnx").stat().st_size > 0
    assert "quantizers" in str(ctrl.statistics())
