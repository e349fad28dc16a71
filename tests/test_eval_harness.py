"""eval-harness: lm-evaluation-harness run on a bltool student (a distilled one, with adapters, which only
bltool's loader can rebuild) over a local multiple-choice task written by the test, offline. The harness's
accuracy must equal the one computed here from the same model's log-likelihoods; the command refuses bad
input, and without lm-eval says how to install it."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import pytest
import torch
from helpers import assert_refused, distilled_student, save_tiny_model
from typer.testing import CliRunner

from bltool.artifacts import read_manifest
from bltool.cli import app

QUESTIONS = ["river", "house", "model", "green", "small", "teacher", "token", "python"]
CHOICES = ["dog", "blue tree", "slow"]
TASK = "bltool_tiny_mc"


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """Nothing may be downloaded: the hub and datasets run offline, with caches in the test's directory."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="module")
def student(tmp_path_factory, tokenizer):
    """A budgeted-lora student (LoRA factors, gates, ρ) of a tiny random Llama: its outputs differ from the
    teacher's, and transformers alone cannot load it."""
    root = tmp_path_factory.mktemp("harness")
    teacher = save_tiny_model(root / "teacher", tokenizer, "llama", layers=2, seed=7)
    path, model = distilled_student(root / "student", teacher, seed=1)
    return path, teacher, model


def continuation_logprob(model, tokenizer, context: str, continuation: str) -> float:
    """Σ log p(continuation | context), split as lm_eval splits a request: the whole string is encoded
    and the context's tokens are cut off its front."""
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    assert whole[: len(ctx)] == ctx
    with torch.no_grad():
        logits = model(torch.tensor([whole])).logits[0].float()  # (T, V)
    logprobs = torch.log_softmax(logits, dim=-1)
    return float(sum(logprobs[i - 1, whole[i]] for i in range(len(ctx), len(whole))))


def model_choices(model, tokenizer) -> list[int]:
    """The choice the model's log-likelihood picks for each question (lm_eval: context, then " " + choice)."""
    picks = []
    for q in QUESTIONS:
        scores = [continuation_logprob(model, tokenizer, f"Q: {q}\nA:", f" {c}") for c in CHOICES]
        picks.append(max(range(len(CHOICES)), key=lambda i: scores[i]))
    return picks


def write_task(root: Path, answers: list[int]) -> Path:
    """A local lm_eval multiple-choice task over a JSON Lines file (dataset_path: json)."""
    root.mkdir(parents=True, exist_ok=True)
    data = root / "items.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": CHOICES, "answer": a}) + "\n"
                            for q, a in zip(QUESTIONS, answers)), encoding="utf-8")
    (root / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Q: {{question}}\\nA:"\n'
        "doc_to_choice: choices\n"
        "doc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  version: 1.0\n", encoding="utf-8")
    return root


def test_accuracy_equals_the_models_own_loglikelihoods(student, tmp_path):
    pytest.importorskip("lm_eval")
    from bltool.models.loading import load_model, load_tokenizer, resolve_model

    path, teacher, _ = student
    ref = resolve_model(str(path))
    model, tokenizer = load_model(ref), load_tokenizer(ref)
    picks = model_choices(model, tokenizer)
    # the model's own pick is the answer for the first 5 questions, another choice for the last 3: the
    # student scores 5/8; a model that picks differently (the teacher it was made from) scores otherwise
    answers = [p if i < 5 else (p + 1) % len(CHOICES) for i, p in enumerate(picks)]
    expected = sum(a == p for a, p in zip(answers, picks)) / len(QUESTIONS)
    assert expected == 5 / 8
    other = resolve_model(str(teacher))
    teacher_picks = model_choices(load_model(other), load_tokenizer(other))
    assert sum(a == p for a, p in zip(answers, teacher_picks)) / len(QUESTIONS) != expected

    tasks = write_task(tmp_path / "tasks", answers)
    out = tmp_path / "harness"
    result = CliRunner().invoke(app, ["eval-harness", str(path), "--tasks", TASK, "--include-path", str(tasks),
                                      "--device", "cpu", "--batch-size", "3", "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    assert result.stdout == f"{out}\n"
    results = json.loads((out / "results.json").read_text())
    assert results["results"][TASK]["acc,none"] == pytest.approx(expected)
    manifest = read_manifest(out, ("eval-harness",))
    assert manifest["result"][TASK]["acc,none"] == pytest.approx(expected)
    assert manifest["inputs"][0]["role"] == "model" and manifest["inputs"][0]["content"]
    assert {i["path"] for i in manifest["inputs"][1:]} == {str((tasks / f"{TASK}.yaml").absolute())}
    assert manifest["config"]["tasks"] == [TASK] and manifest["lm_eval"]["version"]
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "results.json"]


def test_limit_and_num_fewshot_reach_the_harness(student, tmp_path):
    pytest.importorskip("lm_eval")
    path, _, _ = student
    tasks = write_task(tmp_path / "tasks", [0] * len(QUESTIONS))
    out = tmp_path / "h"
    result = CliRunner().invoke(app, ["eval-harness", str(path), "--tasks", TASK, "--include-path", str(tasks),
                                      "--device", "cpu", "--limit", "3", "--num-fewshot", "2", "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["n-samples"][TASK]["effective"] == 3
    assert results["configs"][TASK]["num_fewshot"] == 2


@pytest.mark.parametrize(("args", "needles"), [
    (["--tasks", "no_such_task_anywhere"], ["--tasks", "no_such_task_anywhere"]),
    (["--tasks", TASK, "--include-path", "NOWHERE"], ["--include-path", "not a directory"]),
    (["--tasks", ","], ["--tasks"]),
    (["--tasks", TASK, "--batch-size", "0"], ["--batch-size"]),
    (["--tasks", TASK, "--limit", "1.5"], ["--limit"]),
])
def test_refusals(student, tmp_path, args, needles):
    pytest.importorskip("lm_eval")
    path, _, _ = student
    tasks = write_task(tmp_path / "tasks", [0] * len(QUESTIONS))
    args = [str(tmp_path / "nowhere") if a == "NOWHERE" else a for a in args]
    if "--include-path" not in args and "--tasks" in args and args[1] == TASK:
        args += ["--include-path", str(tasks)]
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["eval-harness", str(path), *args, "--device", "cpu", "--out", str(out)])
    assert_refused(result, *needles)
    assert not out.exists()


def test_without_lm_eval_it_says_how_to_install(student, tmp_path, monkeypatch):
    """lm-eval is an optional extra: without it, one line naming the install command, exit 2."""
    real_import = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    path, _, _ = student
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["eval-harness", str(path), "--tasks", "arc_easy", "--out", str(out)])
    assert_refused(result, "pip install 'bltool[harness]'")
    assert not out.exists()
