"""The demo (what `make demo` runs) works end to end on real data."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_digits_demo_runs_and_reports_accuracy():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "digits_demo.py"), "--epochs", "4", "--qat-epochs", "1"],
        capture_output=True, text=True, timeout=600, check=True,
    )
    out = result.stdout
    assert "quantizers" in out and "INT8 after QAT" in out
    fp32 = float(next(line for line in out.splitlines() if line.startswith("FP32")).split()[-1])
    int8 = float(next(line for line in out.splitlines() if line.startswith("INT8 after QAT")).split()[-1])
    assert fp32 > 80 and int8 > 80, out
