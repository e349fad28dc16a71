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

Every iteration of the three runs is recorded (`IterationRecorder`): what it processed (prefill
tokens, decoding sequences, KV tokens held) and how long it took; `iteration.fit` turns the records into
b(p, d, k), the iteration time as a function of the batch, which capacity and its simulator use.

Timestamps are taken by transformers on the host after each iteration's outputs reach it (the loop runs
in synchronous mode), so on CUDA they follow the device's work.
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from dataclasses import dataclass

import numpy as np

from bltool.errors import BltoolError
from bltool.serve.iteration import fit

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


class IterationRecorder:
    """What each batch iteration processed, read off the one forward the server runs per iteration (a
    forward pre-hook and hook on the model, public PyTorch API): start and end of the forward, prefill
    tokens and decoding sequences (from the packed batch's per-request query lengths, `cu_seq_lens_q`:
    a request with one query token is decoding), and the KV tokens the batch holds after it (each
    request's last position + 1). The iteration's time is from its forward's start to the next one's
    (scheduling, forward, sampling and bookkeeping); the last iteration of a run has none. On CUDA reading
    the lengths synchronises once per iteration, which the synchronous loop does anyway."""

    def __init__(self, batch=None):
        # `batch()`: the scheduled requests of the iteration about to run (transformers' FutureRequestStates),
        # when the server exposes them; a request that has generated nothing yet is prefilling, even a
        # one-token remainder of a split prompt, which the query lengths alone would count as decoding
        self.batch = batch
        self.exact = batch is not None
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.prefill: list[int] = []
        self.decode: list[int] = []
        self.kv: list[int] = []

    def before(self, module, args, kwargs):
        self.starts.append(time.perf_counter())
        ids = kwargs.get("input_ids", args[0] if args else None)
        cu, positions = kwargs.get("cu_seq_lens_q"), kwargs.get("position_ids")
        if cu is None or positions is None:  # a decode-only fast path: one token per sequence
            n = int(ids.shape[0]) if ids is not None and ids.dim() > 1 and ids.shape[-1] == 1 else int(ids.numel())
            self.prefill.append(0)
            self.decode.append(n)
            self.kv.append(int(positions.max()) + n if positions is not None else 0)
            return
        bounds = cu.tolist()
        lengths = [b - a for a, b in zip(bounds, bounds[1:])]
        last = positions.reshape(-1)[[b - 1 for b in bounds[1:]]].tolist() if lengths else []
        self.kv.append(int(sum(last)) + len(last))
        scheduled = self._scheduled(len(lengths))
        if scheduled is not None:
            self.prefill.append(sum(n for n, prefilling in zip(lengths, scheduled) if prefilling))
            self.decode.append(sum(1 for prefilling in scheduled if not prefilling))
        else:
            self.prefill.append(sum(n for n in lengths if n > 1))
            self.decode.append(sum(1 for n in lengths if n == 1))

    def _scheduled(self, n: int) -> list[bool] | None:
        """Per scheduled request, in batch order: is it prefilling? None when the server does not say."""
        if self.batch is not None:
            try:
                futures = self.batch()
                if futures is not None and len(futures) == n:
                    return [f.state.generated_len() == 0 for f in futures]
            except (AttributeError, TypeError):
                pass
        self.exact = False
        return None

    def after(self, module, args, kwargs, output):
        self.ends.append(time.perf_counter())

    def records(self, origin: float = 0.0) -> list[dict]:
        rows = []
        for k, start in enumerate(self.starts):
            rows.append({"start_s": start - origin,
                         "seconds": self.starts[k + 1] - start if k + 1 < len(self.starts) else None,
                         "forward_s": self.ends[k] - start if k < len(self.ends) else None,
                         "prefill_tokens": self.prefill[k], "decode_seqs": self.decode[k], "kv_tokens": self.kv[k]})
        return rows


@dataclass(frozen=True)
class ServedRun:
    outputs: list[RunOutput]  # one per request, in submission order
    arrivals: list[float]  # when each request was submitted (perf_counter seconds)
    cache_tokens: int  # the KV cache as transformers allocated it: whole pages, rounded up to its sectors
    iterations: list[dict]  # IterationRecorder.records, start times on the perf_counter clock
    exact: bool = True  # prefill and decode told apart by the scheduler's records, not by query lengths


def serve(model, prompts: list[list[int]], max_new_tokens: list[int] | int, *, kv_tokens: int,
          max_batch_tokens: int, max_requests: int, page_size: int,
          arrival_s: list[float] | None = None) -> ServedRun:
    """Serve `prompts` with transformers' continuous batching, each generating exactly its
    `max_new_tokens` (no EOS). Without `arrival_s` every request is submitted at once; with it, request
    i is submitted `arrival_s[i]` seconds after the server has started (open-loop arrivals, from a
    thread, while this one collects results)."""
    from transformers.generation import ContinuousBatchingConfig, GenerationConfig

    lengths = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    generation = GenerationConfig(max_new_tokens=max(lengths), do_sample=False, eos_token_id=-1, pad_token_id=0)
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
    current: dict = {}

    def scheduled():
        processor = getattr(current.get("manager"), "batch_processor", None)
        return processor.inputs_and_outputs.requests_in_batch

    recorder = IterationRecorder(scheduled)
    hooks = [model.register_forward_pre_hook(recorder.before, with_kwargs=True),
             model.register_forward_hook(recorder.after, with_kwargs=True)]
    ids = [f"r{i}" for i in range(len(prompts))]
    submitted = [0.0] * len(prompts)
    results = {}
    failure: list[BaseException] = []
    try:
        with model.continuous_batching_context_manager(generation_config=generation,
                                                       continuous_batching_config=batching, block=True) as manager:
            recorder.__init__(scheduled)  # the warm-up's forwards are not the run's
            current["manager"] = manager

            def submit(i):
                submitted[i] = time.perf_counter()
                manager.add_request(prompts[i], request_id=ids[i], max_new_tokens=lengths[i],
                                    record_timestamps=True)

            if arrival_s is None:
                for i in range(len(prompts)):
                    submit(i)
            else:
                origin = time.perf_counter()

                def feed():
                    try:
                        for i, at in enumerate(arrival_s):
                            delay = origin + at - time.perf_counter()
                            if delay > 0:
                                time.sleep(delay)
                            submit(i)
                    except BaseException as err:  # surfaced by the collecting loop below
                        failure.append(err)

                feeder = threading.Thread(target=feed, daemon=True)
                feeder.start()
            while len(results) < len(ids):
                if failure:
                    raise BltoolError(f"submitting requests failed: {failure[0]}")
                result = manager.get_result(timeout=1)
                if result is None:
                    if not manager.is_running():
                        raise BltoolError("continuous batching stopped before every request finished")
                    continue
                if result.error is not None:
                    raise BltoolError(f"continuous batching failed: {result.error}")
                if result.is_finished():
                    results[result.request_id] = result
            processor = getattr(manager, "batch_processor", None)
            cache = getattr(processor, "cache", None)
            cache_tokens = int(cache.num_blocks * page_size) if cache is not None else kv_tokens
    finally:
        for hook in hooks:
            hook.remove()
    outputs = []
    for rid, wanted in zip(ids, lengths):
        r = results[rid]
        if len(r.generated_tokens) != wanted or not r.timestamps:
            raise BltoolError(f"request {rid} generated {len(r.generated_tokens)} tokens, expected {wanted}")
        outputs.append(RunOutput(float(r.lifespan[0]), float(r.lifespan[1]), tuple(r.timestamps),
                                 preempted=len(r.timestamps) < wanted))
    return ServedRun(outputs, submitted, cache_tokens, recorder.records(), recorder.exact)


class TransformersServer:
    """transformers' continuous batching on a loaded model (`serve`): a `bltool.serve.engines.Server`, as
    `bltool.serve.vllm_serving.VllmServer` is on a vLLM engine."""

    engine_name = "transformers"
    # transformers' FIFOScheduler: below SAFETY_MARGIN of free pages only running requests are scheduled
    scheduler = {"type": "fifo", "safety_margin": SAFETY_MARGIN}

    def __init__(self, model):
        self.model = model

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    @property
    def config(self):
        return self.model.config

    def close(self) -> None:
        self.model = None

    def describe(self) -> dict:
        import transformers

        return {"engine": "transformers", "transformers": transformers.__version__}

    def serve(self, prompts: list[list[int]], max_new_tokens: list[int] | int, *, kv_tokens: int,
              max_batch_tokens: int, max_requests: int, page_size: int,
              arrival_s: list[float] | None = None) -> ServedRun:
        return serve(self.model, prompts, max_new_tokens, kv_tokens=kv_tokens, max_batch_tokens=max_batch_tokens,
                     max_requests=max_requests, page_size=page_size, arrival_s=arrival_s)


def kv_tokens_needed(settings: ServingSettings) -> int:
    """The largest KV cache `measure` asks for: its decode-only run's (every sequence decodes long enough for
    the last prefill to finish first). A server whose cache is fixed when it is made (vLLM) is made with this."""
    st = settings
    return st.concurrency * _pages(st.prompt_len + _decode_run_tokens(st), st.page_size)


def _pages(tokens: int, page_size: int) -> int:  # the cache a request of `tokens` tokens occupies: whole pages
    return math.ceil(tokens / page_size) * page_size


def _decode_run_tokens(st: ServingSettings) -> int:
    return st.output_len + math.ceil(st.concurrency * st.prompt_len / st.chunk) + 1


def measure(server, settings: ServingSettings) -> dict:
    """b̄, P and D for the model `server` serves (a `TransformersServer` or a `VllmServer`) at `settings`;
    see the module doc."""
    st = settings
    vocab = server.vocab_size

    def pages(tokens: int) -> int:
        return _pages(tokens, st.page_size)

    peak = pages(st.prompt_len + st.output_len)
    budget = st.concurrency + st.chunk
    common = dict(max_batch_tokens=budget, max_requests=st.concurrency, page_size=st.page_size)

    def run_batch(prompts, max_new_tokens, kv_tokens):  # every prompt submitted at once
        return server.serve(prompts, max_new_tokens, kv_tokens=kv_tokens, **common)

    # warm-up: allocations, kernels and (on CUDA) graph capture happen here, untimed
    run_batch(_prompts(2, min(st.prompt_len, st.chunk), vocab, st.seed + 999), 4, 2 * peak)
    decode_new = _decode_run_tokens(st)
    gaps_all, repeats, records, exact = [], [], [], True
    for repeat in range(st.repeats):
        seed = st.seed + 1000 * repeat
        started = time.perf_counter()
        saturated = run_batch(_prompts(st.requests, st.prompt_len, vocab, seed), st.output_len, st.concurrency * peak)
        outputs, cache_tokens = saturated.outputs, saturated.cache_tokens
        w0, w1 = saturated_window(outputs, st.concurrency)
        gaps = iteration_gaps(outputs, w0, w1)
        if w1 <= w0 or not gaps:
            raise BltoolError(
                f"the run never saturated (--requests {st.requests} for --concurrency {st.concurrency}); "
                "give more requests"
            )
        completed = sum(1 for out in outputs if w0 < out.end <= w1)
        prefill_prompts = _prompts(min(st.requests, 2 * st.concurrency), st.prompt_len, vocab, seed + 1)
        prefill = run_batch(prefill_prompts, 1, st.concurrency * peak)
        pre = prefill.outputs
        prefill_s = max(o.end for o in pre) - min(o.start for o in pre)
        decode = run_batch(_prompts(st.concurrency, st.prompt_len, vocab, seed + 2), decode_new,
                           st.concurrency * pages(st.prompt_len + decode_new))
        dec = decode.outputs
        for name, served in (("saturated", saturated), ("prefill", prefill), ("decode", decode)):
            records += [{"repeat": repeat, "run": name, **r} for r in served.iterations]
            exact &= served.exact
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
    timed = [r for r in records if r["seconds"] is not None]
    model_fit = fit([r["prefill_tokens"] for r in timed], [r["decode_seqs"] for r in timed],
                    [r["seconds"] for r in timed], [r["kv_tokens"] for r in timed])
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
        "scheduler": server.scheduler,
        "decode_run_output_len": decode_new,
        # b(prefill tokens, decode sequences, KV tokens), fitted to every timed iteration of the three runs
        "iteration_model": model_fit.as_dict(),
        "iteration_records_exact": exact,  # False: prefill and decode told apart by query lengths only
        "repeats": repeats,
        "iterations": records,
    }

