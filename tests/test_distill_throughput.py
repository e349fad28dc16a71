"""benchmarks/distill_throughput.py --smoke: every row runs and reaches the report (tiny random models).

The rows are listed here, not read from the benchmark, so a row dropped from the benchmark (or one
whose worker fails and is left out) fails the test instead of shrinking it.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "distill_throughput.py"
ROWS = ("peft-lora", "peft-chunked", "peft-cache", "full-ft", "kd-lora", "kd-lora-cache", "bl-0.4", "bl-0.0",
        "bl-0.4-sched", "bl-0.0-sched", "kd-full", "kd-lora-ckpt", "kd-lora-cache-ckpt")
# The --compile rows (kd-lora-compile, bl-0.0-compile) are left out of the smoke run: compiling costs ~40 s here,
# and what they add, bltool's --compile, is tested in tests/test_compile.py and tests/test_gpu.py.
LIVE_PEERS, CHUNKED_PEER, CACHE_PEER = ("peft-lora", "peft-chunked"), "peft-chunked", "peft-cache"
CACHED = ("peft-cache", "kd-lora-cache", "kd-lora-cache-ckpt")
SCHEDULES = {"bl-0.4-sched": 0.4, "bl-0.0-sched": 0.0}


def _benchmark():
    spec = importlib.util.spec_from_file_location("distill_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_chunked_backward_gives_the_full_loss_gradient():
    """The competent peer's chunked loss: backward per chunk into a detached copy of the hidden states, then
    one backward of the decoder, gives the loss and the gradients of the unchunked loss."""
    import torch

    chunked_backward = _benchmark().chunked_backward
    torch.manual_seed(0)
    decoder, head = torch.nn.Linear(4, 4), torch.nn.Linear(4, 11, bias=False)
    x, target = torch.randn(2, 7, 4), torch.randn(2, 7, 11).softmax(-1)

    def loss_of(h, start, stop):
        return -(target[:, start:stop] * head(h).log_softmax(-1)).sum() / 12

    full = loss_of(decoder(x)[:, :6], 0, 6)  # position t predicts t + 1: the last one predicts nothing
    full.backward()
    expected = [p.grad.clone() for p in (*decoder.parameters(), head.weight)]
    for p in (*decoder.parameters(), head.weight):
        p.grad = None
    total = chunked_backward(decoder(x), 4, loss_of)  # chunks of 4 and 2 of the 6 predicting positions
    assert float(total) == pytest.approx(float(full.detach()), rel=1e-6)
    for got, want in zip((*decoder.parameters(), head.weight), expected):
        torch.testing.assert_close(got.grad, want)


def test_schedule_points_sample_the_controller_from_one_to_the_budget():
    """A schedule row's phases: the controller's trajectory sampled at the strata's midpoints, one phase per
    distinct set of computed modules, with ρ̄ of docs/method.md §7 and the exact mean beside it."""
    from bltool.train.budget import BudgetConfig, BudgetController

    controller = BudgetController([4, 4, 16, 16, 64, 64], BudgetConfig(0.0), 400)
    schedule = _benchmark().schedule_points(controller, 8)
    phases = schedule["phases"]
    assert controller.step_count == 0 and controller.rho == [1.0] * 6  # the run's controller is not stepped
    assert [p["point_steps"][0] for p in phases][0] == 25 and sum(p["points"] for p in phases) == 8
    assert sorted(t for p in phases for t in p["point_steps"]) == [25, 75, 125, 175, 225, 275, 325, 375]
    assert phases[0]["computed_fraction"] == 1.0 and phases[-1]["computed_fraction"] == 0.0
    assert phases[-1]["points"] >= 4 and phases[-1]["state"]["step_count"] == phases[-1]["point_steps"][0]
    assert schedule["mean_retention"] == pytest.approx(0.1 + 0.2 / 2)
    assert schedule["mean_actual_fraction"] == pytest.approx(schedule["mean_retention"], abs=0.03)
    assert schedule["sampled_computed_fraction"] == pytest.approx(
        sum(p["points"] * p["computed_fraction"] for p in phases) / 8)


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_smoke_reports_every_row(tmp_path):
    pytest.importorskip("peft", reason="the peer row needs the bench extra: pip install -e '.[bench]'")
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--work", str(tmp_path / "work"),
                           "--configs", ",".join(ROWS), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]

    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["peers"]["live"] == list(LIVE_PEERS) and report["peers"]["cache"] == CACHE_PEER
    assert list(report["configs"]) == list(ROWS)
    assert report["protocol"]["kernels"] == "onednn" and report["protocol"]["prefetch"] == "on"
    peaks = report["peak_tflops"]  # the matmul peak of each dtype, measured before and after the rows
    assert _positive(peaks["float32"]) and _positive(peaks["bfloat16"])
    assert [r["when"] for r in report["matmul_peak"]] == ["before", "after"]
    assert report["settings"] == ["2x32"] and list(report["results"]) == ["2x32"]
    rows = report["results"]["2x32"]
    assert set(rows) == set(ROWS)
    for name in ROWS:
        row = rows[name]
        assert "error" not in row, (name, row["error"])
        steps = 2 * len(row["schedule"]["phases"]) if name in SCHEDULES else 2  # 2 per phase of a schedule
        assert row["timed_steps"] == steps and row["tokens_per_step"] == 64, name
        for key in ("tokens_per_s", "peak_mib", "tokens_per_s_vs_peer", "peak_mib_vs_peer", "flops_per_token",
                    "achieved_tflops", "mfu"):
            assert _positive(row[key]), (name, key, row.get(key))
        assert all(_positive(t) for t in row["step_seconds"]), name
        # MFU against the measured peak of the dtype the row computes in (float32 on the CPU)
        assert row["compute_dtype"] == "float32" and row["peak_tflops"] == peaks["float32"], name
        assert row["mfu"] == pytest.approx(row["achieved_tflops"] / peaks["float32"]), name
        # speed against the faster live peer or the cache peer, memory against the chunked or the cache peer
        fastest = max(LIVE_PEERS, key=lambda p: rows[p]["tokens_per_s"])
        speed, memory = (CACHE_PEER, CACHE_PEER) if name in CACHED else (fastest, CHUNKED_PEER)
        assert (row["speed_peer"], row["memory_peer"]) == (speed, memory), name
        assert row["tokens_per_s_vs_peer"] == pytest.approx(row["tokens_per_s"] / rows[speed]["tokens_per_s"])
        assert row["peak_mib_vs_peer"] == pytest.approx(row["peak_mib"] / rows[memory]["peak_mib"])
    assert rows[fastest]["tokens_per_s_vs_peer"] == pytest.approx(1.0)
    assert rows[CACHE_PEER]["tokens_per_s_vs_peer"] == pytest.approx(1.0)
    assert rows[CHUNKED_PEER]["peak_mib_vs_peer"] == pytest.approx(1.0)
    # alike for every row: the live teacher's linears all through bltool's oneDNN kernel, batches prefetched
    onednn = {name: rows[name]["teacher_onednn_linears"] for name in ROWS if name not in CACHED}
    assert len(set(onednn.values())) == 1 and min(onednn.values()) > 0, onednn
    assert all(rows[name]["teacher_onednn_linears"] == 0 for name in CACHED)
    assert all(rows[name]["prefetched"] is True for name in ROWS) and len({rows[n]["onednn"] for n in ROWS}) == 1
    # one worker per row (one repeat), and none of them dropped
    assert sorted(w["config"] for w in report["workers"]) == sorted(ROWS)

    # Before the first update the LoRA factors B are 0, so every live-teacher row at ρ = 1 computes the same
    # §4 loss: the peers' plain and chunked losses agree with bltool's fused one (the schedule rows start at
    # ρ = 1); and every cached row computes the same top-k loss from the same cache.
    first = {name: rows[name]["first_loss"] for name in ("peft-lora", "peft-chunked", "full-ft", "kd-lora", "kd-full",
                                                          "kd-lora-ckpt", *SCHEDULES)}
    assert max(first.values()) - min(first.values()) < 1e-4, first
    cached = {name: rows[name]["first_loss"] for name in CACHED}
    assert max(cached.values()) - min(cached.values()) < 1e-4, cached
    assert abs(cached["kd-lora-cache"] - first["kd-lora"]) > 1e-3  # top-64 of 300 is not the full KL
    # the FLOPs: the cached rows have no teacher term; the same student work for every LoRA row at ρ = 1
    for name in CACHED:
        assert rows[name]["macs_teacher"] == 0 < rows["kd-lora"]["macs_teacher"]
    for name in ("peft-lora", "peft-chunked", "peft-cache"):
        assert rows[name]["macs_student"] == rows["kd-lora"]["macs_student"], name
        assert rows[name]["macs_trainable"] == rows["kd-lora"]["macs_trainable"], name
    # the schedule rows: ρ from 1 (the first phase) to F (the last, most of the points), each phase timed with
    # the controller pinned there, the step time the mean over the points, ρ̄ of docs/method.md §7
    for name, budget in SCHEDULES.items():
        sched = rows[name]["schedule"]
        phases = sched["phases"]
        assert sched["points"] == 10 and sum(p["points"] for p in phases) == 10, name
        assert sched["steps"] == 2_000_000 // 64
        assert phases[0]["computed_fraction"] == 1.0 and phases[0]["target_fraction"] == 1.0, name
        assert phases[-1]["target_fraction"] == budget and phases[-1]["points"] >= 5, name
        assert phases[-1]["actual_fraction"] == pytest.approx(budget, abs=1e-6), name
        fractions = [p["computed_fraction"] for p in phases]
        assert fractions == sorted(fractions, reverse=True) and len(set(fractions)) == len(fractions), name
        for phase in phases:
            assert phase["computed_fraction_steps"] == [phase["computed_fraction"]], (name, phase)
            assert phase["controller_step_after"] == phase["point_steps"][0], (name, phase)  # pinned there
            assert phase["timed_steps"] == 2, (name, phase)
        mean = sum(p["points"] * p["step_seconds_median"] for p in phases) / 10
        assert rows[name]["step_seconds_median"] == pytest.approx(mean), name
        assert sched["mean_retention"] == pytest.approx(0.1 + 0.2 * (1 + budget) / 2 + 0.7 * budget)
        assert budget < sched["sampled_computed_fraction"] < 1.0, name
        assert sched["mean_computed_fraction"] == pytest.approx(sched["sampled_computed_fraction"], abs=0.05), name
        assert rows[name]["dense_computed_fraction"] == sched["sampled_computed_fraction"], name
    assert (rows["bl-0.0"]["macs_student"] < rows["bl-0.0-sched"]["macs_student"] < rows["bl-0.4-sched"]["macs_student"]
            < rows["kd-lora"]["macs_student"])
    # the steady-state budgeted rows were timed at their final budget
    for name, budget in (("bl-0.4", 0.4), ("bl-0.0", 0.0)):
        assert rows[name]["target_fraction"] == budget
        assert rows[name]["actual_fraction"] == pytest.approx(budget, abs=1e-6)
        assert rows[name]["actual_fraction_after"] == pytest.approx(budget, abs=1e-6)
    assert rows["bl-0.0"]["dense_computed_fraction"] == 0.0
    assert rows["bl-0.0"]["macs_student"] < rows["bl-0.4"]["macs_student"] < rows["kd-lora"]["macs_student"]

    # the Markdown table: the ratio columns, and one line per row with its figures
    lines = proc.stdout.splitlines()
    header = next(line for line in lines if line.startswith("| row |"))
    assert "tok/s ÷ peer" in header and "mem ÷ peer" in header and "MFU (dtype)" in header
    for name in ROWS:
        (line,) = [line for line in lines if line.startswith(f"| {name} |")]
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert "FAILED" not in line and cells[3].endswith("×") and cells[5].endswith("×"), line
        assert cells[-1].endswith("% (float32)"), line
