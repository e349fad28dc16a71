"""benchmarks/teacher_logits_throughput.py --smoke: every variant (MKL, oneDNN, --compile, bfloat16, both) runs the
stage's batch computation in its own process and reaches the table (tiny random teacher)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "teacher_logits_throughput.py"
VARIANTS = ("eager-mkl", "eager", "compile", "bf16", "bf16-compile")


@pytest.mark.slow
def test_smoke_reports_every_variant(tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--work", str(tmp_path / "work"), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]
    report = json.loads(out.read_text(encoding="utf-8"))
    assert set(report["rows"]) == set(VARIANTS)
    assert sorted(w["variant"] for w in report["workers"]) == sorted(VARIANTS)
    for name, row in report["rows"].items():
        assert row["timed_batches"] == 2, name
        assert math.isfinite(row["tokens_per_s"]) and row["tokens_per_s"] > 0, name
    assert report["rows"]["eager"]["vs_eager"] == pytest.approx(1.0)
    for name in VARIANTS:
        (line,) = [line for line in proc.stdout.splitlines() if line.startswith(f"| {name} |")]
        assert "FAILED" not in line and line.split("|")[3].strip().endswith("×"), line
