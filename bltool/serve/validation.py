"""Measured against predicted: the capacity formula, the simulator and the real server, side by side.

`capacity --validate` with a `bench-serving` artifact serves the workload on the engine bench-serving
measured (transformers' continuous batching, or vLLM), on the same model, with the same server settings
(KV cache, page size, token budget, sequence cap, scheduler margin), at several offered loads around the
formula's maximum stable rate. Requests arrive open-loop as a Poisson process; their (prompt, output)
lengths are drawn from the workload's rows. The same arrivals and lengths are replayed in the simulator
(`simulator.replay`, driven by the iteration-time fit b(p, d, k) bench-serving made), so measured and
simulated runs differ only in what the simulator leaves out (for vLLM, also in how its scheduler
differs from transformers' FIFO one, which the simulator follows).

Throughput is measured in the steady window (from the arrival of request ⌊n/4⌋ to the arrival of the
last request: the offered rate is steady inside it, and above capacity the queue never empties); the
knee is the largest throughput over the loads (at overload, the server's capacity). Latency is end to
end (arrival to last token) and to first token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bltool.serve.iteration import IterationModel
from bltool.serve.simulator import ServerRun, ServerSpec, replay
from bltool.serve.workload import Workload

LIVE_LOADS = (0.5, 0.8, 1.0, 1.25, 1.6)  # offered rate as a multiple of the formula's maximum stable rate


@dataclass(frozen=True)
class OfferedLoad:
    """One load's requests: arrival times (s, first at 0), prompt and output lengths."""

    rate: float
    arrival_s: np.ndarray
    prompt: np.ndarray
    output: np.ndarray


def offered_loads(workload: Workload, rates: list[float], requests: int, seed: int) -> list[OfferedLoad]:
    """Poisson arrivals at each rate, with common random numbers: one draw of unit-rate gaps and of
    workload rows, scaled by each rate, so the loads differ only in how fast the same requests come."""
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0, size=requests)
    gaps[0] = 0.0
    unit = np.cumsum(gaps)
    rows = rng.integers(0, len(workload), size=requests)
    return [OfferedLoad(rate, unit / rate, workload.prompt[rows], workload.output[rows]) for rate in rates]


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


def measure_load(server, load: OfferedLoad, spec: ServerSpec, seed: int) -> tuple[ServerRun, float | None]:
    """Serve one load on the real server (`serving.TransformersServer` or `vllm_serving.VllmServer`): the
    run in the simulator's record form (times from the first submission, one preemption counted for each
    request that was evicted and recomputed), and how far b(p, d, k) is from the iterations it timed
    (`fit_error`)."""
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
    )
    return served, fit_error(its, spec.iteration)


def fit_error(records: list[dict], iteration: IterationModel) -> float | None:
    """Mean |measured − b(p, d, k)| / measured over the busy iterations of a measured run: those the server
    went straight on from (the gap from the end of the forward to the next start is at most 5 × its
    median; longer gaps are the server waiting for an arrival)."""
    timed = [r for r in records if r["seconds"] is not None and r["forward_s"] is not None]
    if len(timed) < 3:
        return None
    gaps = np.array([r["seconds"] - r["forward_s"] for r in timed])
    busy = [r for r, gap in zip(timed, gaps) if gap <= 5 * max(float(np.median(gaps)), 1e-6)]
    measured = np.array([r["seconds"] for r in busy])
    predicted = iteration.seconds(np.array([r["prefill_tokens"] for r in busy]),
                                  np.array([r["decode_seqs"] for r in busy]), np.array([r["kv_tokens"] for r in busy]))
    return float(np.mean(np.abs(measured - predicted) / measured))


def warm_up(server, spec: ServerSpec) -> None:
    """One short untimed run: first-call allocations and kernel choices happen here."""
    server.serve(_random_prompts(np.array([8, 8]), server.vocab_size, 0), 4, kv_tokens=spec.kv_tokens,
                 max_batch_tokens=spec.max_batch_tokens, max_requests=spec.max_seqs, page_size=spec.page_size)


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
