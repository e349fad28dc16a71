"""Fault injection: every stage that reads an artifact, given a damaged one, stops with one line that
names the file, exit 2, and writes nothing. The faults: a truncated safetensors file, a file whose size
or SHA-256 no longer matches the manifest, a missing file, a manifest from another stage, an Arrow file
cut mid-batch. docs/reliability.md records the table this suite produces (`pytest tests/test_faults.py
-v`). Faults of the output side (a full disk, a read-only parent) and of distill's checkpoints (SIGKILL)
are at the end."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
from helpers import save_tiny_model, write_corpus
from safetensors.torch import load_file
from typer.testing import CliRunner

from bltool.artifacts import read_manifest
from bltool.cli import app
from bltool.models import loading as models

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # a pipeline of real artifacts, damaged 66 ways, and subprocesses killed
SMALL = ["--rank", "4", "--lora-alpha", "8", "--batch-size", "2"]
BENCH = ["--prefill-tokens", "32", "--decode-batch", "1", "--decode-context", "8", "--decode-steps", "2",
         "--repeats", "1", "--warmup", "0"]


def cli(*args) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.stderr
    return result.stdout.strip()


@pytest.fixture(scope="module")
def made(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """One real artifact of each kind, from a tiny teacher."""
    root = tmp_path_factory.mktemp("faults")
    teacher = save_tiny_model(root / "teacher", tokenizer, "llama", layers=4, seed=7)
    corpus = write_corpus(root / "corpus", n_docs=60, seed=5)
    data = Path(cli("prepare-data", corpus, "--tokenizer", teacher, "--heldout", "0.2", "--seq-len", "32",
                    "--out", root / "data"))
    student = Path(cli("build-student", "--teacher", teacher, "--layers", "2", "--out", root / "student"))
    cache = Path(cli("teacher-logits", "--teacher", teacher, "--data", data, "--tokens", "256", "--top-k", "8",
                     "--out", root / "cache"))
    distilled = Path(cli("distill", "--teacher", teacher, "--student", student, "--data", data, "--method",
                         "budgeted-lora", "--budget", "0.5", "--tokens", str(8 * 64), "--save-every", "0",
                         *SMALL, "--out", root / "distilled"))
    compressed = Path(cli("compress", distilled, "--out", root / "compressed"))
    ppl = Path(cli("eval-ppl", compressed, "--data", data, "--max-tokens", "256", "--out", root / "runs" / "ppl"))
    probes = root / "probes.json"
    probes.write_text(json.dumps([{"input": w, "output": w.upper()} for w in ("cat", "dog", "sun", "sea")]))
    workload = root / "workload.csv"
    workload.write_text("prompt_tokens,output_tokens\n16,8\n24,4\n")
    return {"teacher": teacher, "data": data, "student": student, "cache": cache, "distilled": distilled,
            "checkpoint": Path(f"{distilled}.checkpoint"), "compressed": compressed, "ppl": ppl,
            "runs": root / "runs", "corpus": corpus, "probes": probes, "workload": workload}


# What each stage reads: (stage, the input artifact, the command with {input} and {out} to fill in).
def _commands(a: dict[str, Path]) -> list[tuple[str, str, list[str]]]:
    distill = ["distill", "--teacher", a["teacher"], "--student", a["student"], "--data", a["data"], "--method",
               "budgeted-lora", "--budget", "0.5", "--tokens", str(8 * 64), "--save-every", "0", *SMALL]
    return [
        ("build-student", "teacher", ["build-student", "--teacher", "{input}", "--layers", "2", "--out", "{out}"]),
        ("teacher-logits", "data", ["teacher-logits", "--teacher", a["teacher"], "--data", "{input}", "--tokens",
                                    "256", "--out", "{out}"]),
        ("distill", "data", [*distill[:5], "--data", "{input}", *distill[7:], "--out", "{out}"]),
        ("distill", "student", [*distill[:3], "--student", "{input}", *distill[5:], "--out", "{out}"]),
        ("distill", "cache", ["distill", "--student", a["student"], "--data", a["data"], "--teacher-logits",
                              "{input}", "--method", "kd-lora", "--tokens", "256", "--save-every", "0", *SMALL,
                              "--out", "{out}"]),
        ("distill --resume", "checkpoint", [*distill, "--checkpoint-dir", "{input}", "--resume", "--out", "{out}"]),
        ("compress", "distilled", ["compress", "{input}", "--out", "{out}"]),
        ("eval-ppl", "compressed", ["eval-ppl", "{input}", "--data", a["data"], "--out", "{out}"]),
        ("eval-ppl", "data", ["eval-ppl", a["compressed"], "--data", "{input}", "--out", "{out}"]),
        ("eval-icl", "compressed", ["eval-icl", "{input}", "--n", "1", "--seeds", "1", "--out", "{out}"]),
        ("bench", "compressed", ["bench", "{input}", "--baseline", a["student"], *BENCH, "--out", "{out}"]),
        ("bench", "student", ["bench", a["compressed"], "--baseline", "{input}", *BENCH, "--out", "{out}"]),
        ("capacity", "compressed", ["capacity", "{input}", "--gpu-mem", "1GiB", "--prompt-len", "16",
                                    "--output-len", "8", "--iteration-time", "0.01", "--out", "{out}"]),
        ("report", "runs", ["report", "{input}", "--out", "{out}"]),
    ]


def _largest(directory: Path, suffix: str) -> Path | None:
    files = sorted(directory.rglob(f"*{suffix}"), key=lambda p: p.stat().st_size)
    return files[-1] if files else None


def _victim(directory: Path) -> Path:
    """The file a fault damages: the weights, else the biggest Arrow file, else the biggest listed file."""
    for suffix in (".safetensors", ".arrow", ".json"):
        found = [p for p in directory.rglob(f"*{suffix}") if p.name != "manifest.json"]
        if found:
            return max(found, key=lambda p: p.stat().st_size)
    raise AssertionError(f"nothing to damage in {directory}")


def truncate_safetensors(directory: Path) -> Path | None:
    victim = _largest(directory, ".safetensors")
    if victim is not None:
        with open(victim, "r+b") as handle:
            handle.truncate(victim.stat().st_size // 2)
    return victim


def change_a_byte(directory: Path) -> Path | None:
    """Same size, other content: only the SHA-256 can tell."""
    victim = _victim(directory)
    with open(victim, "r+b") as handle:
        handle.seek(victim.stat().st_size // 2)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0x01]))
    return victim


def append_bytes(directory: Path) -> Path | None:
    victim = _victim(directory)
    with open(victim, "ab") as handle:
        handle.write(b"\0" * 16)
    return victim


def remove_a_file(directory: Path) -> Path | None:
    victim = _victim(directory)
    victim.unlink()
    return victim


def manifest_of_another_stage(directory: Path) -> Path | None:
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["stage"] = "eval-icl" if manifest["stage"] != "eval-icl" else "bench"
    path.write_text(json.dumps(manifest))
    return path


def cut_arrow_mid_batch(directory: Path) -> Path | None:
    victim = _largest(directory, ".arrow")
    if victim is not None:
        with open(victim, "r+b") as handle:
            handle.truncate(victim.stat().st_size - 100)
    return victim


FAULTS = {f.__name__: f for f in (truncate_safetensors, change_a_byte, append_bytes, remove_a_file,
                                  manifest_of_another_stage, cut_arrow_mid_batch)}
MANIFESTED = ("change_a_byte", "append_bytes", "remove_a_file", "manifest_of_another_stage")
APPLICABLE = {  # which faults each kind of input can have
    "teacher": ("truncate_safetensors", "remove_a_file"),  # a plain Hugging Face checkpoint: no manifest
    "data": (*MANIFESTED, "cut_arrow_mid_batch"),
    "cache": (*MANIFESTED, "cut_arrow_mid_batch"),
    "student": ("truncate_safetensors", *MANIFESTED),
    "checkpoint": ("truncate_safetensors", *MANIFESTED),
    "distilled": ("truncate_safetensors", *MANIFESTED),
    "compressed": ("truncate_safetensors", *MANIFESTED),
    "runs": ("change_a_byte", "append_bytes", "remove_a_file", "cut_arrow_mid_batch"),  # report: any stage
}
CASES = [(stage, role, fault) for stage, role, _ in _commands({k: Path(k) for k in APPLICABLE})
         for fault in APPLICABLE[role]]


@pytest.mark.parametrize("stage, role, fault", CASES, ids=[f"{s}-{r}-{f}" for s, r, f in CASES])
def test_a_damaged_input_is_refused_in_one_line(made, tmp_path, stage, role, fault):
    command = next(c for s, r, c in _commands(made) if (s, r) == (stage, role))
    source = made[role] if role != "runs" else made["runs"]
    damaged = tmp_path / source.name
    shutil.copytree(source, damaged)
    target = damaged / "ppl" if role == "runs" else damaged  # report: one evaluation in the runs
    victim = FAULTS[fault](target)
    assert victim is not None, (fault, role)
    out = tmp_path / "out"
    args = [str(out) if a == "{out}" else str(damaged) if a == "{input}" else str(a) for a in command]
    result = CliRunner().invoke(app, args)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, (result.exit_code, result.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr[-3000:]
    assert victim.name in lines[0] or str(target) in lines[0], lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------
# The output over an input, and --overwrite of a directory another made: refused before any work, in one
# line naming both flags, every input byte for byte as it was


def _stage_commands(a: dict[str, Path]) -> dict[str, list]:
    """Every command that writes an --out, on the inputs `a` names, ending in `--out`."""
    distill = ["distill", "--teacher", a["teacher"], "--student", a["student"], "--data", a["data"],
               "--teacher-logits", a["cache"], "--method", "kd-lora", "--tokens", "256", "--save-every", "0", *SMALL]
    return {
        "prepare-data": ["prepare-data", a["corpus"], "--tokenizer", a["teacher"], "--heldout", "0.2", "--seq-len",
                         "32"],
        "build-student": ["build-student", "--teacher", a["teacher"], "--layers", "2"],
        "teacher-logits": ["teacher-logits", "--teacher", a["teacher"], "--data", a["data"], "--tokens", "256",
                           "--top-k", "8"],
        "distill": distill,
        "distill --resume": [*distill, "--checkpoint-dir", a["checkpoint"], "--resume"],
        "compress": ["compress", a["distilled"]],
        "eval-ppl": ["eval-ppl", a["compressed"], "--data", a["data"], "--max-tokens", "256"],
        "eval-icl": ["eval-icl", a["compressed"], "--probes", a["probes"], "--n", "1", "--seeds", "1"],
        "eval-harness": ["eval-harness", a["compressed"], "--tasks", "arc_easy", "--limit", "1"],
        "bench": ["bench", a["compressed"], "--baseline", a["student"], *BENCH],
        "bench-serving": ["bench-serving", a["compressed"], "--repeats", "1"],
        "capacity": ["capacity", a["compressed"], "--gpu-mem", "1GiB", "--workload", a["workload"],
                     "--iteration-time", "0.01"],
        "report": ["report", a["runs"]],
    }


# (stage, the input's role in `made`, the flag it is given with)
OVER = [
    ("prepare-data", "corpus", "INPUT"), ("prepare-data", "teacher", "--tokenizer"),
    ("build-student", "teacher", "--teacher"),
    ("teacher-logits", "teacher", "--teacher"), ("teacher-logits", "data", "--data"),
    ("distill", "student", "--student"), ("distill", "data", "--data"), ("distill", "teacher", "--teacher"),
    ("distill", "cache", "--teacher-logits"), ("distill --resume", "checkpoint", "--checkpoint-dir"),
    ("compress", "distilled", "MODEL"),
    ("eval-ppl", "compressed", "MODEL"), ("eval-ppl", "data", "--data"),
    ("eval-icl", "compressed", "MODEL"), ("eval-icl", "probes", "--probes"),
    ("eval-harness", "compressed", "MODEL"),
    ("bench", "compressed", "MODEL"), ("bench", "student", "--baseline"),
    ("bench-serving", "compressed", "MODEL"),
    ("capacity", "compressed", "MODELS"), ("capacity", "workload", "--workload"),
    ("report", "runs", "RUN_DIR"),
]
FILES = ("probes", "workload")  # inputs that are files: nothing can lie inside them
RELATIONS = ("same", "inside", "contains", "symlink-out", "symlink-in")
OVER_CASES = [(stage, role, flag, relation) for stage, role, flag in OVER for relation in RELATIONS
              if not (relation == "inside" and (role in FILES or stage == "report"))]  # report writes into RUN_DIR


def digest(path: Path) -> dict[str, str]:
    """Every entry under `path` (itself included): files by SHA-256, symlinks by target, directories by name."""
    path = Path(path)
    entries = [path, *sorted(path.rglob("*"))] if path.is_dir() and not path.is_symlink() else [path]
    found = {}
    for entry in entries:
        name = entry.relative_to(path).as_posix() if entry != path else "."
        if entry.is_symlink():
            found[name] = f"-> {os.readlink(entry)}"
        elif entry.is_dir():
            found[name] = "dir"
        else:
            found[name] = hashlib.sha256(entry.read_bytes()).hexdigest()
    return found


def _copy(source: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        shutil.copytree(source, target, symlinks=True)
    else:
        shutil.copyfile(source, target)
    return target


def _refusal(args: list) -> str:
    """Run the CLI; it must refuse in one line and write nothing to stdout. Returns that line."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, (result.exit_code, result.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    assert "Traceback" not in result.stderr and result.stdout == ""
    return lines[0]


@pytest.mark.parametrize("stage, role, flag, relation", OVER_CASES, ids=["-".join(c) for c in OVER_CASES])
def test_an_out_over_an_input_is_refused_and_the_input_kept(made, tmp_path, stage, role, flag, relation):
    """--out the input itself, inside it, containing it (its parent), or either given through a symlink;
    with --overwrite, the most it could destroy."""
    holder = tmp_path / "in"  # holds the input alone: --out there contains it and nothing else
    copy = _copy(made[role], holder / made[role].name)
    given, out, shown = copy, copy, "is the same path as"
    if relation == "inside":
        out, shown = copy / "sub", "is inside"
    elif relation == "contains":
        out, shown = holder, "contains"
    elif relation == "symlink-out":  # --out names the input through a link
        out = tmp_path / "link"
        out.symlink_to(copy, target_is_directory=copy.is_dir())
    elif relation == "symlink-in":  # the input is named through a link, --out by its real path
        given = tmp_path / "link"
        given.symlink_to(copy, target_is_directory=copy.is_dir())
    before = digest(holder)
    line = _refusal([*_stage_commands({**made, role: given})[stage], "--out", out, "--overwrite"])
    assert line == f"error: --out {out} {shown} {flag} {given}: choose an --out outside the stage's inputs"
    assert digest(holder) == before
    assert not [p for p in tmp_path.rglob(".*")]  # no temporary sibling either


def test_a_checkpoint_dir_over_an_input_is_refused(made, tmp_path):
    data = _copy(made["data"], tmp_path / "data")
    before = digest(data)
    line = _refusal([*_stage_commands({**made, "data": data})["distill"], "--out", tmp_path / "out",
                     "--checkpoint-dir", data, "--overwrite"])  # --overwrite deletes an old checkpoint
    assert line == (f"error: --checkpoint-dir {data} is the same path as --data {data}: choose an "
                    "--checkpoint-dir outside the stage's inputs")
    assert digest(data) == before and not (tmp_path / "out").exists()


def test_an_out_inside_a_teacher_named_by_an_alias_is_refused(made, tmp_path, isolated_home):
    """An alias (teachers.toml) and a .gguf file stand for paths too: the alias's target, the file and its
    converted checkpoint."""
    teacher = _copy(made["teacher"], tmp_path / "teacher")
    (isolated_home / "teachers.toml").write_text(f'mine = "{teacher}"\n')
    before = digest(teacher)
    line = _refusal(["build-student", "--teacher", "mine", "--layers", "2", "--out", teacher / "student"])
    assert line == (f"error: --out {teacher / 'student'} is inside --teacher {teacher}: choose an --out outside the "
                    "stage's inputs")
    assert digest(teacher) == before
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")  # refused before anything reads it
    line = _refusal(["eval-icl", gguf, "--out", gguf, "--overwrite"])
    assert line == f"error: --out {gguf} is the same path as MODEL {gguf}: choose an --out outside the stage's inputs"
    assert gguf.read_bytes() == b"GGUF"
    converted = models.gguf_cache_dir(gguf)
    line = _refusal(["eval-icl", gguf, "--out", converted / "icl"])
    assert line == (f"error: --out {converted / 'icl'} is inside MODEL {converted}: choose an --out outside the "
                    "stage's inputs")


STAGES = list(_stage_commands(defaultdict(Path)))
FOREIGN = ("a user's folder", "another stage's output")


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("what", FOREIGN)
def test_overwrite_replaces_only_an_earlier_output_of_the_same_stage(made, tmp_path, stage, what):
    out = tmp_path / "out"
    if what == "a user's folder":
        (out / "notes").mkdir(parents=True)
        (out / "notes" / "plan.txt").write_text("mine")
        found = "not a bltool output (no readable manifest.json)"
    else:
        other = made["ppl"] if stage != "eval-ppl" else made["cache"]
        _copy(other, out)
        found = f"the output of `bltool {read_manifest(out)['stage']}`"
    before = digest(out)
    line = _refusal([*_stage_commands(made)[stage], "--out", out, "--overwrite"])
    assert line.startswith(f"error: --out {out} is {found}; --overwrite replaces only "), line
    assert digest(out) == before
    assert not [p for p in tmp_path.rglob(".*")]


def test_overwrite_deletes_only_an_earlier_distill_checkpoint(made, tmp_path):
    out = tmp_path / "out"
    mine = Path(f"{out}.checkpoint")  # distill's default --checkpoint-dir, here a folder of the user's
    mine.mkdir()
    (mine / "plan.txt").write_text("mine")
    line = _refusal([*_stage_commands(made)["distill"], "--out", out, "--overwrite"])
    assert line == (f"error: --checkpoint-dir {mine} is not a bltool output (no readable manifest.json); "
                    "--overwrite replaces only a `bltool distill` checkpoint: choose another --checkpoint-dir or "
                    "empty it first")
    assert (mine / "plan.txt").read_text() == "mine" and not out.exists()


# ---------------------------------------------------------------------------------------------------
# The output side: a disk that fills up, a parent that is read-only


def _distill_cmd(made: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "bltool", "distill", "--teacher", str(made["teacher"]), "--student",
            str(made["student"]), "--data", str(made["data"]), "--method", "budgeted-lora", "--budget", "0.5",
            "--lora-dropout", "0.1", *SMALL, "--out", str(out), *extra]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def test_a_full_disk_fails_in_one_line_and_leaves_nothing(made, tmp_path):
    """RLIMIT_FSIZE stands in for a full disk: writing a file past 64 KiB fails with EFBIG, as a write
    on a full disk fails with ENOSPC."""
    out = tmp_path / "out"
    limit = 64 * 1024

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    done = subprocess.run([sys.executable, "-m", "bltool", "compress", str(made["distilled"]), "--out", str(out)],
                          capture_output=True, text=True, env=_env(), preexec_fn=small_files, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1 and "cannot write" in lines[-1], done.stderr
    assert str(out) in lines[-1] and "Traceback" not in done.stderr and done.stdout == ""
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def _read_only_mount_possible() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-rm", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _read_only_mount_possible(), reason="needs `unshare -rm` to mount a read-only tmpfs")
def test_a_read_only_parent_is_refused_before_any_work(made, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    out = ro / "runs" / "out"
    script = (f"mount -t tmpfs -o ro tmpfs {ro} && exec {sys.executable} -m bltool compress {made['distilled']} "
              f"--out {out}")
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, env=_env(),
                          timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [f"error: --out {out}: {ro} is not writable (read-only or no "
                                                "permission)"]
    assert not out.exists() and not (ro / "runs").exists()


# ---------------------------------------------------------------------------------------------------
# distill: SIGKILL after a checkpoint, and during one


def _weights(path: Path) -> dict:
    return load_file(str(path / "model.safetensors"))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


@pytest.fixture(scope="module")
def uninterrupted(made, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("whole") / "out"
    done = subprocess.run(_distill_cmd(made, out, "--tokens", str(40 * 64), "--save-every", "0"),
                          capture_output=True, text=True, env=_env(), timeout=600)
    assert done.returncode == 0, done.stderr
    return out


def test_sigkill_after_a_checkpoint_then_resume_equals_an_uninterrupted_run(made, uninterrupted, tmp_path):
    out = tmp_path / "out"
    state = Path(f"{out}.checkpoint") / "state.json"
    proc = subprocess.Popen(_distill_cmd(made, out, "--tokens", str(40 * 64), "--save-every", "3"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    deadline = time.monotonic() + 300
    while not state.is_file() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # no handler runs: whatever was on disk is what there is
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL and not out.exists()
    step = read_manifest(state.parent, ("distill-checkpoint",))["step"]
    assert 3 <= step < 40
    resumed = subprocess.run(_distill_cmd(made, out, "--tokens", str(40 * 64), "--save-every", "3", "--resume"),
                             capture_output=True, text=True, env=_env(), timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert _same(_weights(out), _weights(uninterrupted))  # bitwise on CPU


KILL_ON_FIFTH_WRITE = """
import os, signal, sys
import bltool.train.trainstate as trainstate
original, calls = trainstate.save_file, [0]
def save_file(*args, **kwargs):
    calls[0] += 1
    original(*args, **kwargs)
    if calls[0] == 5:  # checkpoints write 3 files: the 5th is the middle of the second checkpoint
        os.kill(os.getpid(), signal.SIGKILL)
trainstate.save_file = save_file
sys.argv = ["bltool", *sys.argv[1:]]
from bltool.cli import main
main()
"""


def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one(made, uninterrupted, tmp_path):
    out = tmp_path / "out"
    ckpt = Path(f"{out}.checkpoint")
    args = _distill_cmd(made, out, "--tokens", str(40 * 64), "--save-every", "2")[3:]  # after `-m bltool`
    killed = subprocess.run([sys.executable, "-c", KILL_ON_FIFTH_WRITE, *args], capture_output=True, text=True,
                            env=_env(), timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert list(tmp_path.glob(f".{ckpt.name}.tmp-*"))  # the half-written one
    assert read_manifest(ckpt, ("distill-checkpoint",))["step"] == 2  # the previous one, whole
    resumed = subprocess.run(_distill_cmd(made, out, "--tokens", str(40 * 64), "--save-every", "2", "--resume"),
                             capture_output=True, text=True, env=_env(), timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert _same(_weights(out), _weights(uninterrupted))
    assert not list(tmp_path.glob(f".{ckpt.name}.tmp-*"))  # the resumed run cleaned up
