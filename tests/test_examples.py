"""The example scripts end to end on a tiny model: every stage chained through the paths it prints, as a
cluster job would run them (each `bltool` call is its own process)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import save_tiny_model, write_corpus

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # each script runs every stage as a subprocess


@pytest.fixture(scope="module")
def tiny_env(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("examples")
    teacher = save_tiny_model(root / "teacher", tokenizer, "llama", layers=4, seed=4)
    corpus = write_corpus(root / "corpus", n_docs=60, seed=3)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # the venv's `bltool`
        "BLTOOL_HOME": str(root / "home"), "OMP_NUM_THREADS": "1",
        "TEACHER": str(teacher), "CORPUS": str(corpus), "GLOB": "**/*.txt", "LAYERS": "2", "SEQ_LEN": "32",
        "HELDOUT": "0.25", "TOKENS": "768", "BATCH": "2", "TOP_K": "8",
        "DISTILL_ARGS": "--rank 4 --lora-alpha 8 --save-every 0",
        "ICL_ARGS": "--n 2 --seeds 1 --shots 2 --tasks capitalize,next_item",
        "BENCH_ARGS": "--prefill-tokens 32 --decode-batch 1 --decode-steps 2 --repeats 1 --warmup 1",
    }
    return root, env

pytestmark = pytest.mark.slow  # each script runs every stage as a subprocess


def run_script(name: str, env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run(["bash", str(ROOT / "examples" / name)], env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def read_report(path: Path) -> dict[str, dict]:
    with open(path / "report.csv", newline="", encoding="utf-8") as handle:
        return {row["name"]: row for row in csv.DictReader(handle)}


def test_pipeline_script(tiny_env):
    root, env = tiny_env
    runs = root / "pipeline"
    result = run_script("pipeline.sh", {**env, "RUNS": str(runs), "METHOD": "budgeted-lora", "BUDGET": "0.5"})
    assert result.stdout.strip().splitlines()[-1] == str(runs / "report")
    rows = read_report(runs / "report")
    row = rows["budgeted-lora-0.5"]
    assert row["method"] == "budgeted-lora" and row["missing"] == ""
    assert float(row["perplexity"]) > 1 and float(row["mac_speedup"]) >= 1


def test_sweep_script_shares_one_teacher_cache(tiny_env):
    root, env = tiny_env
    runs = root / "sweep"
    run_script("sweep.sh", {**env, "RUNS": str(runs), "SWEEP": "kd-lora budgeted-lora:0.5"})
    rows = read_report(runs / "report")
    assert set(rows) == {"kd-lora", "budgeted-lora-0.5", "student", "teacher"}
    assert all(row["missing"] == "" for name, row in rows.items() if name != "teacher")
    assert rows["teacher"]["method"] == "teacher" and rows["teacher"]["perplexity"]
    for name in ("kd-lora", "budgeted-lora-0.5"):  # both read the one cache instead of the teacher
        manifest = (runs / name / "distilled" / "manifest.json").read_text()
        assert '"role": "teacher-logits"' in manifest
    assert (runs / "report" / "frontier.png").stat().st_size > 1000
