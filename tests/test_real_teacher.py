"""The real SmolLM2-135M teacher on a slice of the demo corpus (both installed by `make test`).

Marked `real`; deselect with `-m "not real"`. Outside CI a missing teacher or corpus skips these; in CI
(CI=true) it fails, so a broken set-up cannot pass silently.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bltool.cli import app

pytestmark = pytest.mark.real
ROOT = Path(__file__).resolve().parents[1]


def _missing(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (make test installs it)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def corpus_slice(tmp_path_factory) -> Path:
    """The first 80 documents of the Python docs corpus, in sorted order."""
    try:
        out = subprocess.run(["dpkg", "-L", "python3.11-doc"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        _missing("Debian's python3.11-doc (the demo corpus) is not installed")
    sources = next((Path(line) for line in out.splitlines() if line.endswith("/html/_sources")), None)
    if sources is None or not sources.is_dir():
        _missing("python3.11-doc has no html/_sources")
    root = tmp_path_factory.mktemp("pydocs")
    for i, path in enumerate(sorted(sources.rglob("*.rst.txt"))[:80]):
        shutil.copy(path, root / f"{i:03d}-{path.name}")
    return root


def _run(args, home: Path) -> str:
    result = CliRunner().invoke(app, args, env={"BLTOOL_HOME": str(home)})
    assert result.exit_code == 0, result.stderr
    return result.stdout.strip()


@pytest.fixture(scope="module")
def real_runs(real_home, corpus_slice, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    data = _run(["prepare-data", str(corpus_slice), "--glob", "*.rst.txt", "--tokenizer", "smollm2-135m",
                 "--heldout", "0.1", "--seq-len", "512", "--out", str(runs / "data")], real_home)
    student = _run(["build-student", "--teacher", "smollm2-135m", "--mode", "mixed", "--layers", "6",
                    "--out", str(runs / "student")], real_home)
    return Path(data), Path(student)


def test_teacher_alias_converts_once_and_is_listed(real_home, real_runs):
    listed = json.loads(_run(["teachers", "--json"], real_home))
    entry = next(t for t in listed if t["name"] == "smollm2-135m")
    assert entry["available"] and entry["converted"]
    converted = list((real_home / "models").iterdir())
    assert len(converted) == 1
    manifest = json.loads((converted[0] / "manifest.json").read_text())
    assert manifest["stage"] == "import-gguf" and len(manifest["inputs"][0]["sha256"]) == 64


def test_student_layers_and_tokenizer(real_runs):
    data, student = real_runs
    manifest = json.loads((student / "manifest.json").read_text())
    assert manifest["student"]["teacher_layers"] == [0, 6, 12, 17, 23, 29]
    config = json.loads((student / "config.json").read_text())
    assert config["num_hidden_layers"] == 6 and config["hidden_size"] == 576 and config["num_key_value_heads"] == 3
    data_manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["tokenizer"]["fingerprint"] == data_manifest["tokenizer"]["fingerprint"]
    assert data_manifest["tokenizer"]["vocab_size"] == 49152


def test_teacher_perplexity_below_40_and_student_higher(real_home, real_runs):
    data, student = real_runs
    results = {}
    for name, model in (("teacher", "smollm2-135m"), ("student", str(student))):
        out = _run(["eval-ppl", model, "--data", str(data), "--max-tokens", "2048", "--batch-size", "4",
                    "--out", str(data.parent / f"ppl-{name}")], real_home)
        results[name] = json.loads((Path(out) / "result.json").read_text())
    teacher, untrained = results["teacher"], results["student"]
    assert math.isfinite(teacher["perplexity"]) and teacher["perplexity"] < 40
    assert 0 < teacher["bits_per_byte"] < 2
    assert untrained["perplexity"] > teacher["perplexity"]
    assert teacher["protocol"]["tokens_in_windows"] == 2048
    assert teacher["protocol"]["tokens_scored"] == 2048 - teacher["protocol"]["windows"]
