"""examples/slurm/ on a real one-node Slurm started here: munged, slurmctld and slurmd on localhost with two
CPUs, from a configuration in a temporary directory. The tiny-model sweep is submitted as it would be on a
cluster (one stage per job, chained by dependencies, paths from the site env file, submitted from outside
the repository) and waited for with `sbatch --wait`; one distill task is stopped twice mid-run, as the
time-limit warning (`--signal=B:TERM@...`) and `scontrol requeue` stop it, and must end equal to the same
distill run undisturbed (torchrun started by the test beside the jobs).

Needs Slurm's daemons (`make slurm-install`: Debian's slurm-wlm and munge). Without them the test skips,
unless BLTOOL_REQUIRE_SLURM=1 (make test sets it): then it fails.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import save_tiny_model, write_corpus
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
COMMANDS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel", "sinfo")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _require_slurm() -> None:
    missing = [name for name in COMMANDS if shutil.which(name) is None and not Path("/usr/sbin", name).exists()]
    if missing:
        message = f"Slurm is not installed (no {', '.join(missing)}; make slurm-install installs slurm-wlm and munge)"
        if os.environ.get("BLTOOL_REQUIRE_SLURM") == "1":
            pytest.fail(f"BLTOOL_REQUIRE_SLURM=1 but {message}")
        pytest.skip(message)


def _daemon(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A one-node cluster: its environment (SLURM_CONF) for the clients."""
    _require_slurm()
    d = tmp_path_factory.mktemp("slurm")
    d.chmod(0o700)  # munged refuses a key in a directory others can write
    (d / "state").mkdir()
    (d / "spool").mkdir()
    key = d / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    user = subprocess.run(["id", "-un"], capture_output=True, text=True, check=True).stdout.strip()
    # cred_expire: a requeued job waits this long (+1 s) before it may start again (default 120 s);
    # sched_interval: how often pending jobs are looked at (default 60 s)
    (d / "slurm.conf").write_text(f"""\
ClusterName=bltooltest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d}/munge.sock,cred_expire=5
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
ReturnToService=2
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
KillWait=30
NodeName=localhost NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
""")
    env = {**os.environ, "SLURM_CONF": str(d / "slurm.conf")}
    subprocess.run([_daemon("munged"), "--force", f"--socket={d}/munge.sock", f"--key-file={key}",
                    f"--log-file={d}/munged.log", f"--pid-file={d}/munged.pid", f"--seed-file={d}/munged.seed"],
                   check=True, env=env)
    daemons = [subprocess.Popen([_daemon("slurmctld"), "-D", "-c", "-f", env["SLURM_CONF"]], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
               subprocess.Popen([_daemon("slurmd"), "-D", "-f", env["SLURM_CONF"], "-N", "localhost"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        deadline = time.monotonic() + 30
        while True:
            state = subprocess.run(["sinfo", "--noheader", "--format", "%T"], env=env, capture_output=True, text=True)
            if state.stdout.strip() == "idle":
                break
            if time.monotonic() > deadline or any(p.poll() is not None for p in daemons):
                logs = "".join(f"\n{f}: " + (d / f).read_text()[-1500:] for f in ("slurmctld.log", "slurmd.log")
                               if (d / f).exists())
                pytest.fail(f"the local Slurm did not come up (sinfo: {state.stdout}{state.stderr}){logs}")
            time.sleep(0.2)
        yield env
    finally:
        subprocess.run(["scancel", "--full", f"--user={user}"], env=env, capture_output=True)
        for p in reversed(daemons):
            p.terminate()
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        munged = d / "munged.pid"
        if munged.exists():
            os.kill(int(munged.read_text()), 15)


def _wait_for(condition, what: str, submit: subprocess.Popen, timeout: float = 240):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if submit.poll() is not None:
            pytest.fail(f"submit.sh ended (exit {submit.returncode}) before {what}: {submit.stderr.read()}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)
    return value


def _checkpoint_step(path: Path) -> int:
    try:
        return json.loads((path / "manifest.json").read_text())["step"]
    except (OSError, ValueError, KeyError):  # not written yet, or being replaced
        return 0


def _task_log(logs: Path, task: int) -> str:
    return "".join(p.read_text() for p in logs.glob(f"bltool-distill-*_{task}.out"))


def _job(env: dict, name: str, task: int) -> str:
    """The id of array task `task` of job `name`, while it runs."""
    listed = subprocess.run(["squeue", "--noheader", "--name", name, "--states", "RUNNING", "--format", "%i"],
                            env=env, capture_output=True, text=True).stdout.split()
    return next((job for job in listed if job.endswith(f"_{task}")), "")


def test_sweep_as_slurm_jobs_and_a_requeued_distill_task_continues_bit_for_bit(slurm, tmp_path, tokenizer):
    teacher = save_tiny_model(tmp_path / "teacher", tokenizer, "llama", layers=4, seed=4)
    corpus = write_corpus(tmp_path / "corpus", n_docs=60, seed=3)
    site = tmp_path / "site.env"
    site.write_text(f"BLTOOL_HOME={tmp_path / 'home'}\nBLTOOL_TEACHER={teacher}\nBLTOOL_CORPUS={corpus}\n"
                    f"BLTOOL_DATA_ROOT={tmp_path / 'data'}\nBLTOOL_RUNS_ROOT={tmp_path / 'runs'}\n")
    work = tmp_path / "elsewhere"  # sbatch runs the scripts from its spool: nothing may assume the repository
    work.mkdir()
    env = {k: v for k, v in slurm.items() if not k.startswith(("BLTOOL_", "SLURM_")) or k == "SLURM_CONF"}
    env.update({
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",  # the venv's bltool and torchrun
        "BLTOOL_ENV": str(site), "OMP_NUM_THREADS": "1", "WAIT": "1", "RUN": "sweep1",
        "SWEEP": "kd-lora budgeted-lora:0.4",  # array task 1 (F = 0.4) is stopped twice
        "LAYERS": "2", "SEQ_LEN": "32", "HELDOUT": "0.25", "TOKENS": "12800", "BATCH": "2", "TOP_K": "8",
        "DISTILL_ARGS": "--rank 4 --lora-alpha 8 --save-every 10",
        "ICL_ARGS": "--n 2 --seeds 1 --shots 2 --tasks capitalize,next_item",
        "BENCH_ARGS": "--prefill-tokens 32 --decode-batch 1 --decode-steps 2 --repeats 1 --warmup 1",
    })
    runs, data = tmp_path / "runs" / "sweep1", tmp_path / "data" / "sweep1"
    stopped = runs / "budgeted-lora-0.4"
    checkpoint = stopped / "distilled.checkpoint"
    reference = None
    submit = subprocess.Popen(["bash", str(ROOT / "examples" / "slurm" / "submit.sh")], env=env, cwd=work,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # the undisturbed run: what distill.sbatch runs, from the same inputs, once they are made
        _wait_for(lambda: all((p / "manifest.json").is_file() for p in (runs / "teacher-logits", runs / "student")),
                  "the teacher-logits cache and the student", submit)
        reference = subprocess.Popen(
            ["torchrun", "--nnodes=1", "--nproc-per-node=1", "--rdzv-backend=c10d",
             f"--rdzv-endpoint=127.0.0.1:{_free_port()}",
             "-m", "bltool", "distill", "--teacher-logits", str(runs / "teacher-logits"), "--student",
             str(runs / "student"), "--data", str(data), "--method", "budgeted-lora", "--budget", "0.4", "--tokens",
             "12800", "--batch-size", "2", "--out", str(tmp_path / "reference"), "--rank", "4", "--lora-alpha", "8",
             "--save-every", "10"], env={**env, "BLTOOL_HOME": str(tmp_path / "home")}, cwd=work,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # 1. the time-limit warning: --signal=B:TERM@120 signals the batch shell; the job checkpoints, requeues
        _wait_for(lambda: _checkpoint_step(checkpoint), "distill task 1's first checkpoint", submit)
        job = _wait_for(lambda: _job(env, "bltool-distill", 1), "distill task 1 in squeue", submit)
        subprocess.run(["scancel", "--batch", "--signal=TERM", job], env=env, check=True)
        # 2. `scontrol requeue` once the second attempt has checkpointed past the first's last checkpoint
        _wait_for(lambda: "attempt 2" in _task_log(runs / "logs", 1), "distill task 1's second attempt", submit)
        stopped_at = _checkpoint_step(checkpoint)
        _wait_for(lambda: _checkpoint_step(checkpoint) > stopped_at and _job(env, "bltool-distill", 1),
                  "distill task 1's checkpoint in its second attempt", submit)
        subprocess.run(["scontrol", "requeue", job], env=env, check=True)
        out, err = submit.communicate(timeout=600)
        _, reference_err = reference.communicate(timeout=300)
    finally:
        for p in (submit, reference):
            if p is not None:
                p.kill()
    assert reference.returncode == 0, reference_err
    assert submit.returncode == 0, err + "".join(f"\n{p.name}:\n{p.read_text()[-2000:]}"
                                                 for p in sorted((runs / "logs").glob("*.out")))
    assert out.strip() == str(runs / "report")
    assert (data / "manifest.json").is_file()  # under BLTOOL_DATA_ROOT of the env file

    logs = {re.sub(r"-\d+(_\d+)?\.out$", r"\1", p.name): p.read_text() for p in (runs / "logs").glob("*.out")}
    assert set(logs) == {"bltool-prepare-data", "bltool-build-student", "bltool-teacher-logits", "bltool-distill_0",
                         "bltool-distill_1", "bltool-evaluate_0", "bltool-evaluate_1", "bltool-report"}, set(logs)
    log = logs["bltool-distill_1"]  # appended to over the task's three attempts
    assert [int(n) for n in re.findall(r"attempt (\d+)", log)] == [1, 2, 3], log
    assert "requeueing job" in log, log
    resumed = [int(n) for n in re.findall(r"resuming at step (\d+) of 200", log)]
    assert len(resumed) == 2 and 0 < resumed[0] < resumed[1] < 200, log
    assert "attempt 2" not in logs["bltool-distill_0"]

    a, b = (load_file(str(p / "model.safetensors")) for p in (stopped / "distilled", tmp_path / "reference"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a), [k for k in a if not a[k].equal(b[k])]

    with open(runs / "report" / "report.csv", newline="", encoding="utf-8") as handle:
        rows = {row["name"]: row for row in csv.DictReader(handle)}
    assert set(rows) == {"kd-lora", "budgeted-lora-0.4"}
    for name, row in rows.items():
        assert row["method"] == name.split("-0")[0] and row["missing"] == "" and float(row["perplexity"]) > 1
    assert rows["budgeted-lora-0.4"]["budget"] == "0.4" and float(rows["budgeted-lora-0.4"]["mac_speedup"]) >= 1


def test_a_failed_stage_fails_the_waiting_submission(slurm, tmp_path):
    """prepare-data fails (no corpus): every job after it is cancelled, and submit.sh with WAIT=1 says so and
    exits 1 (`sbatch --wait` itself exits 0 for a job cancelled before it started)."""
    site = tmp_path / "site.env"
    site.write_text(f"BLTOOL_TEACHER={tmp_path / 'teacher'}\nBLTOOL_CORPUS={tmp_path / 'no-corpus'}\n"
                    f"BLTOOL_DATA_ROOT={tmp_path / 'data'}\nBLTOOL_RUNS_ROOT={tmp_path / 'runs'}\n")
    env = {k: v for k, v in slurm.items() if not k.startswith(("BLTOOL_", "SLURM_")) or k == "SLURM_CONF"}
    env.update({"PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}", "BLTOOL_ENV": str(site),
                "WAIT": "1", "RUN": "broken", "SWEEP": "kd-lora"})
    result = subprocess.run(["bash", str(ROOT / "examples" / "slurm" / "submit.sh")], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and result.stdout == "", (result.stdout, result.stderr)
    assert re.search(r"error: the report job \d+ ended CANCELLED", result.stderr), result.stderr
    [log] = (tmp_path / "runs" / "broken" / "logs").glob("bltool-prepare-data-*.out")
    assert "no-corpus" in log.read_text()
