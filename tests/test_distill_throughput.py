"""benchmarks/distill_throughput.py --smoke: every row runs and reaches the report (tiny random models).

The rows are listed here, not read from the benchmark, so a row dropped from the benchmark (or one
whose worker fails and is left out) fails the test instead of shrinking it.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "distill_throughput.py"
ROWS = ("peft-lora", "full-ft", "kd-lora", "kd-lora-cache", "bl-0.4", "bl-0.0", "kd-full", "kd-lora-ckpt",
        "kd-lora-cache-ckpt", "kd-lora-compile", "bl-0.0-compile")
PEER = "peft-lora"


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_smoke_reports_every_row(tmp_path):
    pytest.importorskip("peft", reason="the peer row needs the bench extra: pip install -e '.[bench]'")
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--work", str(tmp_path / "work"),
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]

    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["peer"] == PEER and list(report["configs"]) == list(ROWS)
    assert report["settings"] == ["2x32"] and list(report["results"]) == ["2x32"]
    rows = report["results"]["2x32"]
    assert set(rows) == set(ROWS)
    for name in ROWS:
        row = rows[name]
        assert "error" not in row, (name, row["error"])
        assert row["timed_steps"] == 2 and row["tokens_per_step"] == 64, name
        for key in ("tokens_per_s", "peak_mib", "tokens_per_s_vs_peer", "peak_mib_vs_peer", "flops_per_token",
                    "achieved_tflops"):
            assert _positive(row[key]), (name, key, row.get(key))
        assert all(_positive(t) for t in row["step_seconds"]), name
    assert rows[PEER]["tokens_per_s_vs_peer"] == pytest.approx(1.0)
    assert rows[PEER]["peak_mib_vs_peer"] == pytest.approx(1.0)
    # one worker per row (one repeat), and none of them dropped
    assert sorted(w["config"] for w in report["workers"]) == sorted(ROWS)

    # Before the first update the LoRA factors B are 0, so every live-teacher row at ρ = 1 computes the same
    # §4 loss: the peer's plain loss agrees with bltool's chunked one.
    first = {name: rows[name]["first_loss"] for name in ("peft-lora", "full-ft", "kd-lora", "kd-full", "kd-lora-ckpt",
                                                          "kd-lora-compile")}
    assert max(first.values()) - min(first.values()) < 1e-4, first
    # the budgeted rows were timed at their final budget
    for name, budget in (("bl-0.4", 0.4), ("bl-0.0", 0.0), ("bl-0.0-compile", 0.0)):
        assert rows[name]["target_fraction"] == budget
        assert rows[name]["actual_fraction"] == pytest.approx(budget, abs=1e-6)
        assert rows[name]["actual_fraction_after"] == pytest.approx(budget, abs=1e-6)
    assert rows["bl-0.0"]["dense_computed_fraction"] == 0.0
    assert rows["bl-0.0"]["macs_student"] < rows["bl-0.4"]["macs_student"] < rows["kd-lora"]["macs_student"]
    assert rows["kd-lora-cache"]["macs_teacher"] == 0 < rows["kd-lora"]["macs_teacher"]

    # the Markdown table: the ratio columns, and one line per row with its figures
    lines = proc.stdout.splitlines()
    header = next(line for line in lines if line.startswith("| row |"))
    assert "tok/s ÷ peer" in header and "mem ÷ peer" in header
    for name in ROWS:
        (line,) = [line for line in lines if line.startswith(f"| {name} |")]
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert "FAILED" not in line and cells[3].endswith("×") and cells[5].endswith("×"), line
