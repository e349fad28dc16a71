"""report: real (tiny) runs of every stage collected into the table and figures; incomplete runs shown
as missing, not dropped; the README section it regenerates; bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pytest
from helpers import save_tiny_model, write_corpus
from typer.testing import CliRunner

from bltool.cli import app
from bltool.runs import COLUMNS

PNG = b"\x89PNG\r\n\x1a\n"


def cli(*args: str) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.stderr
    return result.stdout.strip()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer):
    """Two distilled runs (budgeted-lora: every stage; kd-lora: no ICL, no bench) and two baselines."""
    root = tmp_path_factory.mktemp("report")
    teacher = save_tiny_model(root / "teacher", tokenizer, "llama", layers=4, seed=3)
    corpus = write_corpus(root / "corpus", n_docs=60, seed=2)
    data = cli("prepare-data", corpus, "--tokenizer", teacher, "--heldout", "0.25", "--seq-len", "32",
               "--out", root / "runs" / "data")
    student = cli("build-student", "--teacher", teacher, "--layers", "2", "--out", root / "runs" / "student")
    small = ["--rank", "4", "--lora-alpha", "8", "--batch-size", "2", "--save-every", "0"]
    bl = cli("distill", "--teacher", teacher, "--student", student, "--data", data, "--method", "budgeted-lora",
             "--budget", "0.5", "--tokens", str(12 * 64), "--out", root / "runs" / "bl" / "distilled", *small)
    bl_c = cli("compress", bl, "--out", root / "runs" / "bl" / "compressed")
    cli("eval-ppl", bl_c, "--data", data, "--out", root / "runs" / "bl" / "ppl")
    cli("eval-icl", bl_c, "--n", "2", "--seeds", "2", "--shots", "2", "--tasks", "capitalize,next_item",
        "--out", root / "runs" / "bl" / "icl")
    cli("bench", bl_c, "--baseline", student, "--prefill-tokens", "32", "--decode-batch", "1", "--decode-steps", "2",
        "--repeats", "1", "--warmup", "1", "--out", root / "runs" / "bl" / "bench")
    lora = cli("distill", "--teacher", teacher, "--student", student, "--data", data, "--method", "kd-lora",
               "--tokens", str(4 * 64), "--out", root / "runs" / "lora" / "distilled", *small)
    lora_c = cli("compress", lora, "--out", root / "runs" / "lora" / "compressed")
    cli("eval-ppl", lora_c, "--data", data, "--out", root / "runs" / "lora" / "ppl")
    cli("eval-ppl", teacher, "--data", data, "--out", root / "runs" / "baselines" / "teacher-ppl")
    cli("eval-ppl", student, "--data", data, "--out", root / "runs" / "baselines" / "student-ppl")
    return root / "runs"


@pytest.fixture(scope="module")
def report(runs):
    return Path(cli("report", runs, "--out", runs.parent / "report", "--title", "tiny sweep"))


def test_rows_and_columns(report):
    with open(report / "report.csv", newline="", encoding="utf-8") as handle:
        rows = {r["name"]: r for r in csv.DictReader(handle)}
        assert tuple(rows[next(iter(rows))].keys()) == COLUMNS
    assert set(rows) == {"bl", "lora", "student", "teacher"}
    by_method = {r["method"]: r for r in rows.values()}
    assert set(by_method) == {"budgeted-lora", "kd-lora", "teacher", "student (untrained)"}
    bl, lora = by_method["budgeted-lora"], by_method["kd-lora"]
    assert float(bl["budget"]) == 0.5 and lora["budget"] == ""
    for key in ("perplexity", "bits_per_byte", "icl_composite", "compute_proxy", "compute_realised", "mac_speedup",
                "module_speedup", "prefill_speedup", "decode_speedup", "param_reduction"):
        assert bl[key] != "", key
    assert bl["missing"] == ""
    # the incomplete run is there, with what it lacks named
    assert lora["perplexity"] != "" and lora["icl_composite"] == "" and lora["module_speedup"] == ""
    assert lora["missing"] == "eval-icl, bench"
    assert float(lora["mac_speedup"]) == pytest.approx(1.0)  # kd-lora merges: nothing saved
    assert by_method["teacher"]["missing"] == "eval-icl"
    assert rows["teacher"]["method"] == "teacher" and rows["student"]["method"] == "student (untrained)"


def test_markdown_arrow_and_figures(report):
    text = (report / "report.md").read_text()
    assert text.startswith("## tiny sweep")
    assert "| run | method | F | tokens | ppl | bits/byte | ICL |" in text
    assert text.count("\n| ") == 1 + 4  # header + four rows
    with pa.memory_map(str(report / "report.arrow")) as source:
        table = pa.ipc.open_stream(source).read_all()
    assert table.num_rows == 4 and tuple(table.column_names) == COLUMNS
    import matplotlib.image

    for name in ("frontier.png", "icl.png", "dense_fraction.png"):
        data = (report / name).read_bytes()
        assert data.startswith(PNG), name
        image = matplotlib.image.imread(report / name)
        assert image.shape[0] > 100 and image.shape[1] > 100
    manifest = json.loads((report / "manifest.json").read_text())
    assert manifest["stage"] == "report" and manifest["rows"] == 4


def test_readme_section_is_regenerated(runs, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# Project\n\n<!-- bltool-report:start -->\nold table\n<!-- bltool-report:end -->\n\nEnd.\n")
    cli("report", runs, "--out", tmp_path / "rep", "--readme", readme)
    text = readme.read_text()
    assert "old table" not in text and text.startswith("# Project") and text.endswith("End.\n")
    assert "![frontier.png](docs/results/frontier.png)" in text
    assert (tmp_path / "docs" / "results" / "frontier.png").read_bytes().startswith(PNG)


@pytest.mark.parametrize("case", ["no-markers", "no-runs", "missing-dir"])
def test_bad_input(runs, tmp_path, case):
    args = ["report", str(runs), "--out", str(tmp_path / "rep")]
    if case == "no-markers":
        (tmp_path / "R.md").write_text("# no section\n")
        args += ["--readme", str(tmp_path / "R.md")]
    elif case == "no-runs":
        (tmp_path / "empty").mkdir()
        args[1] = str(tmp_path / "empty")
    else:
        args[1] = str(tmp_path / "nowhere")
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr


def test_paper_claims_are_computed_from_the_rows(report):
    with open(report / "report.csv", newline="", encoding="utf-8") as handle:
        rows = {r["method"]: r for r in csv.DictReader(handle)}
    ratio = float(rows["budgeted-lora"]["perplexity"]) / float(rows["kd-lora"]["perplexity"])
    text = (report / "report.md").read_text()
    assert "### Against the paper's claims" in text
    claim = next(line for line in text.splitlines() if line.startswith("- **Moderate budget.**"))
    assert f"({ratio:.2f}×)" in claim
    assert ("lands near" in claim) == (ratio <= 1.10)
    assert "- **Aggressive budget.**" not in text  # one budget only: nothing to say about the extremes
    assert "- **ICL probes.**" not in text  # kd-lora has no ICL result in these runs


@pytest.mark.slow
def test_printed_table_keeps_every_column_in_a_log(runs, tmp_path):
    """`bltool report ... 2> log`: stderr is not a terminal, and rich would draw the table 80 columns wide
    ("budge…", "stude…"); the table must come out whole."""
    import os
    import subprocess
    import sys

    from bltool.stages.report import HEADERS

    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    done = subprocess.run([sys.executable, "-m", "bltool", "report", str(runs), "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "…" not in done.stderr, done.stderr
    lines = done.stderr.splitlines()
    header = next(line for line in lines if HEADERS["method"] in line and HEADERS["perplexity"] in line)
    for column in ("name", "method", "budget", "perplexity", "icl_composite", "missing"):
        assert HEADERS[column] in header, (column, header)
    assert "budgeted-lora" in done.stderr and str(tmp_path / "r") == done.stdout.strip()
