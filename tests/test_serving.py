"""bench-serving: the measurement helpers by hand, then the stage on a tiny model with transformers'
continuous batching on CPU, and capacity fed by its artifact."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
from typer.testing import CliRunner

from bltool.cli import app
from bltool.errors import UsageError
from bltool.serve.iteration import IterationModel
from bltool.serve.queueing import iterations
from bltool.serve.serving import RunOutput, iteration_gaps, saturated_window
from bltool.stages.bench_serving import BenchServingConfig, run


def test_window_and_gaps_by_hand():
    outputs = [
        RunOutput(start=0.0, end=0.5, timestamps=(0.1, 0.2, 0.3, 0.5)),
        RunOutput(start=0.0, end=0.6, timestamps=(0.2, 0.3, 0.5, 0.6)),
        RunOutput(start=0.3, end=0.9, timestamps=(0.5, 0.6, 0.8, 0.9)),  # admitted last, at 0.3
    ]
    # two sequences fit: saturated once the second has its first token (0.2), until the last admission (0.3)
    assert saturated_window(outputs, 2) == (0.2, 0.3)
    # a gap counts when both of its tokens fall inside the window
    gaps = iteration_gaps(outputs, 0.2, 0.6)
    assert sorted(round(g, 6) for g in gaps) == [0.1, 0.1, 0.1, 0.1, 0.2, 0.2]


def test_config_refuses_bad_settings(tmp_path):
    with pytest.raises(UsageError, match="--concurrency"):
        BenchServingConfig(model="m", out=str(tmp_path), concurrency=0)
    with pytest.raises(UsageError, match="--requests"):
        BenchServingConfig(model="m", out=str(tmp_path), concurrency=8, requests=10)
    with pytest.raises(UsageError, match="--dtype"):
        BenchServingConfig(model="m", out=str(tmp_path), dtype="int4")


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory, tiny_llama):
    out = tmp_path_factory.mktemp("serve") / "bench"
    return run(BenchServingConfig(model=str(tiny_llama), out=str(out), chunk=32, concurrency=4, prompt_len=24,
                                  output_len=8, requests=16, repeats=1, device="cpu"))


@pytest.mark.slow  # measures continuous batching for seconds
def test_bench_serving_artifact(bench_dir, tiny_llama):
    result = json.loads((bench_dir / "result.json").read_text())
    assert 0 < result["iteration_s_p10"] <= result["iteration_s"] <= result["iteration_s_p90"]
    assert result["iterations_measured"] > 20
    assert result["prefill_tokens_per_s"] > 0 and result["decode_tokens_per_s"] > 0
    assert result["saturated_requests_per_s"] > 0
    # the cache holds 4 requests of 24 + 8 tokens in 16-token pages, rounded up by transformers' allocator
    assert result["kv_cache_tokens"] >= 4 * 32
    assert result["repeats"][0]["preempted"] == 0
    assert result["kv_shape"] == {"layers": 12, "kv_heads": 2, "head_dim": 8}
    assert result["kv_bytes_per_token"] == 2 * 12 * 2 * 8 * 4  # float32 on CPU
    assert result["device"] == "cpu" and result["dtype"] == "float32" and result["threads"] >= 1
    manifest = json.loads((bench_dir / "manifest.json").read_text())
    assert manifest["stage"] == "bench-serving"
    assert manifest["inputs"][0]["role"] == "model" and manifest["inputs"][0]["path"] == str(tiny_llama)
    with pa.memory_map(str(bench_dir / "result.arrow")) as source:
        table = pa.ipc.open_stream(source).read_all()
    assert table.num_rows == 1 and table.column("iteration_s")[0].as_py() == result["iteration_s"]
    # every iteration is recorded with what it processed: each run's prompt tokens are prefilled once and
    # each request decodes all its tokens but the first (which comes out of its last prefill chunk), as the
    # capacity formula counts it: ⌈s/ŝ⌉ + o − 1 iterations a request, one of them its (single) prefill chunk
    with pa.memory_map(str(bench_dir / "iterations.arrow")) as source:
        rows = pa.ipc.open_stream(source).read_all().to_pylist()
    runs = {name: [r for r in rows if r["run"] == name] for name in ("saturated", "prefill", "decode")}
    assert sum(r["prefill_tokens"] for r in runs["saturated"]) == 16 * 24
    assert sum(r["decode_seqs"] for r in runs["saturated"]) == 16 * (iterations(24, 8, 32) - 1) == 16 * 7
    assert sum(r["prefill_tokens"] for r in runs["prefill"]) == 8 * 24
    assert sum(r["decode_seqs"] for r in runs["prefill"]) == 8 * (iterations(24, 1, 32) - 1) == 0
    decode_new = result["decode_run_output_len"]
    assert sum(r["prefill_tokens"] for r in runs["decode"]) == 4 * 24
    assert sum(r["decode_seqs"] for r in runs["decode"]) == 4 * (decode_new - 1)
    assert max(r["decode_seqs"] + (r["prefill_tokens"] > 0) for r in rows) <= 4  # --concurrency
    assert max(r["prefill_tokens"] + r["decode_seqs"] for r in rows) <= 4 + 32  # the token budget
    # the KV the batch holds: in the decode run's last iteration, each sequence still running holds its
    # prompt and all its tokens but the last
    last = runs["decode"][-1]
    assert last["prefill_tokens"] == 0 and last["kv_tokens"] == last["decode_seqs"] * (24 + decode_new - 1)
    assert result["iteration_records_exact"] is True
    timed = [r for r in rows if r["seconds"] is not None]
    assert all(r["seconds"] > 0 and 0 < r["forward_s"] <= r["seconds"] for r in timed)
    b = result["iteration_model"]
    assert b["records"] == len(timed) == len(rows) - 3  # each run's last iteration has no next start
    assert b["intercept_s"] > 0 and b["prefill_token_s"] >= 0 and b["decode_seq_s"] >= 0
    assert b["rmse_s"] is not None and b["mean_abs_rel_error"] is not None


@pytest.mark.slow  # measures continuous batching for seconds
def test_capacity_reads_the_measurement(bench_dir, tiny_llama, tmp_path):
    out = tmp_path / "cap"
    result = CliRunner().invoke(app, [
        "capacity", str(bench_dir), str(tiny_llama), "--gpu-mem", "64MiB", "--prompt-len", "uniform:8:40",
        "--output-len", "geometric:8", "--samples", "2000", "--chunk", "32", "--dtype", "float32",
        "--iteration-time", "0.5", "--rate", "10", "--out", str(out),
    ])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(out)
    measured = json.loads((bench_dir / "result.json").read_text())
    rows = json.loads((out / "result.json").read_text())["models"]
    bench_row, plain_row = rows
    # the bench artifact supplies b̄, P, D and the sequence cap it was measured at; the plain model
    # takes --iteration-time and has no cap
    # by default b(p, d, k) as bench-serving fitted it, evaluated at the batch the saturated worker runs
    assert bench_row["iteration_model"] == measured["iteration_model"]
    assert bench_row["iteration_source"].startswith("measured (b(p, d, k)")
    batch = bench_row["saturated_batch"]
    b = IterationModel.from_dict(measured["iteration_model"])
    assert bench_row["iteration_s"] == batch["iteration_s"] == pytest.approx(
        float(b.seconds(batch["prefill_tokens"], batch["decode_seqs"], batch["kv_tokens"])))
    assert batch["prefill_tokens"] == pytest.approx(
        batch["requests"] * bench_row["mean_prompt_len"] / bench_row["mean_iterations"])
    # a request's first output token comes out of its last prefill chunk: it decodes E[o] − 1 tokens
    per_token = b.prefill_token_s * bench_row["mean_prompt_len"] + b.decode_seq_s * (bench_row["mean_output_len"] - 1)
    assert bench_row["max_seqs"] == 4
    assert bench_row["token_rate"] == (pytest.approx(1 / per_token) if per_token > 0 else None)
    assert plain_row["iteration_s"] == 0.5 and plain_row["max_seqs"] is None and plain_row["token_rate"] is None
    # same model: same KV bytes per token and M whichever way it was given
    assert bench_row["kv_bytes_per_token"] == plain_row["kv_bytes_per_token"] == 2 * 12 * 2 * 8 * 4
    assert bench_row["parameters"] == plain_row["parameters"]
    assert bench_row["kv_capacity_tokens"] == plain_row["kv_capacity_tokens"]
    assert "same KV bytes per token" in result.stderr
    # the measured concurrency of 4 caps the batch: memory is far from binding
    assert bench_row["binding"] in ("sequences", "tokens")
    # 64 MiB of KV cache holds far more than the 4 sequences b̄ was measured at: μ is marked extrapolated
    assert bench_row["measured_concurrency"] == 4 and plain_row["measured_concurrency"] is None
    assert bench_row["implied_concurrency"] == pytest.approx(
        bench_row["kv_capacity_tokens"] / (bench_row["mean_prompt_len"] + bench_row["mean_output_len"]))
    assert bench_row["implied_concurrency"] > 2 * 4
    assert bench_row["iteration_extrapolated"] is True and not plain_row["iteration_extrapolated"]
    assert "μ is extrapolated" in result.stderr and "--concurrency" in result.stderr
    assert "overrides" not in result.stderr
    constant = CliRunner().invoke(app, [
        "capacity", str(bench_dir), "--gpu-mem", "64MiB", "--prompt-len", "uniform:8:40", "--output-len",
        "geometric:8", "--samples", "2000", "--chunk", "32", "--dtype", "float32", "--iteration-stat", "median",
        "--out", str(tmp_path / "cap-median")])
    assert constant.exit_code == 0, constant.stderr
    row = json.loads((tmp_path / "cap-median" / "result.json").read_text())["models"][0]
    assert row["iteration_s"] == measured["iteration_s"] and row["iteration_model"] is None
    # memory in whole pages: the cache's, and E[g] with every iteration's KV rounded up to pages of 16
    assert row["page_size"] == 16 and row["mean_lifetime_memory_paged"] > row["mean_lifetime_memory"]
    assert row["memory_rate"] == pytest.approx(
        row["kv_capacity_tokens"] // 16 * 16 / (measured["iteration_s"] * row["mean_lifetime_memory_paged"]))
    override = CliRunner().invoke(app, [
        "capacity", str(bench_dir), "--gpu-mem", "64MiB", "--prompt-len", "uniform:8:40", "--output-len",
        "geometric:8", "--samples", "2000", "--chunk", "32", "--dtype", "float32", "--max-seqs", "3",
        "--out", str(tmp_path / "cap2")])
    assert override.exit_code == 0, override.stderr
    assert "--max-seqs 3 overrides the concurrency b̄ was measured at (4 sequences)" in override.stderr


@pytest.mark.slow  # measures continuous batching for seconds
def test_bench_serving_through_the_cli(tiny_llama, tmp_path):
    out = tmp_path / "serve"
    options = ["--chunk", "32", "--concurrency", "2", "--prompt-len", "24", "--output-len", "6", "--repeats", "1"]
    result = CliRunner().invoke(app, ["bench-serving", str(tiny_llama), *options, "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(out)
    assert json.loads((out / "manifest.json").read_text())["config"]["concurrency"] == 2
    missing = CliRunner().invoke(app, ["bench-serving", str(tiny_llama), *options])
    assert missing.exit_code == 2 and "--out" in missing.stderr
    # the deprecated alias `bench --serving` is gone
    gone = CliRunner().invoke(app, ["bench", str(tiny_llama), "--serving", *options, "--out", str(tmp_path / "a")])
    assert gone.exit_code == 2 and "No such option: --serving" in gone.stderr


@pytest.mark.slow  # serves the workload with continuous batching at six offered loads (~15 s)
def test_capacity_validates_against_the_measured_server(bench_dir, tmp_path):
    """`capacity --validate` on a bench-serving artifact serves the workload for real at 0.5 to 1.6 × the
    formula's rate (1.6 twice) with a KV cache in which memory binds, and replays the same requests in the
    simulator. Requests of 20 to 32 tokens hold 2 pages of 16 (rounded up, as the cache allocates them), and
    decode o − 1 times. The knee is judged in one run: the formula and the simulator with b(p, d, k) scaled to
    the speed the server ran at during each load, within 30% plus twice the spread of the load served twice
    (the machine's own noise, which on a busy shared machine is what moves a tiny model's knee)."""
    out = tmp_path / "cap"
    result = CliRunner().invoke(app, [
        "capacity", str(bench_dir), "--gpu-mem", "64MiB", "--prompt-len", "uniform:16:24", "--output-len",
        "uniform:4:8", "--samples", "2000", "--chunk", "32", "--dtype", "float32", "--validate",
        "--validate-requests", "32", "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    measured = json.loads((bench_dir / "result.json").read_text())
    row = json.loads((out / "result.json").read_text())["models"][0]
    v = row["server_validation"]
    # the server is the one bench-serving measured (budget, cap, pages, b(p, d, k)) with a smaller cache: in
    # bench-serving's (4 requests at their peak) the cap of 4 binds; in this one memory does, and the result says so
    assert v["measured_kv_tokens"] == measured["kv_cache_tokens"]
    assert v["server"]["max_seqs"] == 4 and v["server"]["max_batch_tokens"] == 4 + 32
    assert v["server"]["iteration"] == measured["iteration_model"]
    assert v["server"]["kv_tokens"] < measured["kv_cache_tokens"] and v["server"]["kv_tokens"] % 16 == 0
    pred = v["prediction"]
    assert v["binding"] == pred["binding"] == "memory" and pred["memory_residents"] < 4
    assert pred["memory_rate"] < pred["sequence_rate"]
    # a bound the fit leaves unlimited (no per-token cost on this tiny model) is None, not zero
    bounds = [pred[k] for k in ("memory_rate", "token_rate", "sequence_rate") if pred[k] is not None]
    assert pred["max_stable_rate"] == min(bounds)
    with pa.memory_map(str(out / "validation.arrow")) as source:
        rows = pa.ipc.open_stream(source).read_all().to_pylist()
    assert [(r["source"], r["load"]) for r in rows] == \
        [(kind, load) for load in (0.5, 0.8, 1.0, 1.25, 1.6) for kind in ("measured", "simulator")]
    by = {(r["source"], r["load"]): r for r in rows}
    for r in rows:
        assert r["completed"] == r["requests"] == 32
        assert r["offered_rate"] == pytest.approx(r["load"] * pred["max_stable_rate"])
    # the same requests on both sides: offered rates in the steady window agree exactly
    for load in (0.5, 1.6):
        assert by["measured", load]["offered_rate"] == by["simulator", load]["offered_rate"]
    # the headline is the formula on the workload's own E[g]; the requests served hold it closely
    assert v["formula_vs_measured_knee"] == pred["max_stable_rate"] / v["measured_knee"]
    assert v["targets"]["knee_within_15pct"] == (abs(v["formula_vs_measured_knee"] - 1) <= 0.15)
    assert v["offered_prediction"]["max_stable_rate"] == pytest.approx(pred["max_stable_rate"], rel=0.05)
    # the run's own noise: the highest load served twice, the same requests at the same times
    noise = v["noise"]
    assert noise["load"] == 1.6 and noise["throughput"][0] == by["measured", 1.6]["throughput"]
    # 30% for a tiny model on 2 shared cores (the filed 15% is the 6-layer student's target, docs/capacity.md):
    # two servings of one load can agree while a stall hits another load (seen: spread 0.0%, knee ratio 0.83)
    tolerance = 0.30 + 2 * noise["spread"]
    stated = (f"tolerance 30% + 2 × the run's noise ({noise['spread']:.1%}: throughput at 1.6 × served twice, "
              f"{noise['throughput'][0]:.3g} and {noise['throughput'][1]:.3g} req/s) = {tolerance:.1%}")
    # judged on ratios measured in this run: b(p, d, k) scaled by how much slower or faster the server ran during
    # each load (stalls of the busy machine included) drives the simulator's replay of that load and, at the
    # knee's load, the formula (min(λ, rate) there), so a machine busier or idler than when bench-serving ran,
    # or during another load, moves both sides alike
    in_run = v["in_run"]
    assert all(factor > 0 for factor in in_run["speed_factors"])
    # at half the formula's rate the server keeps up with what is offered, as its replay does
    assert in_run["simulator_vs_measured_throughput"][0] == pytest.approx(1.0, abs=tolerance), stated
    # the knee against the replay of the same load
    at = (0.5, 0.8, 1.0, 1.25, 1.6).index(in_run["knee_load"])
    assert by["measured", in_run["knee_load"]]["throughput"] == v["measured_knee"]
    assert in_run["simulator_vs_measured_knee"] == in_run["simulator_vs_measured_throughput"][at]
    assert in_run["simulator_vs_measured_knee"] == pytest.approx(1.0, abs=tolerance), stated
    # the formula is a long-run capacity, the knee the best of five windows of 32 requests: the run's own
    # sampling error, the simulator's knee on these requests against its long-run capacity, adds to the noise
    sampling = abs(v["replayed_knee"] / v["simulated_capacity"] - 1)
    assert in_run["formula_vs_measured_knee"] == pytest.approx(1.0, abs=tolerance + sampling), \
        f"{stated}, + {sampling:.1%} for the knee of 32 requests"
    # formula and simulator on the same fit (no measurement in between): within the 10% target
    assert v["formula_vs_simulator"] == pytest.approx(1.0, rel=0.10)
    # b(p, d, k) was fitted on bench-serving's fixed-length runs; on this workload's iterations of a tiny model
    # (Python overhead, 2 shared cores) it is off by 10-60% on a quiet machine and more on a busy one: an earlier
    # run's timing, so recorded, not gated
    assert v["live_fit_error"] > 0 and all(r["fit_error"] > 0 for r in rows if r["source"] == "measured")
    assert (out / "validation.png").stat().st_size > 0 and (out / "queue.png").stat().st_size > 0
    assert "server: measured knee" in result.stderr and "server: binds" in result.stderr


@pytest.mark.slow  # measures continuous batching for seconds
def test_validation_refuses_a_workload_the_measured_cache_cannot_hold(bench_dir, tmp_path):
    result = CliRunner().invoke(app, [
        "capacity", str(bench_dir), "--gpu-mem", "64MiB", "--prompt-len", "200", "--output-len", "8",
        "--samples", "10", "--chunk", "32", "--dtype", "float32", "--validate", "--out", str(tmp_path / "c")])
    assert result.exit_code == 2
    assert "--validate" in result.stderr and "do not fit the KV cache" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "c").exists()
