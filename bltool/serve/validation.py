"""Measured against predicted: the capacity formula, the simulator and the real server, side by side.

`capacity --validate` with a `bench-serving` artifact serves the workload on the engine bench-serving
measured (transformers' continuous batching, or vLLM), on the same model, with the same server settings
(page size, token budget, sequence cap, scheduler margin) but a smaller KV cache (`memory_bound_cache`):
bench-serving sizes its cache for `concurrency` requests at their peak, so there the sequence cap binds
before memory does, and the check exists for the memory regime. It serves at several offered loads around
the formula's maximum stable rate. Requests arrive open-loop as a Poisson process; their (prompt, output)
lengths are drawn from the workload's rows, stratified by lifetime memory so that a few hundred requests
hold the workload's E[g]. The same arrivals and lengths are replayed in the simulator
(`simulator.replay`, driven by the iteration-time fit b(p, d, k) bench-serving made), so measured and
simulated runs differ only in what the simulator leaves out (for vLLM, also in how its scheduler
differs from transformers' FIFO one, which the simulator follows, with vLLM's watermark of free pages, 0
by default, as the margin).

Throughput is measured in the steady window (from the arrival of request ⌊n/4⌋ to the arrival of the
last request: the offered rate is steady inside it, and above capacity the queue never empties); the
knee is the largest throughput over the loads (at overload, the server's capacity). Latency is end to
end (arrival to last token) and to first token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from bltool.serve.iteration import IterationModel
from bltool.serve.queueing import iterations, lifetime_memory
from bltool.serve.simulator import ServerRun, ServerSpec, replay
from bltool.serve.workload import Workload

LIVE_LOADS = (0.5, 0.8, 1.0, 1.25, 1.6)  # offered rate as a multiple of the formula's maximum stable rate
REPEATED_LOAD = LIVE_LOADS[-1]  # served twice: the spread of its throughput is the run's own noise
RESIDENTS = 0.5  # the check's cache holds this share of the sequence cap in resident requests, on average


@dataclass(frozen=True)
class OfferedLoad:
    """One load's requests: arrival times (s, first at 0), prompt and output lengths."""

    rate: float
    arrival_s: np.ndarray
    prompt: np.ndarray
    output: np.ndarray


def offered_loads(workload: Workload, rates: list[float], requests: int, seed: int,
                  strata: np.ndarray | None = None) -> list[OfferedLoad]:
    """Poisson arrivals at each rate, with common random numbers: one draw of unit-rate gaps and of
    workload rows, scaled by each rate, so the loads differ only in how fast the same requests come.

    Rows are drawn with replacement; with `strata` (a value per row, e.g. its lifetime memory g) they are
    drawn stratified instead: the rows sorted by it, cut into `requests` strata of equal size, one row
    drawn from each, in random order. A few hundred requests from a heavy-tailed workload then hold its
    E[g] to a few percent (96 requests of docs/capacity.md's trace: ±7%; drawn independently, ±20%),
    so the formula on the workload's own E[g] can be set beside the measured knee."""
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0, size=requests)
    gaps[0] = 0.0
    unit = np.cumsum(gaps)
    if strata is None:
        rows = rng.integers(0, len(workload), size=requests)
    else:
        order = np.argsort(np.asarray(strata), kind="stable")
        edges = np.arange(requests + 1) * len(workload) / requests
        rows = order[np.minimum(np.floor(edges[:-1] + rng.random(requests) * (edges[1:] - edges[:-1])).astype(np.int64),
                                len(workload) - 1)]
        rows = rows[rng.permutation(requests)]
    return [OfferedLoad(rate, unit / rate, workload.prompt[rows], workload.output[rows]) for rate in rates]


def memory_bound_cache(spec: ServerSpec, prompt: np.ndarray, output: np.ndarray) -> int:
    """The KV cache (tokens, whole pages) the check serves with: one in which memory, not the sequence cap,
    binds. By the formula the cache holds `n_M = M · E[iterations] / E[g]` resident requests on average (g
    in whole pages); this is the cache for `RESIDENTS · max_seqs` of them, at least the pages of the
    largest request (it must fit alone) and at most the cache bench-serving measured with."""
    chunk, page = spec.max_batch_tokens - spec.max_seqs, spec.page_size
    held = float(lifetime_memory(prompt, output, chunk, page).mean()) / float(iterations(prompt, output, chunk).mean())
    pages = math.ceil(RESIDENTS * spec.max_seqs * held / page)
    largest = int((-(-(prompt + output) // page)).max())
    return min(spec.pages, max(pages, largest)) * page


def server_spec(measured: dict) -> ServerSpec:
    """The server bench-serving measured, as the simulator models it: its cache as transformers
    allocated it, its page size, token budget, sequence cap, safety margin and iteration-time fit."""
    settings = measured["settings"]
    iteration = (IterationModel.from_dict(measured["iteration_model"]) if "iteration_model" in measured
                 else IterationModel.constant(measured["iteration_s"]))
    return ServerSpec(kv_tokens=int(measured["kv_cache_tokens"]), page_size=int(settings["page_size"]),
                      max_batch_tokens=int(measured["max_batch_tokens"]), max_seqs=int(settings["concurrency"]),
                      safety_margin=float(measured["scheduler"]["safety_margin"]), iteration=iteration)


def _random_prompts(lengths: np.ndarray, vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=int(n)).tolist() for n in lengths]


def measure_load(server, load: OfferedLoad, spec: ServerSpec, seed: int) -> tuple[ServerRun, list[dict]]:
    """Serve one load on the real server (`serving.TransformersServer` or `vllm_serving.VllmServer`): the
    run in the simulator's record form (times from the first submission, one preemption counted for each
    request that was evicted and recomputed, KV use against the cache `spec` gives), and the records of
    the iterations it timed, on the same clock (for `fit_error` and `speed_factor`)."""
    prompts = _random_prompts(load.prompt, server.vocab_size, seed)
    run = server.serve(prompts, [int(o) for o in load.output], kv_tokens=spec.kv_tokens,
                       max_batch_tokens=spec.max_batch_tokens, max_requests=spec.max_seqs, page_size=spec.page_size,
                       arrival_s=[float(a) for a in load.arrival_s])
    origin = min(run.arrivals)
    its = run.iterations
    served = ServerRun.from_records(
        arrival=np.array(run.arrivals) - origin,
        first_token=np.array([o.timestamps[0] for o in run.outputs]) - origin,
        finish=np.array([o.end for o in run.outputs]) - origin,
        preemptions=np.array([int(o.preempted) for o in run.outputs]),
        iteration_start=np.array([r["start_s"] for r in its]) - origin,
        iteration_seconds=np.array([r["seconds"] if r["seconds"] is not None else np.nan for r in its]),
        prefill_tokens=np.array([r["prefill_tokens"] for r in its]),
        decode_seqs=np.array([r["decode_seqs"] for r in its]),
        kv_tokens=np.array([r["kv_tokens"] for r in its]),
        kv_capacity=spec.kv_tokens,
    )
    return served, [{**r, "start_s": r["start_s"] - origin} for r in its]


def busy_iterations(records: list[dict]) -> list[dict]:
    """The iterations of a measured run the server went straight on from (the gap from the end of the
    forward to the next start is at most 5 × its median; longer gaps are the server waiting for an
    arrival, not working)."""
    timed = [r for r in records if r["seconds"] is not None and r["forward_s"] is not None]
    if len(timed) < 3:
        return []
    gaps = np.array([r["seconds"] - r["forward_s"] for r in timed])
    return [r for r, gap in zip(timed, gaps) if gap <= 5 * max(float(np.median(gaps)), 1e-6)]


def speed_factor(records: list[dict], run: ServerRun, iteration: IterationModel) -> float | None:
    """How much slower (> 1) or faster the server ran in this measured run than b(p, d, k) says: the
    seconds of the iterations it worked through, over what b(p, d, k) gives for them. An iteration is
    worked through when a request that had arrived by the end of its forward was still unfinished when the
    next one started (the server had work, so the whole time to the next start counts, stalls of a busy
    machine included); otherwise the server waited for an arrival. `records` on the run's clock
    (`measure_load`'s); None without such iterations."""
    arrival, finish = np.sort(run.arrival), np.sort(run.finish)
    worked = []
    for r in records:
        if r["seconds"] is None or r["forward_s"] is None:
            continue
        arrived = np.searchsorted(arrival, r["start_s"] + r["forward_s"], side="right")
        finished = np.searchsorted(finish, r["start_s"] + r["seconds"], side="right")
        if arrived > finished:
            worked.append(r)
    if not worked:
        return None
    predicted = iteration.seconds(np.array([r["prefill_tokens"] for r in worked]),
                                  np.array([r["decode_seqs"] for r in worked]),
                                  np.array([r["kv_tokens"] for r in worked]))
    return float(sum(r["seconds"] for r in worked) / np.sum(predicted))


def fit_error(records: list[dict], iteration: IterationModel) -> float | None:
    """Mean |measured − b(p, d, k)| / measured over the busy iterations of a measured run
    (`busy_iterations`)."""
    busy = busy_iterations(records)
    if not busy:
        return None
    measured = np.array([r["seconds"] for r in busy])
    predicted = iteration.seconds(np.array([r["prefill_tokens"] for r in busy]),
                                  np.array([r["decode_seqs"] for r in busy]), np.array([r["kv_tokens"] for r in busy]))
    return float(np.mean(np.abs(measured - predicted) / measured))


def warm_up(server, spec: ServerSpec) -> int:
    """One short untimed run: first-call allocations and kernel choices happen here. Returns the KV cache
    (tokens) the engine allocated for `spec.kv_tokens` (transformers rounds it up to whole sectors)."""
    run = server.serve(_random_prompts(np.array([8, 8]), server.vocab_size, 0), 4, kv_tokens=spec.kv_tokens,
                       max_batch_tokens=spec.max_batch_tokens, max_requests=spec.max_seqs, page_size=spec.page_size)
    return int(run.cache_tokens)


def simulate_load(load: OfferedLoad, spec: ServerSpec) -> ServerRun:
    return replay(load.arrival_s, load.prompt, load.output, spec)


def row(kind: str, load: OfferedLoad, multiple: float, run: ServerRun) -> dict:
    """One load's figures for the table and validation.arrow: throughput in the steady window, latency
    percentiles, preemptions (a measured run counts preempted requests, the simulator every preemption)."""
    summary = run.summary()
    start, end = summary.pop("steady_window_s")
    summary["window_offered_rate"] = summary.pop("offered_rate")  # arrivals per second inside the window
    return {"source": kind, "load": multiple, "offered_rate": load.rate, "window_start_s": start,
            "window_end_s": end, **summary}


def knee(rows: list[dict]) -> float:
    """The largest steady throughput over the loads: at overload, the server's capacity."""
    return max(r["throughput"] for r in rows)
