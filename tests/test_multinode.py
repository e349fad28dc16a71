"""Two "nodes" on this machine: `torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d` started twice
(gloo, CPU) trains and caches exactly what `torchrun --nproc-per-node 2` does on one node; a SIGTERM to one node
checkpoints the run and the 2-node --resume ends equal to an undisturbed run; and a rendezvous that cannot
complete (a node that never comes, a port in use) ends in one line naming the endpoint, not a hang."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import distill_setting
from safetensors.torch import load_file

from bltool.artifacts import read_manifest
from bltool.stages import teacher_logits as teacher_logits_stage
from bltool.train.teacher_cache import TeacherCache

ROOT = Path(__file__).resolve().parents[1]
SEQ = 32
pytestmark = pytest.mark.slow  # torchrun and bltool in subprocesses


@pytest.fixture(scope="module")
def setting(tmp_path_factory, tokenizer):
    return distill_setting(tmp_path_factory.mktemp("multinode"), tokenizer)


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_node(args: list[str]) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node 2` on one node."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(_free_port()), "-m", "bltool", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert done.returncode == 0, done.stderr
    return done


class TwoNodes:
    """Two torchrun agents, one process each, meeting at a c10d rendezvous on localhost; each node's output
    lines are read as they come (rank 0 is on whichever node the rendezvous made it)."""

    def __init__(self, args: list[str]):
        endpoint = f"127.0.0.1:{_free_port()}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "multinode", "-m", "bltool", *args]
        self.nodes = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                                       start_new_session=True) for _ in range(2)]
        self.lines: queue.Queue = queue.Queue()
        self.stderr: list[list[str]] = [[], []]
        self.readers = [threading.Thread(target=self._read, args=(i,), daemon=True) for i in range(2)]
        for reader in self.readers:
            reader.start()

    def _read(self, i: int) -> None:
        for line in self.nodes[i].stderr:
            self.stderr[i].append(line)
            self.lines.put((i, line))

    def wait_for(self, text: str, seconds: float = 240) -> int:
        """The node that printed a line containing `text`."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                i, line = self.lines.get(timeout=1)
            except queue.Empty:
                continue
            if text in line:
                return i
        raise AssertionError(f"no node printed {text!r}: {self.stderr}")

    def finish(self, seconds: float = 300) -> list[tuple[int, str, str]]:
        """Each node's (exit status, stdout, stderr)."""
        outs = [node.stdout.read() for node in self.nodes]
        for node in self.nodes:
            node.wait(timeout=seconds)
        for reader in self.readers:
            reader.join(timeout=10)
        return [(node.returncode, out, "".join(err)) for node, out, err in zip(self.nodes, outs, self.stderr)]


def _two_nodes_ok(args: list[str]) -> list[tuple[int, str, str]]:
    results = TwoNodes(args).finish()
    assert all(code == 0 for code, _, _ in results), results
    return results


def _same_weights(a: Path, b: Path) -> None:
    """Tensor-equal weights (safetensors' header order varies, so not the files' bytes)."""
    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert x.keys() == y.keys()
    for key in x:
        assert torch.equal(x[key], y[key]), key


def _same_rows(a: Path, b: Path) -> None:
    ca, cb = TeacherCache.open(a), TeacherCache.open(b)
    assert ca.sequences() == cb.sequences()
    for sequence in ca.sequences():
        for x, y in zip(ca.batch([sequence], SEQ, "cpu"), cb.batch([sequence], SEQ, "cpu")):
            assert torch.equal(x, y), sequence


def _distill_args(setting, out: Path, *extra: str) -> list[str]:
    return ["distill", "--teacher", str(setting["teacher"]), "--student", str(setting["student"]), "--data",
            str(setting["data"]), "--method", "budgeted-lora", "--budget", "0.5", "--tokens", str(40 * 2 * 2 * SEQ),
            "--rank", "4", "--lora-alpha", "8", "--lora-dropout", "0.5", "--batch-size", "2", "--save-every", "5",
            "--device", "cpu", "--out", str(out), *extra]


def test_distill_on_two_nodes_stopped_by_a_sigterm_to_one_resumes_to_the_one_node_run(setting, tmp_path):
    """The 2-node run, preempted on one node and resumed on two, ends tensor-equal to the undisturbed 2-process
    single-node run: 2 nodes train as 1 node does, and the resume continues bit for bit."""
    one, parts = tmp_path / "one", tmp_path / "parts"
    _one_node(_distill_args(setting, one))

    run = TwoNodes(_distill_args(setting, parts))
    main = run.wait_for("distill budgeted-lora")  # rank 0's announcement: the loop starts right after it
    os.killpg(run.nodes[1 - main].pid, signal.SIGTERM)  # the scheduler preempts the node without rank 0
    results = run.finish()
    assert all(code != 0 for code, _, _ in results) and not parts.exists(), results
    # rank 0 learnt of it at the next step's all-reduce and wrote the checkpoint with both ranks' state
    assert "stopped by a signal on another rank" in results[main][2], results
    checkpoint = Path(f"{parts}.checkpoint")
    state = json.loads((checkpoint / "state.json").read_text())
    assert 1 <= state["step"] < 40 and state["world_size"] == 2
    assert {"rank0.cpu", "rank1.cpu"} <= set(load_file(str(checkpoint / "rng.safetensors")))
    results = _two_nodes_ok(_distill_args(setting, parts, "--resume"))
    assert sorted(out.strip() for _, out, _ in results) == ["", str(parts)]  # rank 0's node prints the path
    assert read_manifest(parts)["training"]["steps"] == 40
    _same_weights(one, parts)


def _logits_args(setting, out: Path, *extra: str) -> list[str]:
    return ["teacher-logits", "--teacher", str(setting["teacher"]), "--data", str(setting["data"]), "--out", str(out),
            "--tokens", str(96 * SEQ), "--top-k", "5", "--batch-size", "1", "--device", "cpu", *extra]


def test_teacher_logits_shards_over_two_nodes_and_resumes_after_a_sigterm_to_one(setting, tmp_path):
    """Both nodes write their shards; stopped on one node and resumed on two, the cache holds the rows of the
    2-process single-node run."""
    one, parts = tmp_path / "one", tmp_path / "parts"
    _one_node(_logits_args(setting, one))

    run = TwoNodes(_logits_args(setting, parts, "--save-seconds", "0"))  # a part per batch
    shards = teacher_logits_stage.partial_path(parts) / "shards"
    deadline = time.monotonic() + 240
    while not list(shards.glob("part-*.json")) and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(run.nodes[1].pid, signal.SIGTERM)
    results = run.finish()
    assert all(code != 0 for code, _, _ in results) and not parts.exists(), results
    kept = [json.loads(p.read_text()) for p in shards.glob("part-*.json")]
    assert {part["rank"] for part in kept} == {0, 1}  # both nodes kept the parts they completed
    _two_nodes_ok(_logits_args(setting, parts, "--resume", "--save-seconds", "0"))
    manifest = read_manifest(parts)
    assert {s["rank"] for s in manifest["shards"]} == {0, 1} and manifest["timing"]["processes"] == 2
    assert manifest["timing"]["resumed"] and manifest["timing"]["tokens"] < manifest["coverage"]["tokens"]
    _same_rows(one, parts)


# -- a rendezvous that cannot complete: one line naming the endpoint ---------------------------------------


def _alone(setting, tmp_path, rank: int, port: int) -> subprocess.CompletedProcess:
    """One process of a world of two, launched as srun would (RANK, WORLD_SIZE, MASTER_ADDR/PORT), whose
    partner never comes, with a 2-second rendezvous timeout."""
    env = _env(RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               BLTOOL_RDZV_TIMEOUT="2")
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "bltool", *_distill_args(setting, tmp_path / f"alone{rank}")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert time.monotonic() - start < 60  # the timeout, not a hang
    return done


@pytest.mark.parametrize("rank", [0, 1])
def test_a_node_that_never_comes_ends_in_one_line_naming_the_endpoint(setting, tmp_path, rank):
    port = _free_port()
    done = _alone(setting, tmp_path, rank, port)
    assert done.returncode == 1 and done.stdout == ""
    (line,) = done.stderr.strip().splitlines()
    assert f"127.0.0.1:{port}" in line and "within 2 s" in line and "BLTOOL_RDZV_TIMEOUT" in line, line
    assert ("1/2 clients joined" if rank == 0 else "timed out") in line, line


def test_a_port_in_use_ends_in_one_line_naming_the_endpoint(setting, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = _alone(setting, tmp_path, 0, port)
    assert done.returncode == 1 and done.stdout == ""
    (line,) = done.stderr.strip().splitlines()
    assert f"127.0.0.1:{port}" in line and "address already in use" in line, line


def test_a_bad_rendezvous_timeout_is_refused(setting, tmp_path):
    env = _env(RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               BLTOOL_RDZV_TIMEOUT="soon")
    done = subprocess.run([sys.executable, "-m", "bltool", *_distill_args(setting, tmp_path / "bad")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2 and "BLTOOL_RDZV_TIMEOUT must be a positive number" in done.stderr, done.stderr
