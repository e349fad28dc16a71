"""`bltool compress`: every distill method's output, the manifest, plain-transformers loading of dense
outputs, --densify, thresholds read from the distill manifest, and refused inputs."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import IDS, assert_refused, distilled_student, save_tiny_model
from typer.testing import CliRunner

import bltool
from bltool.adapt.lowrank import LowRankLinear
from bltool.artifacts import read_manifest
from bltool.cli import app
from bltool.models.families import FAMILIES


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def plain_transformers(path):
    """Load with transformers alone, strictly: every key used, none missing."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, use_safetensors=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_budgeted_lora_is_compressed_and_reported(tmp_path, tiny_llama):
    source, model = distilled_student(tmp_path / "s", tiny_llama)
    out = tmp_path / "runs" / "c"
    result = invoke("compress", str(source), "--out", str(out))
    assert result.exit_code == 0, result.stderr
    assert result.stdout == f"{out}\n"
    for needle in ("dense kept", "SVD", "dropped", "MAC speedup", "budgeted-lora"):
        assert needle in result.stderr
    manifest = read_manifest(out, ("compress",))
    section = manifest["compressed"]
    assert manifest["inputs"][0]["stage"] == "distill" and manifest["compute"]["proxy"] == 0.59
    assert len(section["modules"]) == 84 and section["policy"]["tau_drop"] == 0.05
    for record, (name, rho) in zip(section["modules"], [(m["name"], m["rho"]) for m in
                                                          read_manifest(source)["adapters"]["modules"]]):
        assert record["name"] == name and record["rho"] == rho
        assert set(record) >= {"form", "kept_rank", "svd_rank", "macs", "params", "layout", "rank"}
    summary = section["summary"]
    assert summary["kept"] + summary["svd"] + summary["dropped"] == 84
    assert summary["mac_speedup"] == pytest.approx(summary["dense_macs"] / summary["macs"])
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    loaded = bltool.load_model(out)
    assert any(isinstance(m, LowRankLinear) for m in loaded.modules())
    # the k/v projections of this tiny model (32 → 16) in the SVD band cost more low-rank than dense
    assert summary["multiplied_out"] > 0 and "multiplied out" in result.stderr


def test_kd_lora_merges_and_loads_with_plain_transformers(tmp_path, tiny_llama):
    source, model = distilled_student(tmp_path / "s", tiny_llama, method="kd-lora")
    out = tmp_path / "c"
    result = invoke("compress", str(source), "--out", str(out))
    assert result.exit_code == 0, result.stderr
    assert "saves nothing" in result.stderr
    summary = read_manifest(out)["compressed"]["summary"]
    assert summary["kept"] == 84 and summary["mac_speedup"] == 1.0
    assert torch.allclose(logits(plain_transformers(out)), logits(model), atol=1e-5)
    assert torch.allclose(logits(bltool.load_model(out)), logits(model), atol=1e-5)


def test_kd_full_passes_through(tmp_path, tiny_llama):
    source, model = distilled_student(tmp_path / "s", tiny_llama, method="kd-full")
    out = tmp_path / "c"
    result = invoke("compress", str(source), "--out", str(out))
    assert result.exit_code == 0, result.stderr
    assert "nothing to compress" in result.stderr
    assert read_manifest(out)["compressed"]["modules"] == []
    assert torch.equal(logits(plain_transformers(out)), logits(model))


def test_a_compressed_checkpoint_is_its_own_model_type(tmp_path, family, family_models):
    """Low-rank modules must not load as a "llama" whose q_proj.weight transformers fills at random:
    transformers alone refuses the checkpoint in its own words; after `import bltool`, its Auto classes
    build the low-rank model, every weight used, computing what bltool.load_model computes."""
    import subprocess
    import sys


    source, _ = distilled_student(tmp_path / "s", family_models(family.model_type), rhos=(0.0, 1.0))
    out = tmp_path / "c"
    assert invoke("compress", str(source), "--out", str(out)).exit_code == 0
    config = json.loads((out / "config.json").read_text())
    records = read_manifest(out)["compressed"]["modules"]
    assert config["model_type"] == family.compressed_type
    assert config["architectures"] == [family.compressed_class]
    assert config["lowrank_modules"] == {r["name"]: r["rank"] for r in records if r["layout"] == "lowrank"}
    assert 0 < len(config["lowrank_modules"]) < len(records)

    alone = subprocess.run([sys.executable, "-c", "import sys; from transformers import AutoModelForCausalLM; "
                            "AutoModelForCausalLM.from_pretrained(sys.argv[1])", str(out)],
                           capture_output=True, text=True, timeout=300)
    assert alone.returncode != 0 and family.compressed_type in alone.stderr, alone.stderr[-2000:]

    hf = plain_transformers(out)  # in this process bltool is imported: the type is registered
    assert type(hf).__name__ == family.compressed_class
    ranks = {name: m.rank for name, m in hf.named_modules() if isinstance(m, LowRankLinear)}
    assert ranks == config["lowrank_modules"]
    assert torch.allclose(logits(hf), logits(bltool.load_model(out)), atol=1e-6)
    again = hf.generate(IDS, max_new_tokens=4, do_sample=False)
    assert torch.equal(again, bltool.load_model(out).generate(IDS, max_new_tokens=4, do_sample=False))


@pytest.mark.parametrize("family", [f for f in FAMILIES.values() if f.biases], ids=lambda f: f.model_type)
def test_biased_projections_dropped_to_low_rank_load_everywhere(tmp_path, tokenizer, family):
    """Projections with biases (Qwen2's q/k/v): a dropped one (ρ = 0) keeps a zero bias, so the compressed
    config's architecture matches the checkpoint and both loaders take it strictly."""
    teacher = save_tiny_model(tmp_path / family.model_type, tokenizer, arch=family.model_type, layers=2)
    source, _ = distilled_student(tmp_path / "s", teacher, rhos=(0.0, 0.1, 1.0))
    out = tmp_path / "c"
    assert invoke("compress", str(source), "--out", str(out)).exit_code == 0
    records = {r["name"]: r for r in read_manifest(out)["compressed"]["modules"]}
    first = f"{family.layers}.0.{family.projections[0]}"
    assert records[first]["form"] == "drop"  # ρ cycles 0, 0.1, 1 from here
    assert {n for n, r in records.items() if r["bias"]} == {
        f"{family.layers}.{i}.{p}" for i in range(2) for p in family.biases}
    assert torch.allclose(logits(plain_transformers(out)), logits(bltool.load_model(out)), atol=1e-6)


def test_densify_writes_a_plain_checkpoint_of_the_same_function(tmp_path, family, family_models):
    source, _ = distilled_student(tmp_path / "s", family_models(family.model_type), rhos=(0.0, 1.0))
    low = tmp_path / "low"
    dense = tmp_path / "dense"
    assert invoke("compress", str(source), "--out", str(low)).exit_code == 0
    result = invoke("compress", str(source), "--out", str(dense), "--densify")
    assert result.exit_code == 0, result.stderr
    assert "gives up the" in result.stderr and "speedup" in result.stderr
    section = read_manifest(dense)["compressed"]
    assert section["densified"] and {m["layout"] for m in section["modules"]} == {"dense"}
    assert json.loads((dense / "config.json").read_text())["model_type"] == family.model_type  # any loader reads it
    assert torch.allclose(logits(plain_transformers(dense)), logits(bltool.load_model(low)), atol=1e-5)


def test_tau_drop_defaults_to_the_distill_run_and_flags_override(tmp_path, tiny_llama):
    budget = {"budget": 0.4, "decay_start": 0.1, "decay_end": 0.3, "beta": 0.9, "tau_drop": 0.35}
    source, _ = distilled_student(tmp_path / "s", tiny_llama, rhos=(0.0, 0.3, 1.0), budget=budget)
    out = tmp_path / "c"
    assert invoke("compress", str(source), "--out", str(out)).exit_code == 0
    section = read_manifest(out)["compressed"]
    assert section["policy"]["tau_drop"] == 0.35 and section["summary"]["svd"] == 0  # ρ = 0.3 is dropped
    result = invoke("compress", str(source), "--out", str(out), "--overwrite", "--tau-drop", "0.05",
                    "--k-max", "3", "--tau-rank", "0.0")
    assert result.exit_code == 0, result.stderr
    section = read_manifest(out)["compressed"]
    svd = [m for m in section["modules"] if m["form"] == "svd"]
    assert svd and all(m["svd_rank"] == 2 and m["kept_rank"] == 4 for m in svd)  # round(3 · 0.25/0.45) = 2


@pytest.mark.parametrize("case, needles", [
    ("plain", ["MODEL", "manifest.json", "distill"]),
    ("compressed", ["MODEL", "compress", "distill"]),
    ("missing", ["MODEL", "not a directory"]),
    ("thresholds", ["--tau-drop", "--tau-svd"]),
    ("k-max", ["--k-max"]),
    ("method", ["MODEL", "kd-lora", "budgeted-lora"]),
    ("exists", ["--out", "--overwrite"]),
])
def test_bad_inputs_are_refused_in_one_line(case, needles, tmp_path, tiny_llama):
    source, _ = distilled_student(tmp_path / "s", tiny_llama)
    runs = tmp_path / "runs"
    runs.mkdir()
    out = runs / "c"
    args = [str(source), "--out", str(out)]
    if case == "plain":
        args[0] = str(tiny_llama)
    elif case == "compressed":
        assert invoke("compress", str(source), "--out", str(tmp_path / "first")).exit_code == 0
        args[0] = str(tmp_path / "first")
    elif case == "missing":
        args[0] = str(tmp_path / "nope")
    elif case == "thresholds":
        args += ["--tau-drop", "0.6"]
    elif case == "k-max":
        args += ["--k-max", "0"]
    elif case == "method":
        manifest = json.loads((source / "manifest.json").read_text())
        manifest["config"]["method"] = "kd-lora"
        (source / "manifest.json").write_text(json.dumps(manifest))
    elif case == "exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    result = invoke("compress", *args)
    assert_refused(result, *needles)
    assert {p.name for p in runs.iterdir()} == ({"c"} if case == "exists" else set())
