"""The example scripts end to end on a tiny model: every stage chained through the paths it prints, as a
cluster job would run them (each `bltool` call is its own process)."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
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
        "SERVING_ARGS": "--concurrency 2 --prompt-len 24 --output-len 6 --repeats 1 --device cpu",
        "SERVING_CHUNK": "32",
    }
    return root, env

pytestmark = pytest.mark.slow  # each script runs every stage as a subprocess


def run_script(name: str, env: dict, cwd: Path | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(["bash", str(ROOT / "examples" / name)], env=env, capture_output=True, text=True,
                            timeout=900, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def read_report(path: Path) -> dict[str, dict]:
    with open(path / "report.csv", newline="", encoding="utf-8") as handle:
        return {row["name"]: row for row in csv.DictReader(handle)}


def test_pipeline_script_from_another_directory_with_the_sites_env_file(tiny_env, tmp_path):
    """Run from a directory that is not the repository, with the teacher, corpus and roots only in the site's
    env file (BLTOOL_ENV): the runs and the prepared data land under the file's roots, nothing in the cwd."""
    root, env = tiny_env
    site = {"BLTOOL_HOME": root / "site-home", "BLTOOL_TEACHER": env["TEACHER"], "BLTOOL_CORPUS": env["CORPUS"],
            "BLTOOL_DATA_ROOT": root / "site-data", "BLTOOL_RUNS_ROOT": root / "site-runs"}
    (tmp_path / "site.env").write_text("# a site\n" + "".join(f"{k}={v}\n" for k, v in site.items()))
    env = {k: v for k, v in env.items() if k not in ("TEACHER", "CORPUS", "RUNS", *site)}
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    result = run_script("pipeline.sh", {**env, "BLTOOL_ENV": str(tmp_path / "site.env"), "METHOD": "budgeted-lora",
                                        "BUDGET": "0.5"}, cwd=cwd)
    runs = site["BLTOOL_RUNS_ROOT"] / "pipeline"
    assert result.stdout.strip().splitlines()[-1] == str(runs / "report")
    assert list(cwd.iterdir()) == []
    manifest = json.loads((runs / "budgeted-lora-0.5" / "distilled" / "manifest.json").read_text())
    used = {i["role"]: i["path"] for i in manifest["inputs"]}
    assert used["data"] == str(site["BLTOOL_DATA_ROOT"] / "pipeline")
    assert used["teacher"] == site["BLTOOL_TEACHER"]
    rows = read_report(runs / "report")
    row = rows["budgeted-lora-0.5"]
    assert row["method"] == "budgeted-lora" and row["missing"] == ""
    assert float(row["perplexity"]) > 1 and float(row["mac_speedup"]) >= 1


SCRIPTS = sorted([*ROOT.glob("examples/*.sh"), *ROOT.glob("benchmarks/*.sh")])


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_example_script_reads_the_site_env_file_relative_to_itself(script):
    """Each script sources examples/lib/site.sh from its own directory, takes its defaults from the site's
    variables, and names no repository path relative to the working directory."""
    text = script.read_text()
    assert 'here=$(cd "$(dirname "$0")" && pwd)' in text
    lib = "lib/site.sh" if script.parent.name == "examples" else "../examples/lib/site.sh"
    assert f'source "$here/{lib}"' in text
    code = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    for line in code:
        if re.match(r"\s*(export )?NOTE=", line):  # the report's note quotes the command as typed in the repository
            continue
        assert not re.search(r'(?<![\w/])(examples|benchmarks|scripts)/[\w.-]+\.(sh|py)', line), line
        assert not re.match(r"\s*cd ", line), line
    for variable in ("TEACHER", "RUNS", "CORPUS"):
        for default in re.findall(rf"\b{variable}=\$\{{{variable}:-(.*)", "\n".join(code)):
            assert default.startswith(f"${{BLTOOL_{variable}"), (variable, default)
    assert re.search(r"\$\{BLTOOL_(TEACHER|RUNS_ROOT)", text)


def test_gpu_sweep_sizing_counts_optimizer_steps_over_every_process_and_warns_past_an_epoch(tmp_path):
    """examples/lib/size_sweep.py: SECONDS_PER_RUN at the probe's throughput (over every process), in whole
    optimizer steps of the probe's global batch, EVALS evaluations a run counted in optimizer steps, and a
    warning when the budget passes one epoch of the training split."""
    probe, data = tmp_path / "probe", tmp_path / "data"
    probe.mkdir(), data.mkdir()

    def size(world: int, rate: float, sequences: int) -> tuple[list[str], str]:
        (probe / "manifest.json").write_text(json.dumps({
            "training": {"tokens_per_s": rate},
            "schedule": {"sequences_per_step": world * 4, "seq_len": 64, "world_size": world}}))
        (data / "manifest.json").write_text(json.dumps({"splits": {"train": {"sequences": sequences}}}))
        done = subprocess.run([sys.executable, str(ROOT / "examples" / "lib" / "size_sweep.py"), str(probe),
                               str(data), "10", "1k", "4"], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert done.returncode == 0, done.stderr
        return done.stdout.split(), done.stderr

    # one process at 1,000 tokens/s: 10,000 tokens → 39 steps of 256, an evaluation every 9 steps
    assert size(1, 1000.0, 1000) == (["9984", "9", "1", "1000.0", "256", "64000"], "")
    # eight at 8,000 tokens/s (the probe measured all eight): 80,000 tokens → 39 steps of 2,048, every 9 steps
    (tokens, every, world, _, step, _), warned = size(8, 8000.0, 1000)
    assert (tokens, every, world, step) == ("79872", "9", "8", "2048")
    assert "pass one epoch of the training split (64000 tokens)" in warned


def test_gpu_sweep_smoke_mode_measures_then_sweeps_from_one_cache_with_learning_curves(tiny_env):
    """examples/gpu_sweep.sh at toy size on the CPU (SMOKE=1): a probe run on the sweep's own data and student
    sets the token budget from the measured throughput, then examples/sweep.sh runs kd-lora, F = 0.4 and F = 0
    from one teacher-logits cache with held-out evaluations during training, and the report draws their
    learning curves."""
    root, env = tiny_env
    runs = root / "gpu-sweep"
    torchrun = f"{sys.executable} -m torch.distributed.run --standalone --nproc-per-node 2 -m bltool"
    result = run_script("gpu_sweep.sh", {**env, "RUNS": str(runs), "SMOKE": "1", "EVALS": "3", "EVAL_TOKENS": "64",
                                         "TOKENS": "", "BASELINES": "1", "DISTILL": torchrun})
    probe = json.loads((root / "gpu-sweep-probe" / "distilled" / "manifest.json").read_text())
    assert probe["schedule"]["world_size"] == 2  # the probe ran through $DISTILL: 2 gloo processes
    config = json.loads((runs / "kd-lora" / "distilled" / "manifest.json").read_text())["config"]
    step = 2 * 2 * 32  # optimizer steps of 2 processes × batch 2 × 32 tokens
    expected = max(int(probe["training"]["tokens_per_s"] * 1), 256) // step * step  # smoke: 1 s, at least 256
    assert expected > 256  # set by the measured throughput (over both processes), not by the floor
    assert config["tokens"] == expected
    assert config["eval_every"] == max(1, expected // step // 3)  # 3 evaluations, in optimizer steps
    # the probe trained on the data and student the sweep uses, prepared and built once, in RUNS
    sweep = json.loads((runs / "kd-lora" / "distilled" / "manifest.json").read_text())
    for role, where in (("data", runs / "data"), ("student", runs / "student")):
        (used,) = [i["path"] for i in probe["inputs"] if i["role"] == role]
        assert used == str(where) == next(i["path"] for i in sweep["inputs"] if i["role"] == role)
    lines = result.stderr.splitlines()
    assert sum(" documents → train " in line for line in lines) == 1  # prepare-data's summary
    assert sum(line.startswith("student: teacher layers") for line in lines) == 1  # build-student's
    assert f"on 2 process(es); {expected} tokens per run" in result.stderr
    rows = read_report(runs / "report")
    assert set(rows) == {"kd-lora", "budgeted-lora-0.4", "budgeted-lora-0.0", "student", "teacher"}
    assert all(row["missing"] == "" for name, row in rows.items() if name != "teacher")
    for name in ("kd-lora", "budgeted-lora-0.4", "budgeted-lora-0.0"):  # all read the one cache
        manifest = json.loads((runs / name / "distilled" / "manifest.json").read_text())
        assert any(i.get("role") == "teacher-logits" for i in manifest["inputs"])
        assert manifest["evaluation"]["tokens"] == 64 and manifest["schedule"]["world_size"] == 2
        log = pa.ipc.open_stream(pa.memory_map(str(runs / name / "distilled" / "log.arrow"))).read_all()
        assert sum(v is not None for v in log.column("eval_ppl").to_pylist()) >= 3
    assert (runs / "report" / "learning_curves.png").stat().st_size > 1000
    text = (runs / "report" / "report.md").read_text()
    assert "GPU sweep on 2 × CPU" in text
    # every student and the teacher served and priced by one capacity plan; the note says for what and
    # quotes the sweep's command
    for name in ("kd-lora", "budgeted-lora-0.4", "budgeted-lora-0.0", "teacher"):
        row = rows[name]
        assert float(row["serving_rate"]) > 0 and int(row["servers"]) >= 1, name
        assert row["serving_engine"] == "transformers" and "capacity" not in row["missing"], name
    assert rows["student"]["serving_rate"] == ""
    note = next(line for line in text.splitlines() if line.startswith("Serving cost"))
    assert "--prompt-len lognormal:256:0.8 --output-len geometric:128" in note and "80 GiB × 0.9" in note
    assert "λ = 10 req/s" in note and "transformers" in note
    assert "Sweep command: `" in text and "SERVING_CHUNK=32" in text and "bash examples/sweep.sh`" in text
    assert "bench-serving × 4" in text and "capacity × 1" in text


