"""Data-parallel runs under `torchrun` (PyTorch DDP): process-group set-up and the few collectives the
training loop needs. A plain `bltool distill` is a world of one and never touches torch.distributed.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; the backend is NCCL on CUDA and gloo on CPU. Joining the group
waits at most $BLTOOL_RDZV_TIMEOUT seconds (default 600) for the other processes at MASTER_ADDR:MASTER_PORT,
then fails in one line naming that endpoint (a node that never comes, a port in use).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from bltool import ui
from bltool.errors import BltoolError, UsageError

RDZV_TIMEOUT_ENV = "BLTOOL_RDZV_TIMEOUT"
RDZV_TIMEOUT_DEFAULT = 600.0  # seconds, as torchrun's own join_timeout
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int
    device: str

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def setup(device_flag: str) -> World:
    """Join the process group torchrun made (if any) and choose this process's device."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = env_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and device_flag in ("auto", "cuda") or device_flag.startswith("cuda")
    if device_flag.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device_flag}: CUDA is not available on this machine")
    if device_flag not in ("auto", "cpu") and not device_flag.startswith("cuda"):
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, got {device_flag!r}")
    if size > 1 and cuda and device_flag.startswith("cuda:"):
        raise UsageError("--device cuda:N cannot be used under torchrun; each process uses cuda:LOCAL_RANK")
    if cuda:
        device = device_flag if device_flag.startswith("cuda:") else f"cuda:{local}"
        torch.cuda.set_device(device)
    else:
        device = "cpu"
    if size > 1 and not dist.is_initialized():
        join("nccl" if cuda else "gloo", rank, size)
    return World(rank, size, local, device)


def rendezvous_timeout() -> float:
    """Seconds to wait for the other processes to join: $BLTOOL_RDZV_TIMEOUT, default 600."""
    text = os.environ.get(RDZV_TIMEOUT_ENV, "")
    if not text:
        return RDZV_TIMEOUT_DEFAULT
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise UsageError(f"{RDZV_TIMEOUT_ENV} must be a positive number of seconds, got {text!r}")
    return seconds


def join(backend: str, rank: int, size: int) -> None:
    """Join the default process group through the store at MASTER_ADDR:MASTER_PORT, waiting at most
    rendezvous_timeout() for the others; any failure to meet them is one line naming the endpoint."""
    seconds = rendezvous_timeout()
    endpoint = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    try:
        with _quiet_stderr():
            store, rank, size = next(dist.rendezvous("env://", rank, size,
                                                     timeout=datetime.timedelta(seconds=seconds)))
        store.set_timeout(COLLECTIVE_TIMEOUT)  # met: from here on, as torch's own env:// set-up does
        dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=COLLECTIVE_TIMEOUT)
    except (RuntimeError, ValueError) as err:  # torch's DistStoreError, DistNetworkError, a missing variable
        reason = " ".join(str(err).split())
        if len(reason) > 200:
            reason = reason[:200] + "…"
        raise BltoolError(f"rank {rank} of {size} could not join the process group at {endpoint} within "
                          f"{seconds:g} s (set {RDZV_TIMEOUT_ENV} to wait longer): {reason}") from None


@contextlib.contextmanager
def _quiet_stderr():
    """torch's store logs every failed try to connect, with a C++ stack, to the process's stderr (fd 2): the
    failure is reported in one line instead."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def run_ranked(device_flag: str, body):
    """`body(world)` in this process's world (a torchrun rank, or a single process), with the console
    quiet off rank 0 and the process group torn down after, whatever happens."""
    world = setup(device_flag)
    if not world.main:
        ui.console.quiet = True
    try:
        return body(world)
    finally:
        teardown(world)


def teardown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def any_true(world: World, flag: bool) -> bool:
    """True on every rank if `flag` is true on any rank (used to stop all ranks at the same step)."""
    if not world.distributed:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=world.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def sum_ints(world: World, values: list[int]) -> list[int]:
    """The sum over ranks of each value, in one collective."""
    if not world.distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.int64, device=world.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def mean_floats(world: World, values: list[float]) -> list[float]:
    """The mean over ranks of each value, in one collective."""
    if not world.distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=world.device)
    dist.all_reduce(tensor)
    return (tensor / world.size).tolist()


def sum_tensor(world: World, tensor: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of `tensor` (on this rank's device), in one collective and without a host sync."""
    if world.distributed:
        dist.all_reduce(tensor)
    return tensor


def gather_tensors(world: World, tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's `tensor` (same shape and dtype on all ranks), in rank order, on the CPU."""
    if not world.distributed:
        return [tensor.cpu()]
    local = tensor.to(world.device)
    out = [torch.empty_like(local) for _ in range(world.size)]
    dist.all_gather(out, local)
    return [t.cpu() for t in out]


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()
