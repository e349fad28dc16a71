"""benchmarks/teacher_logits_throughput.py --smoke: every variant (MKL, oneDNN, --compile, bfloat16, both) runs the
stage's batch computation in its own process and reaches the table (tiny random teacher), with its model FLOPs
per token and its MFU against the measured matmul peak of its dtype, and each bf16 variant beside its float32
twin."""

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
    (peak,) = report["peaks"]  # one round: one measurement of each dtype's matmul peak
    assert set(peak) == {"float32", "bfloat16"} and all(p["gflops"] > 0 and p["size"] == 256 for p in peak.values())
    # the teacher's forward: 2 × its matmul MACs per token, the same for every variant (same model, same rows)
    flops = {row["flops_per_token"] for row in report["rows"].values()}
    assert len(flops) == 1 and flops.pop() > 0
    for name, row in report["rows"].items():
        assert row["mfu"] == pytest.approx(row["tokens_per_s"] * row["flops_per_token"] / 1e9
                                           / report["peak_gflops"][row["dtype"]]), name
    for bf16, twin in (("bf16", "eager"), ("bf16-compile", "compile")):
        rows = report["rows"]
        assert rows[bf16]["vs_float32"] == pytest.approx(rows[bf16]["tokens_per_s"] / rows[twin]["tokens_per_s"])
    for name in VARIANTS:
        (line,) = [line for line in proc.stdout.splitlines() if line.startswith(f"| {name} |")]
        cells = [c.strip() for c in line.split("|")[1:-1]]
        assert "FAILED" not in line and cells[3].endswith("×") and cells[8].endswith("%"), line
        assert cells[5].endswith("×") == name.startswith("bf16"), line  # ÷ float32: the bf16 variants
