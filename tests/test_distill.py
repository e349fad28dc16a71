"""distill (docs/method.md §2–4): the three methods end to end on tiny models, the per-step log and compute
accounting, resume equivalence (bitwise on CPU), stopping on SIGTERM, the teacher-logits cache, and bad
input. Two processes against one with the same global batch (gloo, and NCCL on GPUs): tests/test_gpu.py."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from helpers import assert_refused, distill_setting, read_log, save_tiny_model, write_corpus
from safetensors.torch import load_file
from typer.testing import CliRunner

import bltool
from bltool.adapt.adapters import adapted_modules
from bltool.artifacts import file_table, read_manifest, sha256_json
from bltool.cli import app
from bltool.errors import UsageError
from bltool.eval.nll import hidden_states
from bltool.models import devices
from bltool.options import from_flags
from bltool.stages import distill as distill_stage
from bltool.stages.build_student import BuildStudentConfig
from bltool.stages.build_student import run as build_student
from bltool.stages.distill import DistillConfig
from bltool.stages.prepare_data import PrepareDataConfig
from bltool.stages.prepare_data import run as prepare_data
from bltool.train.batches import PackedSequences, collate, positions_to_indices
from bltool.train.budget import target_fraction
from bltool.train.losses import kd_loss
from bltool.train.teacher_cache import TeacherCache, teacher_topk
from bltool.units import parse_count

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--rank", "4", "--lora-alpha", "8", "--batch-size", "2", "--save-every", "0"]


@pytest.fixture(scope="module")
def setting(tmp_path_factory, tokenizer):
    """A 4-layer tiny teacher, its 2-layer mixed student, and data packed into 32-token sequences."""
    return distill_setting(tmp_path_factory.mktemp("distill"), tokenizer)


def invoke(setting, out, *args, env=None):
    base = ["distill", "--teacher", str(setting["teacher"]), "--student", str(setting["student"]),
            "--data", str(setting["data"]), "--out", str(out)]
    return CliRunner().invoke(app, base + list(args), env=env)


@pytest.fixture(scope="module")
def budgeted(setting):
    """One budgeted-lora run with F = 0.4 over 60 steps (enough for ρ to settle after s1 = 0.3)."""
    out = setting["root"] / "bl"
    result = invoke(setting, out, "--method", "budgeted-lora", "--budget", "0.4", "--tokens", str(60 * 64), *SMALL)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(out)
    return out


def test_budgeted_run_log_schedule_and_output(budgeted, setting):
    manifest = read_manifest(budgeted, ("distill",))
    assert manifest["method"] == "budgeted-lora" and manifest["schedule"]["steps"] == 60
    log = read_log(budgeted)
    assert [row["step"] for row in log] == list(range(1, 61))
    for row in log:
        assert row["target_fraction"] == pytest.approx(target_fraction(row["step"] / 60, 0.4, 0.1, 0.3))
        assert row["actual_fraction"] >= row["target_fraction"] - 1e-9
    assert log[-1]["actual_fraction"] == pytest.approx(0.4, abs=0.01)
    assert log[-1]["modules_dropped"] > 0
    assert all(row[k] > 0 for row in log for k in ("loss", "kl", "ce", "tokens_per_s"))
    assert log[0]["lr"] == 0.0 and all(row["lr"] > 0 for row in log[1:])  # linear warm-up from 0
    # the dense fraction computed in a step counts only modules with ρ > 0
    assert log[-1]["computed_fraction"] < 1.0 and log[0]["computed_fraction"] == 1.0
    rho = manifest["controller"]["rho"]
    assert sum(r == 0 for r in rho) == log[-1]["modules_dropped"]
    assert [m["rho"] for m in manifest["adapters"]["modules"]] == pytest.approx(rho, abs=1e-6)
    compute = manifest["compute"]
    assert compute["tokens"] == manifest["training"]["tokens_seen"] == 60 * 2 * 32
    assert compute["realised"] > compute["proxy"]  # ρ > 0 modules compute in full, and smoothing lags
    assert 0 < compute["dense_fraction_executed"] < 1


def test_distilled_student_loads_and_dropped_modules_skip_dense(budgeted):
    model = bltool.load_model(budgeted)
    modules = adapted_modules(model)
    assert len(modules) == 2 * 7
    dropped = [m for _, m in modules if m._rho == 0.0]
    assert dropped
    for m in dropped:  # poison the dense weights of dropped modules: outputs must not change
        m.base.weight.data.fill_(float("nan"))
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_kd_full_and_kd_lora(setting):
    out = setting["root"] / "full"
    result = invoke(setting, out, "--method", "kd-full", "--tokens", str(4 * 64), *SMALL)
    assert result.exit_code == 0, result.stderr
    manifest = read_manifest(out, ("distill",))
    assert manifest["adapters"] is None and manifest["compute"]["proxy"] == 1.0
    assert manifest["compute"]["realised"] == pytest.approx(1.0)
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(out)  # kd-full writes a plain Hugging Face checkpoint
    before = AutoModelForCausalLM.from_pretrained(setting["student"])
    assert not torch.equal(plain.model.layers[0].mlp.up_proj.weight, before.model.layers[0].mlp.up_proj.weight)

    out = setting["root"] / "lora"
    result = invoke(setting, out, "--method", "kd-lora", "--tokens", str(4 * 64), *SMALL)
    assert result.exit_code == 0, result.stderr
    manifest = read_manifest(out, ("distill",))
    assert manifest["adapters"]["gated"] is False
    compute = manifest["compute"]
    assert compute["realised"] == pytest.approx(compute["proxy"])  # every dense matmul runs
    weights = load_file(str(out / "model.safetensors"))
    assert not any(k.endswith("gate_logits") for k in weights)
    log = read_log(out)
    assert all(row["target_fraction"] == 1.0 and row["modules_dropped"] == 0 for row in log)


def test_a_run_replayed_from_its_manifest_gives_the_same_weights(setting, tmp_path):
    """`bltool distill --config runs/x/manifest.json --out runs/y` repeats the run: every setting from the
    manifest (none left at the CLI's defaults here), only --out given anew; the weights are bit for bit equal."""
    first = tmp_path / "x"
    args = ["--method", "budgeted-lora", "--budget", "0.5", "--tokens", str(6 * 64), "--seed", "5",
            "--temperature", "2.5", "--kd-weight", "0.6", "--decay-start", "0.2", "--decay-end", "0.6",
            "--rho-ema", "0.7", "--target-modules", "q_proj,v_proj,down_proj", "--warmup", "0.2", *SMALL]
    assert invoke(setting, first, *args).exit_code == 0
    second = tmp_path / "y"
    result = CliRunner().invoke(app, ["distill", "--config", str(first / "manifest.json"), "--out", str(second)])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(second)
    a, b = read_manifest(first, ("distill",))["config"], read_manifest(second, ("distill",))["config"]
    assert a == {**b, "out": str(first)} and a["seed"] == 5 and a["target_modules"] == ["q_proj", "v_proj", "down_proj"]
    x, y = load_file(str(first / "model.safetensors")), load_file(str(second / "model.safetensors"))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)  # bit for bit


def test_resume_is_bitwise_identical(setting, monkeypatch, tmp_path):
    args = ["--method", "budgeted-lora", "--budget", "0.3", "--tokens", str(12 * 64), *SMALL]
    whole = tmp_path / "whole"
    assert invoke(setting, whole, *args).exit_code == 0

    class StopAfter(distill_stage.StopSignals):
        """Reports SIGTERM at the 5th between-steps check, as if the scheduler preempted the job."""

        checks = 0

        @property
        def received(self):
            StopAfter.checks += 1
            return signal.SIGTERM if StopAfter.checks >= 5 else None

        @received.setter
        def received(self, value):
            """Writes (the initial None) are ignored: this double alone decides when the signal comes."""

    monkeypatch.setattr(distill_stage, "StopSignals", StopAfter)
    parts = tmp_path / "parts"
    stopped = invoke(setting, parts, *args)
    assert stopped.exit_code == 128 + signal.SIGTERM, stopped.stderr
    assert "--resume" in stopped.stderr and stopped.stdout == ""
    assert not parts.exists()
    state = json.loads((Path(f"{parts}.checkpoint") / "state.json").read_text())
    assert state["step"] == 5
    monkeypatch.undo()

    refused = invoke(setting, parts, *args)  # a checkpoint exists: must say --resume or --overwrite
    assert refused.exit_code == 2 and "--resume" in refused.stderr
    changed = invoke(setting, parts, *args[:-len(SMALL)], "--rank", "4", "--lora-alpha", "8", "--batch-size", "2",
                     "--save-every", "0", "--seed", "7", "--resume")
    assert changed.exit_code == 2 and "--seed" in changed.stderr

    resumed = invoke(setting, parts, *args, "--resume")
    assert resumed.exit_code == 0, resumed.stderr
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(parts / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bitwise
    whole_log, parts_log = read_log(whole), read_log(parts)
    drop = ("seconds", "tokens_per_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in parts_log] == \
           [{k: v for k, v in r.items() if k not in drop} for r in whole_log]


def _cli_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_sigterm_writes_a_resumable_checkpoint(setting, tmp_path):
    out = tmp_path / "term"
    cmd = [sys.executable, "-m", "bltool", "distill", "--teacher", str(setting["teacher"]), "--student",
           str(setting["student"]), "--data", str(setting["data"]), "--out", str(out), "--method", "budgeted-lora",
           "--budget", "0.4", "--tokens", str(5000 * 64), *SMALL]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_cli_env())
    for line in proc.stderr:  # the loop starts right after this line
        if line.startswith("distill budgeted-lora"):
            break
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "stopped by SIGTERM" in stderr and "Traceback" not in stderr and stdout == ""
    assert not out.exists()
    state = json.loads((Path(f"{out}.checkpoint") / "state.json").read_text())
    assert 1 <= state["step"] < 5000 and len(state["log"]) == state["step"]


def test_teacher_logits_cache(setting, tmp_path, tokenizer):
    """A cache with k = V reproduces full-logit distillation (up to float16 storage of the logits); a
    smaller k runs too; the cache is refused when it does not fit the run."""
    vocab = len(tokenizer)
    cache = tmp_path / "cache"
    made = CliRunner().invoke(app, ["teacher-logits", "--teacher", str(setting["teacher"]), "--data",
                                    str(setting["data"]), "--out", str(cache), "--tokens", str(4 * 64),
                                    "--top-k", str(vocab)])
    assert made.exit_code == 0, made.stderr
    assert read_manifest(cache, ("teacher-logits",))["coverage"]["sequences"] == 8
    # the cache holds, for each sequence a run reads, exactly the teacher's top-k at each position
    stored = TeacherCache.open(cache)
    train = PackedSequences(Path(setting["data"]) / "train.arrow")
    index = [int(i) for i in positions_to_indices(0, 8, len(train), 0)]
    ids, mask = collate([train[i] for i in index], 0, "cpu")
    teacher = bltool.load_model(setting["teacher"])
    expected = teacher_topk(hidden_states(teacher, ids, mask), teacher.lm_head, vocab, 3.0)
    got = stored.batch(index, ids.shape[1], "cpu")
    assert torch.equal(got[0], expected[0].long())
    assert torch.allclose(got[1], expected[1], rtol=1e-3, atol=1e-3)  # float16 storage
    assert torch.allclose(got[2], expected[2], rtol=1e-6)
    args = ["--method", "kd-lora", "--tokens", str(4 * 64), "--lora-dropout", "0", *SMALL]
    full = invoke(setting, tmp_path / "full", *args)
    cached = CliRunner().invoke(app, ["distill", "--student", str(setting["student"]), "--data", str(setting["data"]),
                                      "--teacher-logits", str(cache), "--out", str(tmp_path / "cached"), *args])
    assert full.exit_code == 0 and cached.exit_code == 0, cached.stderr
    for a, b in zip(read_log(tmp_path / "full"), read_log(tmp_path / "cached")):
        assert b["kl"] == pytest.approx(a["kl"], rel=1e-2)  # float16 logits; exactness: test_losses
        assert b["ce"] == pytest.approx(a["ce"], rel=1e-5)

    small = tmp_path / "small"
    assert CliRunner().invoke(app, ["teacher-logits", "--teacher", str(setting["teacher"]), "--data",
                                    str(setting["data"]), "--out", str(small), "--tokens", str(4 * 64),
                                    "--top-k", "8"]).exit_code == 0
    # the manifest records the teacher's mean mass beyond its top k: none at k = V, some at k = 8
    assert read_manifest(cache)["tail"]["mean_mass"] == 0.0
    tails = pa.concat_tables(pa.ipc.open_stream(pa.memory_map(str(small / shard["file"]))).read_all()
                             for shard in read_manifest(small)["shards"]).column("tail")
    mean = float(np.mean(np.exp(np.concatenate([np.asarray(t, dtype=np.float64) for t in tails.to_pylist()]))))
    assert 0.0 < read_manifest(small)["tail"]["mean_mass"] == pytest.approx(mean, rel=1e-6)
    topk = CliRunner().invoke(app, ["distill", "--student", str(setting["student"]), "--data", str(setting["data"]),
                                    "--teacher-logits", str(small), "--out", str(tmp_path / "topk"), *args])
    assert topk.exit_code == 0, topk.stderr
    assert all(0 <= r["kl"] for r in read_log(tmp_path / "topk"))

    for extra, message in ((["--tokens", str(40 * 64)], "lacks"), (["--temperature", "2"], "--temperature"),
                           (["--seed", "1"], "--seed")):
        result = CliRunner().invoke(app, ["distill", "--student", str(setting["student"]), "--data",
                                          str(setting["data"]), "--teacher-logits", str(small), "--out",
                                          str(tmp_path / "refused"), *args, *extra])
        assert result.exit_code == 2 and message in result.stderr, (extra, result.stderr)
        assert not (tmp_path / "refused").exists()


def test_non_finite_loss_stops_and_keeps_a_checkpoint(setting, tmp_path):
    out = tmp_path / "nan"
    result = invoke(setting, out, "--method", "kd-full", "--lr", "1e30", "--tokens", str(20 * 64), *SMALL)
    assert result.exit_code == 1 and "non-finite" in result.stderr, result.stderr
    assert not out.exists()
    state = json.loads((Path(f"{out}.checkpoint") / "state.json").read_text())
    weights = load_file(str(Path(f"{out}.checkpoint") / "trainable.safetensors"))
    assert state["step"] >= 1 and all(torch.isfinite(w).all() for w in weights.values())


@pytest.mark.parametrize("args, flag", [
    (["--budget", "1.5"], "--budget"),
    (["--budget", "-0.1"], "--budget"),
    (["--budget", "0.4", "--decay-start", "0.3", "--decay-end", "0.2"], "--decay-start"),
    (["--budget", "0.4", "--tokens", "63"], "--tokens"),  # one step is 2 sequences × 32 tokens
    (["--budget", "0.4", "--tokens", "lots"], "--tokens"),
    (["--method", "kd-lora", "--budget", "0.4"], "--budget"),
    ([], "--budget"),  # budgeted-lora needs one
    (["--method", "lora"], "--method"),
    (["--budget", "0.4", "--target-modules", "qq_proj"], "--target-modules"),
    (["--budget", "0.4", "--resume"], "--resume"),
])
def test_bad_input(setting, tmp_path, args, flag):
    out = tmp_path / "out"
    result = invoke(setting, out, "--batch-size", "2", *args)
    assert result.exit_code == 2, result.stderr
    assert flag in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists() and not Path(f"{out}.checkpoint").exists()


def test_mismatched_tokenizer_vocabulary_and_width(setting, tmp_path, other_model, tokenizer):
    result = invoke(setting, tmp_path / "o", "--budget", "0.4", "--teacher", str(other_model))
    assert result.exit_code == 2 and "different tokenizer" in result.stderr
    wide = save_tiny_model(tmp_path / "padded", tokenizer, "llama", layers=2, seed=5)
    config = json.loads((wide / "config.json").read_text())
    from transformers import AutoModelForCausalLM, LlamaConfig

    config["vocab_size"] += 16  # same tokenizer, a padded vocabulary: logits do not line up
    padded = AutoModelForCausalLM.from_config(LlamaConfig(**{k: v for k, v in config.items() if k != "model_type"}))
    padded.save_pretrained(wide)
    result = invoke(setting, tmp_path / "v", "--budget", "0.4", "--teacher", str(wide))
    assert result.exit_code == 2 and "vocabulary" in result.stderr, result.stderr
    result = CliRunner().invoke(app, ["distill", "--teacher", str(setting["student"]), "--student",
                                      str(setting["teacher"]), "--data", str(setting["data"]), "--out",
                                      str(tmp_path / "w"), "--method", "kd-full", "--tokens", "64", *SMALL])
    assert result.exit_code == 0, result.stderr  # same width: fine
    config["hidden_size"] = 64
    bigger = AutoModelForCausalLM.from_config(LlamaConfig(**{k: v for k, v in config.items()
                                                             if k not in ("model_type", "vocab_size")},
                                                          vocab_size=len(tokenizer)))
    bigger.save_pretrained(tmp_path / "wide")
    tokenizer.save_pretrained(tmp_path / "wide")
    result = CliRunner().invoke(app, ["distill", "--teacher", str(setting["teacher"]), "--student",
                                      str(tmp_path / "wide"), "--data", str(setting["data"]), "--out",
                                      str(tmp_path / "x"), "--method", "kd-full", *SMALL])
    assert result.exit_code == 2 and "hidden size" in result.stderr, result.stderr


def test_parse_count():
    assert parse_count("2M", "--tokens") == 2_000_000
    assert parse_count("500k", "--tokens") == 500_000
    assert parse_count("1.5B", "--tokens") == 1_500_000_000
    assert parse_count("2_048", "--tokens") == 2048
    for bad in ("", "1.5", "two", "inf", "nanM"):
        with pytest.raises(UsageError, match="--tokens"):
            parse_count(bad, "--tokens")


def test_config_requires_a_teacher():
    with pytest.raises(UsageError, match="--teacher"):
        DistillConfig(student="s", data="d", out="o", method="kd-lora")


# ---------------------------------------------------------------------------------------------------
# Integrity: what a resumed, interrupted or mis-set run does


class StopAtCheck(distill_stage.StopSignals):
    """Reports SIGTERM from the `at`-th check of the stop flag on, as a preempting scheduler would."""

    at = 0
    checks = 0

    @property
    def received(self):
        StopAtCheck.checks += 1
        return signal.SIGTERM if StopAtCheck.checks >= StopAtCheck.at else None

    @received.setter
    def received(self, value):
        """Writes (the initial None) are ignored: the class alone decides when the signal comes."""


def _stop_at(monkeypatch, at: int) -> None:
    monkeypatch.setattr(StopAtCheck, "at", at)
    monkeypatch.setattr(StopAtCheck, "checks", 0)
    monkeypatch.setattr(distill_stage, "StopSignals", StopAtCheck)


def _same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_lora_methods_learn(budgeted, setting, tmp_path):
    """After a short run the LoRA factors and the gates have moved from their initial values (B = 0,
    γ = 4), and the student is closer to the teacher: its KL on the batches it trained on went down."""
    weights = load_file(str(budgeted / "model.safetensors"))
    b_factors = [v for k, v in weights.items() if k.endswith("lora_B")]
    gates = [v for k, v in weights.items() if k.endswith("gate_logits")]
    assert len(b_factors) == len(gates) == 14
    assert all(b.abs().max() > 1e-3 for b in b_factors)
    assert all((g - 4.0).abs().max() > 1e-4 for g in gates)

    out = tmp_path / "lora"
    steps = 20
    trained = invoke(setting, out, "--method", "kd-lora", "--tokens", str(steps * 64), "--lr", "5e-3",
                     "--kd-weight", "1", "--lora-dropout", "0", *SMALL)  # the KL alone (the CE pulls elsewhere)
    assert trained.exit_code == 0, trained.stderr
    train = PackedSequences(Path(setting["data"]) / "train.arrow")
    index = [int(i) for i in positions_to_indices(0, steps * 2, len(train), 0)]
    ids, mask = collate([train[i] for i in index], 0, "cpu")
    teacher = bltool.load_model(setting["teacher"])

    def kl(student) -> float:
        with torch.no_grad():
            return float(kd_loss(hidden_states(student, ids, mask), hidden_states(teacher, ids, mask),
                                 student.lm_head, teacher.lm_head, ids, mask, kd_weight=1.0).kl)

    before, after = kl(bltool.load_model(setting["student"])), kl(bltool.load_model(out))
    assert after < 0.8 * before, (before, after)


def test_kd_full_refuses_targets_that_match_nothing(setting, tmp_path):
    out = tmp_path / "full"
    result = invoke(setting, out, "--method", "kd-full", "--tokens", str(4 * 64), "--target-modules", "qproj",
                    *SMALL)
    assert_refused(result, "--target-modules", "qproj")
    assert not out.exists() and not Path(f"{out}.checkpoint").exists()


def test_the_loss_is_the_mean_over_the_step_tokens_however_it_is_split(tmp_path, tokenizer):
    """One step over every training sequence (the last one short): as one micro-batch, or one sequence per
    micro-batch with gradient accumulation, the step's loss and gradient are the same (the mean over its
    predicted tokens, not the mean of per-micro-batch means)."""
    root = tmp_path
    teacher = save_tiny_model(root / "teacher", tokenizer, "llama", layers=2, tied=True, seed=5)
    corpus = write_corpus(root / "corpus", n_docs=5, seed=4)
    data = prepare_data(PrepareDataConfig(inputs=(str(corpus),), tokenizer=str(teacher), out=str(root / "data"),
                                          heldout=0.5, seq_len=32))
    train = PackedSequences(Path(data) / "train.arrow")
    n = len(train)
    assert 3 <= n <= 64 and len(train[n - 1]) < 32  # the packer's final window is short
    student = build_student(BuildStudentConfig(teacher=str(teacher), out=str(root / "student"), layers=1))
    common = ["distill", "--teacher", str(teacher), "--student", str(student), "--data", str(data), "--method",
              "kd-lora", "--tokens", str(n * 32), "--rank", "4", "--lora-alpha", "8", "--lora-dropout", "0",
              "--save-every", "0"]
    whole = CliRunner().invoke(app, [*common, "--batch-size", str(n), "--out", str(root / "whole")])
    split = CliRunner().invoke(app, [*common, "--batch-size", "1", "--grad-accum", str(n), "--out",
                                     str(root / "split")])
    assert whole.exit_code == 0 and split.exit_code == 0, split.stderr
    (a,), (b,) = read_log(root / "whole"), read_log(root / "split")
    for key in ("loss", "kl", "ce", "grad_norm"):
        assert b[key] == pytest.approx(a[key], rel=1e-5), key
    assert a["tokens"] == b["tokens"] == sum(len(train[i]) for i in range(n))


def test_resume_refuses_another_world_size(setting, monkeypatch, tmp_path):
    args = ["--method", "kd-lora", "--tokens", str(6 * 64), *SMALL]
    _stop_at(monkeypatch, 2)
    out = tmp_path / "run"
    assert invoke(setting, out, *args).exit_code == 128 + signal.SIGTERM
    monkeypatch.undo()
    state_file = Path(f"{out}.checkpoint") / "state.json"
    state = json.loads(state_file.read_text())
    assert state["world_size"] == 1
    state["world_size"] = 2  # as if written by `torchrun --nproc-per-node 2`: state and manifest agree
    state_file.write_text(json.dumps(state))
    manifest = json.loads((state_file.parent / "manifest.json").read_text())
    manifest["files"] = file_table(state_file.parent)
    manifest["hash"] = sha256_json(manifest["files"])
    (state_file.parent / "manifest.json").write_text(json.dumps(manifest))
    refused = invoke(setting, out, *args, "--resume")
    assert_refused(refused, "--resume", "2 process(es)", "this run has 1")
    assert not out.exists()


def test_resume_writes_the_output_a_finished_run_did_not(setting, monkeypatch, tmp_path):
    """The last step ran and was checkpointed, but writing --out failed: --resume writes it, and it is
    the output an undisturbed run writes."""
    args = ["--method", "budgeted-lora", "--budget", "0.5", "--tokens", str(4 * 64), *SMALL]
    whole = tmp_path / "whole"
    assert invoke(setting, whole, *args).exit_code == 0

    def full_disk(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(distill_stage, "save", full_disk)
    out = tmp_path / "out"
    failed = invoke(setting, out, *args)
    assert failed.exit_code == 1 and "No space left" in failed.stderr
    monkeypatch.undo()
    assert json.loads((Path(f"{out}.checkpoint") / "state.json").read_text())["step"] == 4 and not out.exists()
    resumed = invoke(setting, out, *args, "--resume")
    assert resumed.exit_code == 0, resumed.stderr
    assert resumed.stdout.strip() == str(out) and _same_weights(whole, out)
    assert [r["loss"] for r in read_log(out)] == [r["loss"] for r in read_log(whole)]
    assert invoke(setting, out, *args, "--resume").exit_code == 2  # now --out exists


def test_a_stop_between_micro_batches_abandons_the_step(setting, monkeypatch, tmp_path):
    """With --grad-accum 3 the stop flag is read between micro-batches too: a signal during step 3 stops
    the run before that step ends, the checkpoint holds step 2, and resuming it gives the undisturbed
    run's weights bit for bit."""
    args = ["--method", "budgeted-lora", "--budget", "0.5", "--tokens", str(5 * 3 * 64), "--grad-accum", "3",
            "--lora-dropout", "0.1", *SMALL]
    whole = tmp_path / "whole"
    assert invoke(setting, whole, *args).exit_code == 0
    _stop_at(monkeypatch, 8)  # per step: 2 checks between its micro-batches, 1 after it; the 8th is in step 3
    out = tmp_path / "out"
    stopped = invoke(setting, out, *args)
    assert stopped.exit_code == 128 + signal.SIGTERM and "during step 3" in stopped.stderr, stopped.stderr
    monkeypatch.undo()
    assert json.loads((Path(f"{out}.checkpoint") / "state.json").read_text())["step"] == 2
    assert invoke(setting, out, *args, "--resume").exit_code == 0
    assert _same_weights(whole, out)


def _timeless(log: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in ("seconds", "tokens_per_s")} for row in log]


def test_resume_with_another_lr_rescales_the_schedule_and_records_it(setting, monkeypatch, tmp_path):
    """A stopped run (or one stopped by a non-finite loss) may go on with another --lr: the schedule goes
    on at the same step scaled to the new peak, the optimizer steps with it, and the checkpoint and the
    output's manifest record the new --lr and the step it took over after; other settings stay refused."""
    args = ["--method", "kd-lora", "--tokens", str(6 * 64), *SMALL]
    whole = tmp_path / "whole"
    assert invoke(setting, whole, *args).exit_code == 0
    _stop_at(monkeypatch, 3)
    out = tmp_path / "out"
    assert invoke(setting, out, *args).exit_code == 128 + signal.SIGTERM
    monkeypatch.undo()
    ckpt = Path(f"{out}.checkpoint")
    assert json.loads((ckpt / "state.json").read_text())["step"] == 3
    before = load_file(str(ckpt / "trainable.safetensors"))

    refused = invoke(setting, out, *args, "--lr", "1e-20", "--temperature", "2", "--resume")
    assert_refused(refused, "--resume", "--temperature")
    assert "--lr" not in refused.stderr and not out.exists()
    resumed = invoke(setting, out, *args, "--lr", "1e-20", "--resume")
    assert resumed.exit_code == 0, resumed.stderr
    manifest = read_manifest(out, ("distill",))
    assert manifest["config"]["lr"] == manifest["schedule"]["lr"] == 1e-20
    assert manifest["schedule"]["lr_history"] == [{"step": 0, "lr": 3e-4}, {"step": 3, "lr": 1e-20}]
    assert read_manifest(ckpt)["config"]["lr"] == 1e-20
    assert json.loads((ckpt / "state.json").read_text())["lr_history"] == manifest["schedule"]["lr_history"]
    # the same warm-up and cosine factors, from step 4 on times 1e-20 / 3e-4
    log, whole_log = read_log(out), read_log(whole)
    assert [r["lr"] for r in log[:3]] == [r["lr"] for r in whole_log[:3]]
    assert all(r["lr"] > 0 for r in whole_log[3:])
    assert [r["lr"] for r in log[3:]] == pytest.approx([r["lr"] / 3e-4 * 1e-20 for r in whole_log[3:]], rel=1e-9)
    # and AdamW stepped with it: at 1e-20 the trained weights stay where the checkpoint had them, while
    # the uninterrupted run (3e-4) moved them in the same three steps
    after = load_file(str(ckpt / "trainable.safetensors"))
    moved = load_file(str(Path(f"{whole}.checkpoint") / "trainable.safetensors"))
    assert after.keys() == before.keys() == moved.keys()
    assert all(torch.allclose(after[k], before[k], rtol=0, atol=1e-15) for k in before)
    assert not all(torch.allclose(moved[k], before[k], rtol=0, atol=1e-6) for k in before)


def test_a_non_finite_loss_checkpoints_exactly_the_state_after_the_last_good_step(setting, monkeypatch, tmp_path):
    """A non-finite loss in step 4 (dropout has drawn that step's masks by then) leaves the checkpoint of
    the state after step 3, random generators included: the same generator states as a run stopped after
    step 3, and a --resume with the same --lr replays step 4 on as the uninterrupted run did, bit for bit."""
    args = ["--method", "kd-lora", "--tokens", str(6 * 64), "--lora-dropout", "0.3", *SMALL]
    whole = tmp_path / "whole"
    assert invoke(setting, whole, *args).exit_code == 0
    real, calls = distill_stage.kd_loss, []

    def nan_in_step_4(*a, **kw):  # one micro-batch a step: the 4th call is step 4's
        calls.append(None)
        result = real(*a, **kw)
        return result._replace(loss=result.loss * float("nan")) if len(calls) == 4 else result

    monkeypatch.setattr(distill_stage, "kd_loss", nan_in_step_4)
    out = tmp_path / "out"
    failed = invoke(setting, out, *args)
    assert failed.exit_code == 1 and "non-finite loss or gradient at step 4" in failed.stderr, failed.stderr
    assert "after step 3" in failed.stderr and "--resume" in failed.stderr and not out.exists()
    monkeypatch.undo()
    ckpt = Path(f"{out}.checkpoint")
    assert json.loads((ckpt / "state.json").read_text())["step"] == 3

    _stop_at(monkeypatch, 3)
    stopped = tmp_path / "stopped"
    assert invoke(setting, stopped, *args).exit_code == 128 + signal.SIGTERM
    monkeypatch.undo()
    rng, want = (load_file(str(d / "rng.safetensors")) for d in (ckpt, Path(f"{stopped}.checkpoint")))
    assert rng.keys() == want.keys() and all(torch.equal(rng[k], want[k]) for k in rng)

    resumed = invoke(setting, out, *args, "--resume")
    assert resumed.exit_code == 0, resumed.stderr
    assert _same_weights(whole, out)
    assert _timeless(read_log(out)) == _timeless(read_log(whole))


@pytest.mark.slow
def test_two_processes_draw_their_own_dropout_and_resume_bit_for_bit(setting, tmp_path):
    """Under torchrun each rank seeds its dropout after the (shared) LoRA initialisation, so the ranks'
    generators differ; a run preempted by SIGTERM and resumed equals the uninterrupted one, and resuming
    with another number of processes is refused."""
    common = ["--teacher", str(setting["teacher"]), "--student", str(setting["student"]), "--data",
              str(setting["data"]), "--method", "budgeted-lora", "--budget", "0.5", "--tokens", str(40 * 128),
              "--rank", "4", "--lora-alpha", "8", "--lora-dropout", "0.5", "--batch-size", "2", "--save-every", "5",
              "--device", "cpu"]

    def torchrun(out, *extra):
        return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                str(29500 + (os.getpid() + len(extra)) % 1000), "-m", "bltool", "distill", *common,
                "--out", str(out), *extra]

    whole = tmp_path / "whole"
    done = subprocess.run(torchrun(whole), capture_output=True, text=True, env=_cli_env(), timeout=600)
    assert done.returncode == 0, done.stderr
    rng = load_file(str(Path(f"{whole}.checkpoint") / "rng.safetensors"))
    assert not torch.equal(rng["rank0.cpu"], rng["rank1.cpu"])  # each rank drew its own masks

    parts = tmp_path / "parts"
    proc = subprocess.Popen(torchrun(parts), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_cli_env(), start_new_session=True)
    for line in proc.stderr:  # rank 0's announcement: the loop starts right after it
        if "distill budgeted-lora" in line:
            break
    os.killpg(proc.pid, signal.SIGTERM)  # the scheduler preempts the whole job
    proc.communicate(timeout=300)
    assert proc.returncode != 0 and not parts.exists()
    step = json.loads((Path(f"{parts}.checkpoint") / "state.json").read_text())["step"]
    assert 1 <= step < 40
    alone = invoke(setting, parts, *common[6:], "--resume")  # one process
    assert_refused(alone, "--resume", "2 process(es)", "this run has 1")
    resumed = subprocess.run(torchrun(parts, "--resume"), capture_output=True, text=True, env=_cli_env(),
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert _same_weights(whole, parts)


# -- frozen weights in bfloat16, the trained ones in float32 -------------------------------------------


def test_bfloat16_frozen_base_trains_float32_adapters_and_saves_the_full_precision_base(setting, tmp_path):
    out = tmp_path / "bf16"
    result = invoke(setting, out, "--method", "budgeted-lora", "--budget", "0.4", "--tokens", str(6 * 64),
                    "--dtype", "bfloat16", *SMALL)
    assert result.exit_code == 0, result.stderr
    saved = load_file(str(out / "model.safetensors"))
    original = load_file(str(Path(setting["student"]) / "model.safetensors"))
    lora = {k: v for k, v in saved.items() if "lora_" in k or "gate_logits" in k}
    assert lora and all(v.dtype == torch.float32 for v in lora.values())
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)  # the adapters trained
    bases = {k.replace(".base.", "."): v for k, v in saved.items() if ".base." in k}
    assert bases
    for name, value in bases.items():  # the frozen base: the student's float32 weights, bit for bit
        torch.testing.assert_close(value, original[name], rtol=0, atol=0)
    manifest = read_manifest(out, ("distill",))
    assert manifest["config"]["dtype"] == "bfloat16" and manifest["training"]["frozen_dtype"] == "bfloat16"


def test_auto_dtype_is_recorded_resolved_and_a_resume_keeps_it(setting, monkeypatch, tmp_path):
    """--dtype auto: float32 under BLTOOL_CPU_BF16=0, bf16 on a CPU with native bf16 (patched in). A run
    checkpointed in one is not resumed in the other (it would change precision mid-run); naming its dtype
    resumes it whatever auto means here."""
    args = ["--method", "kd-lora", "--tokens", str(6 * 64), *SMALL]
    _stop_at(monkeypatch, 2)
    out = tmp_path / "run"
    assert invoke(setting, out, *args, env={"BLTOOL_CPU_BF16": "0"}).exit_code == 128 + signal.SIGTERM
    monkeypatch.undo()
    assert json.loads((Path(f"{out}.checkpoint") / "state.json").read_text())["frozen_dtype"] == "float32"
    monkeypatch.setattr(devices, "native_bf16", lambda: True)
    bf16 = {"BLTOOL_CPU_BF16": "1"}
    refused = invoke(setting, out, *args, "--resume", env=bf16)
    assert_refused(refused, "--resume", "float32", "bfloat16 here", "--dtype float32")
    resumed = invoke(setting, out, *args, "--resume", "--dtype", "float32", env=bf16)
    assert resumed.exit_code == 0, resumed.stderr
    manifest = read_manifest(out, ("distill",))
    assert manifest["training"]["frozen_dtype"] == "float32" and manifest["config"]["dtype"] == "float32"
    fresh = invoke(setting, tmp_path / "fresh", *args, env=bf16)  # auto on a native-bf16 CPU
    assert fresh.exit_code == 0, fresh.stderr
    assert read_manifest(tmp_path / "fresh", ("distill",))["training"]["frozen_dtype"] == "bfloat16"


def test_bfloat16_base_keeps_lora_parameters_float32_in_the_module():
    from bltool.adapt.lora import GatedLoRALinear

    module = GatedLoRALinear(torch.nn.Linear(8, 6, dtype=torch.bfloat16), rank=2)
    assert module.lora_A.dtype == module.lora_B.dtype == module.gate_logits.dtype == torch.float32
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    assert module(x).dtype == torch.bfloat16
    module.set_rho(0.0)
    out = module(x)
    out.float().sum().backward()
    assert module.lora_A.grad.dtype == torch.float32 and module.base.weight.grad is None


def test_prefetcher_hands_items_in_order_and_reraises_errors():
    from bltool.train.batches import Prefetcher

    made = []

    def make(key):
        made.append(key)
        if key == 3:
            raise ValueError("row 3 is broken")
        return (torch.full((2,), key),)

    prefetch = Prefetcher(make, range(5), "cpu")
    try:
        for key in range(3):
            (item,) = prefetch.get(key)
            assert item.tolist() == [key, key]
        with pytest.raises(ValueError, match="row 3"):
            prefetch.get(3)
    finally:
        prefetch.close()
    assert made == [0, 1, 2, 3]  # it stops at the error


# -- held-out evaluation during training -----------------------------------------------------------------


def test_eval_every_logs_the_held_out_perplexity_of_the_student_as_it_is(setting, tmp_path):
    out = tmp_path / "evaluated"
    result = invoke(setting, out, "--method", "kd-lora", "--tokens", str(7 * 64), "--eval-every", "3",
                    "--eval-tokens", "100", *SMALL)
    assert result.exit_code == 0, result.stderr
    log = read_log(out)
    scored = [row["step"] for row in log if row["eval_ppl"] is not None]
    assert scored == [3, 6, 7]  # every 3 steps and the last
    assert all(row["eval_nll"] is None for row in log if row["step"] not in scored)
    # the last figure is the saved student's own perplexity on the first 100 held-out tokens
    from bltool.data.prepared import PreparedData
    from bltool.eval.nll import heldout_windows, token_nll
    from bltool.train.batches import collate as collate_rows

    data = PreparedData.open(Path(setting["data"]))
    windows = [ids for ids, _ in heldout_windows(data, 100)]
    assert sum(len(w) for w in windows) == 100
    model = bltool.load_model(str(out))
    ids, mask = collate_rows(windows, int(data.tokenizer["eos_token_id"]), "cpu")
    with torch.no_grad():
        nll = token_nll(model, ids, mask).double().sum() / mask[:, 1:].sum()
    assert log[-1]["eval_nll"] == pytest.approx(float(nll), rel=1e-5)
    assert log[-1]["eval_ppl"] == pytest.approx(math.exp(float(nll)), rel=1e-5)
    assert read_manifest(out, ("distill",))["evaluation"]["tokens"] == 100


def test_eval_every_logs_the_standard_error_eval_ppl_gives_on_the_same_slice(setting, tmp_path):
    """The held-out evaluation's standard error (log.arrow: eval_nll_se, eval_ppl_se) is eval-ppl's on the
    same slice (--max-tokens = --eval-tokens), over the slice's documents; steps without one have none."""
    out = tmp_path / "evaluated"
    result = invoke(setting, out, "--method", "kd-lora", "--tokens", str(3 * 64), "--eval-every", "2",
                    "--eval-tokens", "1500", *SMALL)
    assert result.exit_code == 0, result.stderr
    log = read_log(out)
    assert [row["eval_ppl_se"] is not None for row in log] == [False, True, True]
    ppl = CliRunner().invoke(app, ["eval-ppl", str(out), "--data", str(setting["data"]), "--max-tokens", "1500",
                                   "--device", "cpu", "--out", str(tmp_path / "ppl")])
    assert ppl.exit_code == 0, ppl.stderr
    scored = json.loads((tmp_path / "ppl" / "result.json").read_text())
    assert scored["protocol"]["se_unit"] == "documents" and scored["protocol"]["se_units"] > 2
    assert log[-1]["eval_ppl"] == pytest.approx(scored["perplexity"], rel=1e-5)
    assert log[-1]["eval_nll_se"] == pytest.approx(scored["mean_nll_se"], rel=1e-4)
    assert log[-1]["eval_ppl_se"] == pytest.approx(scored["perplexity_se"], rel=1e-4)


def test_eval_flags_are_checked(setting, tmp_path):
    assert_refused(invoke(setting, tmp_path / "x", "--method", "kd-lora", "--eval-every", "-1"), "--eval-every")
    assert_refused(invoke(setting, tmp_path / "y", "--method", "kd-lora", "--eval-tokens", "1"), "--eval-tokens")


def test_activation_checkpointing_trains_the_same_student(setting, tmp_path):
    """--activation-checkpointing recomputes the layers in the backward; with dropout on, the run's losses
    and trained weights equal the plain run's (the recomputation draws the same masks)."""
    outs = {}
    for name, extra in (("plain", []), ("checkpointed", ["--activation-checkpointing"])):
        outs[name] = tmp_path / name
        result = invoke(setting, outs[name], "--method", "budgeted-lora", "--budget", "0.4", "--tokens",
                        str(6 * 64), "--lora-dropout", "0.2", *extra, *SMALL)
        assert result.exit_code == 0, result.stderr
    manifest = read_manifest(outs["checkpointed"], ("distill",))
    assert manifest["config"]["activation_checkpointing"] is True
    plain, checkpointed = read_log(outs["plain"]), read_log(outs["checkpointed"])
    assert [r["loss"] for r in checkpointed] == pytest.approx([r["loss"] for r in plain], rel=1e-5)
    a = load_file(str(outs["plain"] / "model.safetensors"))
    b = load_file(str(outs["checkpointed"] / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6, msg=key)


def test_activation_checkpointing_is_applied_to_the_student_only(setting, tmp_path):
    from bltool.train import distributed

    config = from_flags(DistillConfig, student=str(setting["student"]), data=str(setting["data"]),
                        out=str(tmp_path / "o"), teacher=str(setting["teacher"]), method="kd-lora", tokens=64,
                        batch_size=2, rank=4, activation_checkpointing=True)
    run_, state = distill_stage.prepare(config, distributed.setup("cpu"))
    state.prefetch.close()
    assert state.student.is_gradient_checkpointing
    assert not run_.teacher.is_gradient_checkpointing  # the teacher has no backward
