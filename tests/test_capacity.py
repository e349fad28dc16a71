"""`bltool capacity` through the CLI: the plan by hand on a tiny model, workloads, and bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pytest
from helpers import assert_refused
from typer.testing import CliRunner

from bltool.cli import app
from bltool.models.loading import checkpoint_parameters, count_parameters, load_model, resolve_model
from bltool.units import parse_bytes

MIB = 2**20


def invoke(*args: str):
    return CliRunner().invoke(app, ["capacity", *args])


def write_trace(path, rows, header="prompt_tokens,output_tokens"):
    path.write_text(header + "\n" + "".join(f"{a},{b}\n" for a, b in rows))
    return path


def test_checkpoint_parameters_counts_tied_weights_once(tiny_llama, tiny_mistral):
    for path in (tiny_llama, tiny_mistral):  # tied and untied embeddings
        model = load_model(resolve_model(str(path)))
        assert checkpoint_parameters(path) == count_parameters(model)


def test_parse_bytes():
    assert parse_bytes("80GiB", "--gpu-mem") == 80 * 2**30
    assert parse_bytes("80Gi", "--gpu-mem") == 80 * 2**30
    assert parse_bytes("80GB", "--gpu-mem") == 80 * 10**9
    assert parse_bytes("1.5e9", "--gpu-mem") == 1_500_000_000
    assert parse_bytes("4096", "--gpu-mem") == 4096


def test_plan_by_hand(tiny_llama, tmp_path):
    trace = write_trace(tmp_path / "trace.csv", [(64, 16), (10, 3), (200, 50)])
    out = tmp_path / "cap"
    result = invoke(str(tiny_llama), "--gpu-mem", "2MiB", "--mem-util", "0.5", "--activation-reserve", "100KiB",
                    "--workload", str(trace), "--chunk", "32", "--iteration-time", "0.01", "--rate", "30",
                    "--target-util", "0.5", "--out", str(out))
    assert result.exit_code == 0, result.stderr
    assert result.stdout == f"{out}\n"  # stdout carries only the path; the table goes to stderr
    assert "M (KV tokens)" in result.stderr
    row = json.loads((out / "result.json").read_text())["models"][0]
    params = checkpoint_parameters(tiny_llama)
    kv = 2 * 12 * 2 * 8 * 2  # layers · KV heads · head_dim, keys and values, bf16
    m_tokens = math.floor((2 * MIB * 0.5 - 2 * params - 100 * 1024) / kv)
    # KV tokens held per iteration: the prefill chunks of 32 (the last emits the first output token), then
    # o − 1 decodes holding s + 1 … s + o − 1
    g = [(32 + 64) + 15 * 64 + 15 * 16 // 2, 10 + 11 + 12, (32 + 64 + 96 + 128 + 160 + 192 + 200) + 49 * 200 + 49 * 25]
    # the same in whole pages of 16 (--page-size): 65 … 79 tokens hold 80; 201 … 249 hold 208, 224, 240, 256
    paged = [(32 + 64) + 15 * 80, 3 * 16,
             (32 + 64 + 96 + 128 + 160 + 192 + 208) + 8 * 208 + 16 * 224 + 16 * 240 + 9 * 256]
    assert row["kv_bytes_per_token"] == kv and row["weight_bytes"] == 2 * params
    assert row["kv_capacity_tokens"] == m_tokens and row["page_size"] == 16
    assert row["mean_lifetime_memory"] == pytest.approx(np.mean(g))
    assert row["mean_lifetime_memory_paged"] == pytest.approx(np.mean(paged))
    assert row["mean_iterations"] == pytest.approx(np.mean([2 + 15, 1 + 2, 7 + 49]))
    mu = m_tokens // 16 * 16 / (0.01 * np.mean(paged))  # the cache's whole pages
    assert row["memory_rate"] == pytest.approx(mu)
    assert row["delta"] == pytest.approx(250 / m_tokens)
    assert row["binding"] == "memory" and row["max_stable_rate"] == pytest.approx(mu)
    assert row["gpus"] == math.ceil(30 / (0.5 * mu))
    with pa.memory_map(str(out / "result.arrow")) as source:
        table = pa.ipc.open_stream(source).read_all()
    assert table.num_rows == 1 and table.column("gpus")[0].as_py() == row["gpus"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "capacity" and [i["role"] for i in manifest["inputs"]] == ["model", "workload"]


def test_trace_formats_and_columns(tiny_llama, tmp_path):
    rows = [(100, 20), (300, 80), (50, 5)]
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text("".join(json.dumps({"in": a, "out": b, "id": i}) + "\n" for i, (a, b) in enumerate(rows)))
    arrow = tmp_path / "t.arrow"
    table = pa.table({"in": [a for a, _ in rows], "out": [b for _, b in rows]})
    with pa.OSFile(str(arrow), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    results = []
    for path in (jsonl, arrow):
        out = tmp_path / f"cap-{path.suffix[1:]}"
        result = invoke(str(tiny_llama), "--gpu-mem", "8MiB", "--workload", str(path), "--prompt-column", "in",
                        "--output-column", "out", "--iteration-time", "0.02", "--out", str(out))
        assert result.exit_code == 0, result.stderr
        results.append(json.loads((out / "result.json").read_text()))
    assert results[0]["models"] == results[1]["models"]
    assert results[0]["workload"]["requests"] == 3 and results[0]["workload"]["max_request_tokens"] == 380


def test_distributions_are_seeded(tiny_llama, tmp_path):
    args = ["--gpu-mem", "8MiB", "--prompt-len", "lognormal:100:0.5", "--output-len", "uniform:4:40",
            "--samples", "500", "--iteration-time", "0.02"]
    first = invoke(str(tiny_llama), *args, "--seed", "7", "--out", str(tmp_path / "a"))
    second = invoke(str(tiny_llama), *args, "--seed", "7", "--out", str(tmp_path / "b"))
    assert first.exit_code == second.exit_code == 0, first.stderr
    a, b = (json.loads((tmp_path / d / "result.json").read_text()) for d in ("a", "b"))
    assert a["models"][0]["mean_lifetime_memory"] == b["models"][0]["mean_lifetime_memory"]
    assert a["workload"]["requests"] == 500


@pytest.mark.parametrize(
    ("rows", "header", "needles"),
    [
        ([(64, 16), (-5, 3)], None, ("--workload", "prompt_tokens", "row 2", "-5")),
        ([(64, 0)], None, ("output_tokens", "row 1", "at least 1")),
        ([(64, 16), (3.5, 2)], None, ("row 2", "whole number")),
        ([], None, ("no requests",)),
        ([(64, 16)], "prompt,output_tokens", ("no column 'prompt_tokens'", "--prompt-column")),
        ([(64, 16), (100_000, 10)], None, ("request 2", "100,010 KV tokens", "more than M")),
        ([(64, 16), ("", 3)], None, ("row 2", "empty")),
    ],
)
def test_bad_traces_are_refused(tiny_llama, tmp_path, rows, header, needles):
    trace = write_trace(tmp_path / "trace.csv", rows, header or "prompt_tokens,output_tokens")
    out = tmp_path / "cap"
    assert_refused(invoke(str(tiny_llama), "--gpu-mem", "8MiB", "--workload", str(trace), "--iteration-time",
                          "0.01", "--out", str(out)), *needles)
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--gpu-mem", "80 parsecs"], ("--gpu-mem", "80GiB")),
        (["--gpu-mem", "10KiB"], ("no KV cache", "weights need")),
        (["--gpu-mem", "8MiB", "--prompt-len", "normal:3"], ("--prompt-len", "uniform:LOW:HIGH")),
        (["--gpu-mem", "8MiB", "--prompt-len", "-4"], ("--prompt-len", "≥ 1")),
        (["--gpu-mem", "8MiB", "--mem-util", "1.5"], ("--mem-util",)),
        (["--gpu-mem", "8MiB", "--dtype", "int4"], ("--dtype",)),
        (["--gpu-mem", "8MiB", "--rate", "-3"], ("--rate",)),
        (["--gpu-mem", "8MiB", "--workload", "trace.csv"], ("--workload", "not both")),
    ],
)
def test_bad_flags_are_refused(tiny_llama, tmp_path, args, needles):
    base = ["--prompt-len", "64", "--output-len", "16", "--iteration-time", "0.01"]
    # later occurrences of a flag win in Typer, so the case's own flags go last
    out = tmp_path / "cap"
    assert_refused(invoke(str(tiny_llama), *base, *args, "--out", str(out)), *needles)
    assert not out.exists()


def test_missing_iteration_time_and_unknown_model(tiny_llama, tmp_path):
    assert_refused(invoke(str(tiny_llama), "--gpu-mem", "8MiB", "--prompt-len", "64", "--output-len", "16",
                          "--out", str(tmp_path / "a")), "no measured iteration time", "bench", "--iteration-time")
    assert_refused(invoke("no-such-model", "--gpu-mem", "8MiB", "--prompt-len", "64", "--output-len", "16",
                          "--iteration-time", "0.01", "--out", str(tmp_path / "b")), "MODELS", "no-such-model")
    assert_refused(invoke(str(tiny_llama), "--gpu-mem", "8MiB", "--iteration-time", "0.01",
                          "--out", str(tmp_path / "c")), "--workload", "--prompt-len")
