"""`bltool bench` and the timer: the files and tables it writes, what it compares, where it finds the
training compute, and refused inputs. Tiny shapes and one repeat; nothing here asserts a speed."""

from __future__ import annotations

import json
import time

import pyarrow as pa
import pytest
import torch
from helpers import distilled_student
from typer.testing import CliRunner

from bltool.artifacts import read_manifest
from bltool.cli import app
from bltool.serve.end_to_end import decode_bytes_per_step
from bltool.serve.timing import measure
from bltool.stages.bench import summarize_end_to_end, summarize_modules

FAST = ["--prefill-tokens", "16", "--decode-batch", "1,2", "--decode-context", "4", "--decode-steps", "2",
        "--warmup", "0", "--repeats", "1", "--device", "cpu"]


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.fixture(scope="module")
def compressed(tmp_path_factory, tiny_llama):
    from bltool.stages.compress import CompressConfig, run

    root = tmp_path_factory.mktemp("bench")
    source, _ = distilled_student(root / "distilled", tiny_llama)
    return run(CompressConfig(model=str(source), out=str(root / "compressed"), dense_fallback=False))


def read_arrow(path):
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_stream(source).read_all()


def test_measure_interleaves_warms_up_and_keeps_setup_out_of_the_time():
    calls = []
    timing = measure({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, warmup=2, repeats=3,
                     setup={"b": lambda: (calls.append("setup"), time.sleep(0.02))})
    assert calls == ["a", "setup", "b"] * 5
    assert timing["a"]["repeats"] == 3 and len(timing["b"]["samples_s"]) == 3
    assert timing["b"]["median_s"] < 0.02  # the sleeping setup is not timed
    assert timing["a"]["min_s"] <= timing["a"]["median_s"] <= timing["a"]["max_s"]
    with pytest.raises(ValueError):
        measure({"a": lambda: None}, repeats=0)


def test_summaries_sum_over_modules_and_pick_the_bound():
    rows = [
        {"phase": "prefill", "batch": 1, "tokens": 8, "dense_s": 4.0, "compressed_s": 1.0, "dense_macs": 100,
         "macs": 20, "dense_weight_bytes": 400, "weight_bytes": 80},
        {"phase": "prefill", "batch": 1, "tokens": 8, "dense_s": 2.0, "compressed_s": 2.0, "dense_macs": 50,
         "macs": 50, "dense_weight_bytes": 200, "weight_bytes": 200},
        {"phase": "decode", "batch": 4, "tokens": 1, "dense_s": 3.0, "compressed_s": 2.0, "dense_macs": 100,
         "macs": 25, "dense_weight_bytes": 300, "weight_bytes": 100},
    ]
    prefill, decode = summarize_modules(rows)
    assert prefill["speedup"] == 2.0 and prefill["mac_ratio"] == 150 / 70 and prefill["bound"] == "macs"
    assert prefill["fraction_of_bound"] == pytest.approx(2.0 / (150 / 70))
    assert decode["speedup"] == 1.5 and decode["bytes_ratio"] == 3.0 and decode["fraction_of_bound"] == 0.5
    assert prefill["ungrouped_speedup"] == 2.0  # a row without an ungrouped time is its own ungrouped form
    rows[0]["ungrouped_s"] = 2.0
    prefill = summarize_modules(rows)[0]
    assert prefill["ungrouped_speedup"] == 1.5
    assert prefill["ungrouped_fraction_of_bound"] == pytest.approx(1.5 / (150 / 70))
    e2e = summarize_end_to_end([
        {"model": "baseline", "phase": "decode", "batch": 2, "tokens_per_s": 10.0,
         "macs_per_token": {"projections": 80, "total": 100}},
        {"model": "model", "phase": "decode", "batch": 2, "tokens_per_s": 15.0,
         "macs_per_token": {"projections": 20, "total": 40}},
    ])
    assert e2e == [{"phase": "decode", "batch": 2, "baseline_tokens_per_s": 10.0, "model_tokens_per_s": 15.0,
                    "speedup": 1.5, "mac_bound": 2.5, "projection_mac_ratio": 4.0,
                    "projection_share_of_baseline_macs": 0.8}]


def test_bench_writes_tables_arrow_and_json(tmp_path, compressed, tiny_llama):
    out = tmp_path / "runs" / "bench"
    result = invoke("bench", str(compressed), "--baseline", str(tiny_llama), "--out", str(out), *FAST,
                    "--kernel", "mm", "--threads", "1")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == f"{out}\n"
    for needle in ("(a) adapted modules", "(b) end to end", "(c) size", "(d) training compute", "proxy 0.59",
                   "realised 0.61", "kernel mm", "1 threads", "ungrouped"):
        assert needle in result.stderr, needle
    data = json.loads((out / "result.json").read_text())
    section = read_manifest(compressed)["compressed"]
    modules = read_arrow(out / "modules.arrow")
    # one row per module, or per group of low-rank members (q/k/v, gate/up) timed together, and shape
    units = modules.column("name").to_pylist()
    assert modules.num_rows == len(set(units)) * 3  # prefill + two decode shapes
    assert sorted(n for unit in set(units) for n in unit.split("+")) == sorted(m["name"] for m in section["modules"])
    grouped = [r for r in modules.to_pylist() if r["members"] > 1]
    assert grouped and all(r["layout"] == "+".join(["lowrank"] * r["members"]) for r in grouped)
    macs = {m["name"]: m["macs"] for m in section["modules"]}
    assert all(r["macs"] == sum(macs[n] for n in r["name"].split("+")) for r in modules.to_pylist())
    assert [(s["phase"], s["batch"], s["tokens"]) for s in data["modules"]] == [
        ("prefill", 1, 16), ("decode", 1, 1), ("decode", 2, 1)]
    assert data["modules"][0]["mac_ratio"] == pytest.approx(section["summary"]["mac_speedup"])
    e2e = read_arrow(out / "end_to_end.arrow").to_pylist()
    assert [(r["model"], r["phase"], r["batch"]) for r in e2e] == [
        ("baseline", "prefill", 1), ("model", "prefill", 1), ("baseline", "decode", 1), ("model", "decode", 1),
        ("baseline", "decode", 2), ("model", "decode", 2)]
    assert all(r["tokens_per_s"] > 0 for r in e2e)
    assert all(s["mac_bound"] < s["projection_mac_ratio"] for s in data["end_to_end"])  # head + attention
    decode = [s for s in data["end_to_end"] if s["phase"] == "decode"]
    for s in decode:  # the bytes bound: the weights and KV cache one decode step moves, baseline ÷ model
        pair = {r["model"]: r for r in e2e if (r["phase"], r["batch"]) == ("decode", s["batch"])}
        moved = {k: r["weight_bytes_per_step"] + r["kv_bytes_per_step"] for k, r in pair.items()}
        assert s["bytes_bound"] == pytest.approx(moved["baseline"] / moved["model"])
        assert 1.0 < s["bytes_bound"]  # the compressed student has fewer weight bytes; the KV cache is the same
        assert pair["baseline"]["kv_bytes_per_step"] == pair["model"]["kv_bytes_per_step"]
    assert decode[0]["bytes_bound"] > decode[1]["bytes_bound"]  # more sequences: the KV cache's share grows
    assert "bytes bound" in result.stderr and "MAC estimate" in result.stderr
    assert data["machine"]["kernel"] == "mm" and data["machine"]["threads"] == 1
    assert data["machine"]["dtype"] == "float32" and data["protocol"]["repeats"] == 1
    assert data["training_compute"]["proxy"] == 0.59 and data["training_compute"]["source_stage"] == "distill"
    assert data["size"]["model"]["parameters"] < data["size"]["baseline"]["parameters"]
    assert read_manifest(out, ("bench",))["inputs"][1]["role"] == "baseline"


def test_training_compute_follows_inputs_then_falls_back_to_the_copy(tmp_path, tiny_llama):
    from bltool.stages.bench import training_compute
    from bltool.stages.compress import CompressConfig, run

    source, _ = distilled_student(tmp_path / "s", tiny_llama, compute={"proxy": 0.5, "realised": 0.7})
    out = run(CompressConfig(model=str(source), out=str(tmp_path / "c")))
    found = training_compute(out)
    assert (found["proxy"], found["source_stage"], found["source"]) == (0.5, "distill", str(source))
    (source / "model.safetensors").write_bytes(b"changed")  # the distill artifact no longer matches
    found = training_compute(out)
    assert (found["proxy"], found["source_stage"]) == (0.5, "compress")
    assert training_compute(tiny_llama) is None


def test_bench_of_a_distilled_student(tmp_path, tiny_llama):
    source, _ = distilled_student(tmp_path / "s", tiny_llama, compute={"proxy": 0.38, "realised": None})
    out = tmp_path / "b"
    result = invoke("bench", str(source), "--baseline", str(tiny_llama), "--out", str(out), *FAST,
                    "--no-end-to-end")
    assert result.exit_code == 0, result.stderr
    data = json.loads((out / "result.json").read_text())
    assert {r["layout"] for r in data["module_runs"]} == {"gated-lora"} and data["end_to_end"] == []
    assert not (out / "end_to_end.arrow").exists()
    assert "proxy 0.38, realised n/a" in result.stderr


def test_bench_defaults_its_output_next_to_the_model(tmp_path, compressed, tiny_llama):
    result = invoke("bench", str(compressed), "--baseline", str(tiny_llama), *FAST, "--no-modules",
                    "--no-end-to-end")
    assert result.exit_code == 0, result.stderr
    out = compressed.parent / "bench" / f"{compressed.parent.name}-compressed"  # named after its run
    assert result.stdout == f"{out}\n" and (out / "result.json").is_file()


@pytest.mark.parametrize("extra, needles", [
    (["--decode-batch", "1,x"], ["--decode-batch"]),
    (["--decode-batch", "0"], ["--decode-batch"]),
    (["--kernel", "fastest"], ["--kernel"]),
    (["--repeats", "0"], ["--repeats"]),
    (["--dtype", "int8"], ["--dtype"]),
    (["--baseline-other"], ["--baseline", "architecture"]),
    (["--no-baseline"], ["--baseline", "required"]),
])
def test_bad_inputs_are_refused_in_one_line(extra, needles, tmp_path, compressed, tiny_llama, other_model):
    baseline = ["--baseline", str(tiny_llama)]
    if extra == ["--baseline-other"]:
        extra, baseline = [], ["--baseline", str(other_model)]
    elif extra == ["--no-baseline"]:
        extra, baseline = [], []
    out = tmp_path / "b"
    result = invoke("bench", str(compressed), *baseline, "--out", str(out), *FAST, *extra)
    assert result.exit_code == 2, (result.exit_code, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert result.stdout == "" and len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for needle in needles:
        assert needle in lines[0]
    assert not out.exists()


def test_cuda_events_are_recorded_on_the_model_devices_stream(monkeypatch):
    """`--device cuda:1`: the events must be on cuda:1's stream, not the current device's (cuda:0).
    No GPU here, so torch.cuda's stream and event are stand-ins that record where they were used."""
    recorded = []

    class Stream:
        def __init__(self, device):
            self.device = torch.device(device)

    class Event:
        def __init__(self, enable_timing=False):
            assert enable_timing

        def record(self, stream=None):
            recorded.append(stream.device if stream is not None else torch.device("cuda", 0))

        def synchronize(self):
            """Nothing to wait for."""

        def elapsed_time(self, other):
            return 2.0

    monkeypatch.setattr(torch.cuda, "current_stream", Stream)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    result = measure({"f": lambda: None}, warmup=0, repeats=2, device="cuda:1")
    assert result["f"]["median_s"] == 0.002
    assert recorded == [torch.device("cuda", 1)] * 4


def test_decode_bytes_count_each_weight_once_and_the_kv_cache_per_sequence(tiny_llama):
    """A decode step of B sequences over c cached positions moves every weight once (tied embeddings: the
    head's matrix, read once), one embedding row per sequence and 2 · layers · kv heads · head dim values
    per position (c read, one written) per sequence; a gated module at ρ = 0 does not read its dense weight."""
    from bltool.adapt.lora import LoRASpec, inject_lora
    from bltool.models.loading import load_model, resolve_model

    model = load_model(resolve_model(str(tiny_llama)))
    cfg = model.config
    unique = {id(p): p for p in model.parameters()}
    all_bytes = sum(p.numel() * p.element_size() for p in unique.values())
    kv_heads, head_dim = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    moved = decode_bytes_per_step(model, batch=3, context=9.0)
    assert cfg.tie_word_embeddings  # the embedding rows are the head's matrix, read once already
    assert moved["weights"] == all_bytes
    assert moved["kv"] == 2 * cfg.num_hidden_layers * kv_heads * head_dim * 4 * 3 * 10
    adapted = inject_lora(model, LoRASpec(rank=2, alpha=4.0, targets=("down_proj",)))
    lora_bytes = sum(p.numel() * 4 for _, m in adapted for n, p in m.named_parameters() if not n.startswith("base."))
    assert decode_bytes_per_step(model, 3, 9.0)["weights"] == all_bytes + lora_bytes
    _, first = adapted[0]
    first.set_rho(0.0)
    dropped = decode_bytes_per_step(model, 3, 9.0)["weights"]
    assert dropped == all_bytes + lora_bytes - first.base.weight.numel() * 4
    untied = load_model(resolve_model(str(tiny_llama)))
    untied.lm_head.weight = torch.nn.Parameter(untied.lm_head.weight.detach().clone())  # its own matrix
    head_bytes = untied.lm_head.weight.numel() * 4
    embedding_bytes = untied.model.embed_tokens.weight.numel() * 4  # untied: only 3 rows of it are read
    assert decode_bytes_per_step(untied, 3, 9.0)["weights"] == \
        all_bytes - embedding_bytes + head_bytes + 3 * cfg.hidden_size * 4


def test_vllm_engine_summary_ratios():
    """bench --engine vllm: vLLM's speedup, the share of transformers' speedup it keeps, and vLLM over
    transformers per model, from the runs of both engines."""
    from bltool.serve.vllm_bench import summarize

    def row(model, phase, tps, **extra):
        return {"model": model, "phase": phase, "batch": 1, "tokens_per_s": tps, **extra}

    vllm_rows = [row("baseline", "decode", 60.0), row("model", "decode", 90.0),
                 row("baseline", "saturation", 300.0, requests_per_s=4.0),
                 row("model", "saturation", 450.0, requests_per_s=6.0)]
    hf_rows = [row("baseline", "decode", 50.0), row("model", "decode", 60.0)]
    decode, saturation = summarize(vllm_rows, hf_rows)
    assert decode["vllm_speedup"] == pytest.approx(1.5) and decode["hf_speedup"] == pytest.approx(1.2)
    assert decode["speedup_kept"] == pytest.approx(1.25)
    assert decode["model_vllm_over_hf"] == pytest.approx(1.5) and decode["baseline_vllm_over_hf"] == pytest.approx(1.2)
    assert saturation["vllm_model_requests_per_s"] == 6.0 and "hf_speedup" not in saturation


def test_vllm_engine_without_vllm_is_a_usage_error(tmp_path):
    try:
        import vllm  # noqa: F401
        pytest.skip("vLLM is installed here")
    except ImportError:
        pass
    result = CliRunner().invoke(app, ["bench", str(tmp_path / "m"), "--baseline", str(tmp_path / "b"),
                                      "--engine", "vllm", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "bltool[vllm]" in result.stderr
    assert not (tmp_path / "out").exists()
    bad = CliRunner().invoke(app, ["bench", "m", "--baseline", "b", "--engine", "tgi"])
    assert bad.exit_code == 2 and "--engine" in bad.stderr


def test_a_distilled_student_is_refused_as_baseline_and_by_vllm_saying_what_to_pass(compressed, tiny_llama, tmp_path):
    """The baseline must be dense, and vLLM cannot load a student that still carries its adapters: one line each,
    naming the form to pass instead (before any model loads or vLLM is imported)."""
    source, _ = distilled_student(tmp_path / "distilled", tiny_llama)
    out = tmp_path / "out"
    result = invoke("bench", str(compressed), "--baseline", str(source), "--out", str(out), *FAST)
    assert result.exit_code == 2 and result.stdout == "", result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "--baseline" in line and "gated LoRA module, not dense" in line and "build-student" in line
    result = invoke("bench-serving", str(source), "--engine", "vllm", "--out", str(out))
    assert result.exit_code == 2 and result.stdout == "", result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: MODEL {source} is a `bltool distill` output (a gated LoRA student), which vLLM cannot load; pass "
        f"its compressed form (`bltool compress {source} --out DIR`)"]
    assert not out.exists()
