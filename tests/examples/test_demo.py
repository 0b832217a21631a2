"""The demo (what `make demo` runs) works end to end on real data."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_digits_demo_runs_and_reports_accuracy():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "digits_demo.py"), "--epochs", "4", "--qat-epochs", "1",
         "--sparse-epochs", "3"],
        capture_output=True, text=True, timeout=600, check=True,
    )
    out = result.stdout
    assert "quantizers" in out and "INT8 after QAT" in out
    fp32_row = next(line for line in out.splitlines() if line.startswith("FP32")).split()
    int8_row = next(line for line in out.splitlines() if line.startswith("INT8 after QAT")).split()
    fp32, fp32_onnx, fp32_kib = (float(v) for v in fp32_row[1:4])
    int8, int8_onnx, int8_kib = (float(v) for v in int8_row[3:6])
    assert fp32 > 80 and int8 > 80, out
    assert abs(fp32 - fp32_onnx) <= 0.6 and abs(int8 - int8_onnx) <= 0.6, "ONNX Runtime agrees with PyTorch"
    assert int8_kib < 0.5 * fp32_kib, "the INT8 file stores int8 weights"
    sparse_row = next(line for line in out.splitlines() if line.startswith("INT8 + 50% sparsity")).split()
    sparse, sparse_onnx = (float(v) for v in sparse_row[4:6])
    assert sparse > 80 and abs(sparse - sparse_onnx) <= 0.6, out
    assert "MagnitudeSparsity  (all)" in out and "0.5 " in out.split("MagnitudeSparsity  (all)")[1].splitlines()[0]
