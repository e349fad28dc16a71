"""The method registry (bltool.train.methods): each entry, and one added here, goes through distill,
compress and report by its fields alone; a malformed entry and an unknown name are refused; and no stage
names a method."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import assert_refused, save_tiny_model, write_corpus
from typer.testing import CliRunner

from bltool.artifacts import read_manifest
from bltool.cli import app
from bltool.errors import UsageError
from bltool.options import from_flags
from bltool.results import figures
from bltool.results.runs import Row, build_rows, find_artifacts
from bltool.stages import report
from bltool.stages.build_student import BuildStudentConfig
from bltool.stages.build_student import run as build_student
from bltool.stages.distill import DistillConfig, lora_spec
from bltool.stages.prepare_data import PrepareDataConfig
from bltool.stages.prepare_data import run as prepare_data
from bltool.train import methods
from bltool.train.accounting import ComputeProxy

ROOT = Path(__file__).resolve().parents[1]

# A method as a contributor would add it: plain LoRA at another learning rate, with its own colour and label.
ADDED = methods.Method(name="kd-lora-slow", label="KD-LoRA (slow)", default_lr=7e-5, trainable=methods.LORA,
                       controller=None, compute=ComputeProxy(dense_passes=2, scheduled=False), compress=methods.MERGE,
                       compress_note="merged, as kd-lora", color="tab:purple", takes_budget=False, baseline=False)
NAMES = [*methods.REGISTRY, ADDED.name]


@pytest.fixture
def registry(monkeypatch):
    monkeypatch.setitem(methods.REGISTRY, ADDED.name, ADDED)
    return methods.REGISTRY


@pytest.fixture(scope="module")
def setting(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("methods")
    teacher = save_tiny_model(root / "teacher", tokenizer, "llama", layers=3, tied=True, seed=3)
    corpus = write_corpus(root / "corpus", n_docs=40, seed=1)
    data = prepare_data(PrepareDataConfig(inputs=(str(corpus),), tokenizer=str(teacher), out=str(root / "data"),
                                          heldout=0.2, seq_len=32))
    student = build_student(BuildStudentConfig(teacher=str(teacher), out=str(root / "student"), layers=2))
    return {"teacher": teacher, "student": student, "data": data, "root": root}


@pytest.mark.parametrize("name", NAMES)
def test_every_method_goes_through_distill_compress_and_report_by_its_fields(name, registry, setting, tmp_path):
    method = registry[name]
    runs = tmp_path / "runs"
    distilled, compressed = runs / name / "distilled", runs / name / "compressed"
    budget = ["--budget", "0.4"] if method.takes_budget else []
    result = CliRunner().invoke(app, [
        "distill", "--teacher", str(setting["teacher"]), "--student", str(setting["student"]), "--data",
        str(setting["data"]), "--out", str(distilled), "--method", name, *budget, "--tokens", str(3 * 64),
        "--rank", "4", "--lora-alpha", "8", "--batch-size", "2", "--save-every", "0"])
    assert result.exit_code == 0, result.stderr
    manifest = read_manifest(distilled, ("distill",))
    assert manifest["method"] == name and manifest["schedule"]["lr"] == method.default_lr
    assert (manifest["adapters"] is not None) == method.lora
    if method.lora:
        assert manifest["adapters"]["gated"] == method.gated
    training = manifest["training"]
    assert (training["trainable_parameters"] == training["parameters"]) == (not method.lora)
    assert (manifest["controller"] is not None) == (method.controller is not None) == (manifest["budget"] is not None)
    compute = manifest["compute"]
    assert compute["proxy"] == method.compute.proxy(compute["adapted_dense_macs_per_token"],
                                                    compute["lora_macs_per_token"], 0.4, 0.1, 0.3)

    result = CliRunner().invoke(app, ["compress", str(distilled), "--out", str(compressed)])
    assert result.exit_code == 0, result.stderr
    assert (f"{name}: {method.compress_note}" in result.stderr) == (method.compress_note is not None)
    section = read_manifest(compressed, ("compress",))["compressed"]
    assert section["method"] == name and (section["policy"] is not None) == (method.compress == methods.BY_RHO)
    forms = {m["form"] for m in section["modules"]}
    assert forms <= {methods.COPY: set(), methods.MERGE: {"keep"}, methods.BY_RHO: {"keep", "svd", "drop"}}[
        method.compress] and bool(forms) == method.lora

    (row,) = build_rows(find_artifacts([runs]))
    assert (row.method, row.budget) == (name, 0.4 if method.takes_budget else None)
    assert row.values["mac_speedup"] is not None  # kd-full's copy counts as 1.0×
    row.values["perplexity"] = 10.0
    fig, ax = figures.frontier_figure([row])
    (point,) = ax.collections
    from matplotlib.colors import to_rgba

    assert tuple(point.get_facecolor()[0]) == to_rgba(method.color)
    assert point.get_label() == f"{name} ({method.label}" + (" F=0.4)" if method.takes_budget else ")")
    import matplotlib.pyplot as plt

    plt.close(fig)


def _row(name: str, method: str, budget: float | None, ppl: float) -> Row:
    return Row(name, name, method, budget=budget, values={"perplexity": ppl, "mac_speedup": 1.5 if budget else 1.0})


def test_report_claims_compare_budgeted_runs_with_the_baseline_entry(registry, monkeypatch):
    rows = [_row("lora", "kd-lora", None, 50.0), _row("slow", ADDED.name, None, 60.0),
            _row("bl", "budgeted-lora", 0.4, 55.0)]
    (line,) = report.comparison(rows)
    assert line.startswith("- **Moderate budget.** F = 0.4 is not judged against kd-lora's perplexity: 55.0 against "
                           "50.0 (1.10×;")
    monkeypatch.setitem(registry, "kd-lora", dataclasses.replace(registry["kd-lora"], baseline=False))
    monkeypatch.setitem(registry, ADDED.name, dataclasses.replace(ADDED, baseline=True))
    (line,) = report.comparison(rows)
    assert "against kd-lora-slow's perplexity: 55.0 against 60.0 (0.92×;" in line


def test_distill_config_reads_the_entry(registry):
    base = {"student": "s", "data": "d", "out": "o", "teacher": "t"}
    for name, method in registry.items():
        config = from_flags(DistillConfig, **base, method=name, budget=0.4 if method.takes_budget else None)
        assert config.learning_rate == method.default_lr
        assert lora_spec(config).gated == method.gated
        with pytest.raises(UsageError, match="--budget"):  # required where taken, refused elsewhere
            from_flags(DistillConfig, **base, method=name, budget=None if method.takes_budget else 0.4)


def test_an_unknown_method_is_refused_in_one_line_naming_the_registry(tmp_path):
    result = CliRunner().invoke(app, ["distill", "--student", "s", "--data", "d", "--out", str(tmp_path / "o"),
                                      "--teacher", "t", "--method", "lora"])
    assert_refused(result, "--method", "'lora'", ", ".join(methods.REGISTRY))
    with pytest.raises(UsageError, match="MODEL must be one of"):
        methods.get("nope", "MODEL")


def test_an_entry_missing_a_field_or_contradicting_itself_fails():
    entry = dataclasses.asdict(methods.REGISTRY["kd-lora"]) | {"compute": ComputeProxy(2, False)}
    for field in dataclasses.fields(methods.Method):
        partial = {k: v for k, v in entry.items() if k != field.name}
        with pytest.raises(TypeError, match=field.name):
            methods.Method(**partial)
    methods.Method(**entry)
    for wrong, rule in (({"trainable": "adapters"}, "trainable must be"), ({"compress": "zip"}, "compress must be"),
                        ({"compress": methods.BY_RHO}, "compressing by ρ"),
                        ({"trainable": methods.FULL, "compute": ComputeProxy(3, False)}, "only a full fine-tune"),
                        ({"takes_budget": True, "compute": ComputeProxy(2, True)}, "budget controller"),
                        ({"compute": ComputeProxy(3, False)}, "weight backward"),
                        ({"compute": ComputeProxy(2, True)}, "follows the schedule")):
        with pytest.raises(ValueError, match=f"kd-lora: .*{rule}"):  # each breaks one rule only
            methods.Method(**(entry | wrong))


def test_the_registry_has_one_baseline_and_the_default():
    assert sum(m.baseline for m in methods.REGISTRY.values()) == 1
    assert methods.DEFAULT in methods.REGISTRY and methods.budgeted()
    assert methods.names() == "kd-full, kd-lora or budgeted-lora"


def test_no_module_but_the_registry_names_a_method():
    pattern = re.compile("|".join(f'"{re.escape(name)}"' for name in methods.REGISTRY))
    for path in sorted((ROOT / "bltool").rglob("*.py")):
        if path.name != "methods.py":
            lines = path.read_text(encoding="utf-8").splitlines()
            hits = [n for n, line in enumerate(lines, 1) if pattern.search(line)]
            assert not hits, f"{path.relative_to(ROOT)}:{hits} compares or names a method; use bltool.train.methods"


def test_the_registry_imports_neither_torch_nor_transformers():
    code = ("import sys, bltool.train.methods; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
