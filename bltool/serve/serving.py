"""Serving measurements behind `bench-serving`: batch-iteration time at saturation, prefill and
decode throughput, measured with transformers' own continuous batching (paged KV cache, chunked
prefill, FIFO scheduling), which runs on CPU and CUDA alike.

What is measured, per repeat, after one untimed warm-up run:

1. Saturated run. `requests` prompts of `prompt_len` random tokens (no shared prefixes; prefix caching
   off), each generating exactly `output_len` tokens, all submitted at once to a KV cache sized to hold
   `concurrency` requests at their peak (`concurrency · (prompt_len + output_len)` tokens, rounded up to
   whole pages), with a token budget of `concurrency + chunk` per iteration: every decoding sequence plus
   a prefill chunk of up to `chunk` tokens. Memory, not the budget, limits the batch (the FIFO scheduler
   admits a new prompt only while `SAFETY_MARGIN` of the cache is free). The saturated
   window runs from the moment `concurrency` requests have produced their first token to the moment
   the last request is admitted (the queue is never empty inside it). Every pair of consecutive output
   tokens of one request is exactly one batch iteration apart (schedule, forward over the decode tokens
   and the prefill chunk, sampling, bookkeeping); **b̄ is the median of those gaps inside the window**.
   Their mean and the window's completion rate are recorded beside it.
2. Prefill run. The same prompts with one output token each: P = prompt tokens / wall time from the
   first admission to the last completion (the first token comes out of the last prefill chunk).
3. Decode run. `concurrency` requests admitted together, generating long enough that, after the last
   prefill, every sequence decodes for about `output_len` iterations: D = tokens generated between the
   last request's first token and the first request's last token, divided by that time.

Timestamps are taken by transformers on the host after each iteration's outputs reach it (the loop runs
in synchronous mode), so on CUDA they follow the device's work.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

import numpy as np

from bltool.errors import BltoolError

# transformers' FIFO scheduler admits a new prompt only while this share of the cache is free (its own
# default, set here so that it is recorded): the headroom lets running sequences grow without preemption
SAFETY_MARGIN = 0.15


@dataclass(frozen=True)
class ServingSettings:
    chunk: int  # ŝ: prefill tokens per iteration beside the decode tokens
    concurrency: int  # sequences the KV cache holds at their peak; most sequences per iteration
    prompt_len: int  # tokens per prompt
    output_len: int  # tokens generated per request
    requests: int  # requests submitted in the saturated run
    page_size: int = 16  # KV cache page (block) size in tokens
    repeats: int = 1  # measurement repeats (b̄ pools the gaps of all repeats)
    seed: int = 0  # prompts are random token ids from this seed


@dataclass(frozen=True)
class RunOutput:
    """What one request left behind: admission, completion and one timestamp per generated token."""

    start: float
    end: float
    timestamps: tuple[float, ...]  # after a preemption, only the tokens generated since the restart
    preempted: bool = False  # the cache ran out, the request was evicted and recomputed


def saturated_window(outputs: list[RunOutput], concurrency: int) -> tuple[float, float]:
    """From the `concurrency`-th first token (the batch has filled) to the last admission (the queue
    empties); empty (end ≤ start) when the run never saturated."""
    first_tokens = sorted(out.timestamps[0] for out in outputs)
    start = first_tokens[min(concurrency, len(first_tokens)) - 1]
    return start, max(out.start for out in outputs)


def iteration_gaps(outputs: list[RunOutput], start: float, end: float) -> list[float]:
    """Times between consecutive output tokens of one request, both inside [start, end]: each is the
    duration of one batch iteration."""
    return [b - a for out in outputs for a, b in zip(out.timestamps, out.timestamps[1:]) if a >= start and b <= end]


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab, size=(n, length)).tolist()


def run_batch(model, prompts: list[list[int]], max_new_tokens: int, *, kv_tokens: int, max_batch_tokens: int,
              max_requests: int, page_size: int) -> tuple[list[RunOutput], int]:
    """Serve `prompts` with continuous batching; return each request's times and the KV cache's size
    in tokens as transformers allocated it (whole pages, rounded up to its memory sectors)."""
    from transformers.generation import ContinuousBatchingConfig, GenerationConfig

    generation = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=-1,
                                  pad_token_id=0)
    batching = ContinuousBatchingConfig(
        page_size=page_size,
        num_blocks=math.ceil(kv_tokens / page_size),
        max_batch_tokens=max_batch_tokens,
        max_requests_per_batch=max_requests,
        allow_block_sharing=False,  # random prompts share no prefix; keep the cache accounting plain
        scheduler_type="fifo",
        safety_margin=SAFETY_MARGIN,
        use_async_batching=False,  # timestamps then follow the device's work
    )
    results = {}
    with model.continuous_batching_context_manager(generation_config=generation,
                                                   continuous_batching_config=batching, block=True) as manager:
        processor = getattr(manager, "batch_processor", None)
        ids = manager.add_requests(inputs=prompts, max_new_tokens=max_new_tokens, record_timestamps=True)
        while len(results) < len(ids):
            result = manager.get_result(timeout=1)
            if result is None:
                if not manager.is_running():
                    raise BltoolError("continuous batching stopped before every request finished")
                continue
            if result.error is not None:
                raise BltoolError(f"continuous batching failed: {result.error}")
            if result.is_finished():
                results[result.request_id] = result
        processor = processor or getattr(manager, "batch_processor", None)
        cache = getattr(processor, "cache", None)
        cache_tokens = int(cache.num_blocks * page_size) if cache is not None else kv_tokens
    outputs = []
    for rid in ids:
        r = results[rid]
        if len(r.generated_tokens) != max_new_tokens or not r.timestamps:
            raise BltoolError(f"request {rid} generated {len(r.generated_tokens)} tokens, expected {max_new_tokens}")
        outputs.append(RunOutput(float(r.lifespan[0]), float(r.lifespan[1]), tuple(r.timestamps),
                                 preempted=len(r.timestamps) < max_new_tokens))
    return outputs, cache_tokens


def measure(model, settings: ServingSettings) -> dict:
    """b̄, P and D for `model` (already on its device, in eval mode) at `settings`; see the module doc."""
    st = settings
    vocab = int(model.config.vocab_size)

    def pages(tokens: int) -> int:  # cache a request of `tokens` tokens occupies: whole pages
        return math.ceil(tokens / st.page_size) * st.page_size

    peak = pages(st.prompt_len + st.output_len)
    budget = st.concurrency + st.chunk
    common = dict(max_batch_tokens=budget, max_requests=st.concurrency, page_size=st.page_size)
    # warm-up: allocations, kernels and (on CUDA) graph capture happen here, untimed
    run_batch(model, _prompts(2, min(st.prompt_len, st.chunk), vocab, st.seed + 999), 4,
              kv_tokens=2 * peak, **common)
    decode_new = st.output_len + math.ceil(st.concurrency * st.prompt_len / st.chunk) + 1
    gaps_all, repeats = [], []
    for repeat in range(st.repeats):
        seed = st.seed + 1000 * repeat
        started = time.perf_counter()
        outputs, cache_tokens = run_batch(model, _prompts(st.requests, st.prompt_len, vocab, seed), st.output_len,
                                          kv_tokens=st.concurrency * peak, **common)
        w0, w1 = saturated_window(outputs, st.concurrency)
        gaps = iteration_gaps(outputs, w0, w1)
        if w1 <= w0 or not gaps:
            raise BltoolError(
                f"the run never saturated (--requests {st.requests} for --concurrency {st.concurrency}); "
                "give more requests"
            )
        completed = sum(1 for out in outputs if w0 < out.end <= w1)
        prefill_prompts = _prompts(min(st.requests, 2 * st.concurrency), st.prompt_len, vocab, seed + 1)
        pre, _ = run_batch(model, prefill_prompts, 1, kv_tokens=st.concurrency * peak, **common)
        prefill_s = max(o.end for o in pre) - min(o.start for o in pre)
        dec, _ = run_batch(model, _prompts(st.concurrency, st.prompt_len, vocab, seed + 2), decode_new,
                           kv_tokens=st.concurrency * pages(st.prompt_len + decode_new), **common)
        d0, d1 = max(o.timestamps[0] for o in dec), min(o.timestamps[-1] for o in dec)
        decoded = sum(1 for o in dec for t in o.timestamps if d0 < t <= d1)
        if d1 <= d0 or decoded == 0:
            raise BltoolError("the decode run had no window in which every sequence was decoding")
        gaps_all += gaps
        repeats.append({
            "iteration_s_median": statistics.median(gaps),
            "iteration_s_mean": statistics.fmean(gaps),
            "iterations_measured": len(gaps),
            "window_s": w1 - w0,
            "completed_in_window": completed,
            "saturated_requests_per_s": completed / (w1 - w0),
            "prefill_tokens_per_s": len(pre) * st.prompt_len / prefill_s,
            "decode_tokens_per_s": decoded / (d1 - d0),
            "kv_cache_tokens": cache_tokens,
            "preempted": sum(o.preempted for o in outputs),
            "seconds": time.perf_counter() - started,
        })
    gaps_all.sort()
    return {
        "iteration_s": statistics.median(gaps_all),  # b̄
        "iteration_s_mean": statistics.fmean(gaps_all),
        "iteration_s_p10": gaps_all[len(gaps_all) // 10],
        "iteration_s_p90": gaps_all[(9 * len(gaps_all)) // 10],
        "iterations_measured": len(gaps_all),
        "prefill_tokens_per_s": statistics.median(r["prefill_tokens_per_s"] for r in repeats),  # P
        "decode_tokens_per_s": statistics.median(r["decode_tokens_per_s"] for r in repeats),  # D
        "saturated_requests_per_s": statistics.median(r["saturated_requests_per_s"] for r in repeats),
        "kv_cache_tokens": repeats[0]["kv_cache_tokens"],
        "max_batch_tokens": budget,
        "scheduler": {"type": "fifo", "safety_margin": SAFETY_MARGIN},
        "decode_run_output_len": decode_new,
        "repeats": repeats,
    }

