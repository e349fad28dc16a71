"""A discrete-event simulator of a continuous-batching server that does not know the future (`replay`,
`simulate_server`), to check capacity predictions. The oracle (`bltool.serve.oracle_simulator`) admits by
every output length in advance, so a capacity check built on it is the formula checking itself. This
simulator behaves instead like transformers' continuous-batching server (5.x, `FIFOScheduler` with
soft-reset offloading), so that it can be set beside a real run:

* Paged cache. The cache holds `kv_tokens // page_size` pages; a request holding t KV tokens occupies
  ⌈t / page_size⌉ of them, so a short request wastes part of its last page.
* Token budget. An iteration processes at most `max_batch_tokens` tokens (one per decoding request, a
  prompt chunk per prefilling one) for at most `max_seqs` requests, and lasts b(p, d, k) seconds of the
  `IterationModel`, with p prompt tokens and d decoding requests scheduled in it and k the KV tokens
  those requests hold once it has written theirs (what the batch attends over).
* FIFO scheduling. Candidates are the decoding requests (in admission order), then the requests part
  way through a split prefill, then the waiting queue (unless new requests are blocked). Each takes
  min(its tokens, the budget left) if the pages for them are free, else it is skipped (and, if active,
  marked starved). Below the safety margin (free pages / pages < `safety_margin` when scheduling
  starts) nothing but decoding requests is scheduled once one request is, so memory is kept for the
  running requests to grow into: admission is optimistic, by the pages a request needs now.
* Preemption. When requests starve, the newest starved ones are evicted (never the last active one)
  until the others' next tokens fit; each victim's cache is dropped and it is requeued at the back as a
  recompute: its prompt becomes its prompt plus the tokens it has generated, and it owes only the rest
  of its output. New requests are blocked from then until some request finishes.
* Tokens. A request's first output token comes at the end of the iteration that completes its prefill;
  each decode iteration feeds back the previous token and yields the next, so a request of o output
  tokens spends its prefill iterations and then o − 1 decode iterations in the batch, and holds
  s + o − 1 KV tokens at the end (its last token is never fed back): the count
  `oracle_simulator.simulate` and `queueing.iterations` / `queueing.lifetime_memory` use.

Throughput of a run is measured over its steady window: from the arrival of request ⌊n/4⌋ to the
arrival of the last one. Arrivals are open loop, so inside it the offered rate is steady; before it the
server is filling up from empty, and after the last arrival it drains with no new load (above capacity
the queue never empties inside the window, so the completions there are the server's capacity).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from bltool.serve.iteration import IterationModel


@dataclass(frozen=True, kw_only=True)
class ServerSpec:
    """A continuous-batching server as transformers' FIFO scheduler runs it (see the module docstring)."""

    kv_tokens: int  # KV cache size in tokens; the cache has kv_tokens // page_size pages
    page_size: int = 16  # tokens per page: a request holding t tokens occupies ⌈t / page_size⌉ pages
    max_batch_tokens: int  # tokens per iteration: one per decoding request plus the prefill chunks
    max_seqs: int  # requests scheduled per iteration (transformers' max_requests_per_batch)
    safety_margin: float = 0.15  # below this share of free pages, only decoding requests are added
    iteration: IterationModel  # b(p, d, k): an iteration's seconds

    def __post_init__(self):
        for name in ("kv_tokens", "page_size", "max_batch_tokens", "max_seqs"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ValueError(f"ServerSpec.{name} must be a positive integer, got {value!r}")
        if self.kv_tokens < self.page_size:
            raise ValueError(f"a KV cache of {self.kv_tokens} tokens holds no page of {self.page_size} tokens")
        if not 0.0 <= self.safety_margin <= 1.0:
            raise ValueError(f"ServerSpec.safety_margin must be in [0, 1], got {self.safety_margin!r}")
        model = self.iteration
        coefficients = (model.intercept_s, model.prefill_token_s, model.decode_seq_s)
        if not all(np.isfinite(c) and c >= 0 for c in coefficients):
            raise ValueError(f"iteration-time coefficients must be finite and non-negative, got {coefficients}")
        # every iteration schedules at least one prompt token or one decoding request: it must take time,
        # or the simulated clock could stand still
        if not (float(model.seconds(1, 0)) > 0 and float(model.seconds(0, 1)) > 0):
            raise ValueError("the iteration model gives an iteration zero seconds")

    @property
    def pages(self) -> int:
        return self.kv_tokens // self.page_size


def _empty(dtype=np.int64) -> np.ndarray:
    return np.zeros(0, dtype=dtype)


@dataclass(frozen=True)
class ServerRun:
    """One run of a continuous-batching server, simulated (`replay`) or measured (`from_records`): per
    request, then per iteration. Times in seconds on the run's clock (the arrivals' origin)."""

    arrival: np.ndarray
    first_token: np.ndarray  # end of the iteration that produced the request's first output token
    finish: np.ndarray  # end of the iteration that produced its last
    preemptions: np.ndarray  # times it was evicted and requeued for recompute
    iteration_start: np.ndarray
    iteration_seconds: np.ndarray
    prefill_tokens: np.ndarray  # prompt tokens scheduled in the iteration
    decode_seqs: np.ndarray  # decoding requests scheduled in it
    kv_tokens: np.ndarray  # KV tokens held during it: after its tokens are written, before finishes free theirs
    # the rest only a simulation knows (empty, or None, for a measured run)
    kv_pages: np.ndarray = field(default_factory=_empty)  # pages held at the same point
    queue: np.ndarray = field(default_factory=_empty)  # requests waiting during the iteration (requeued included)
    running: np.ndarray = field(default_factory=_empty)  # active requests during it
    generated: np.ndarray = field(default_factory=_empty)  # output tokens each request emitted, all tries together
    kv_capacity: int | None = None  # tokens the cache's pages hold (pages · page_size)

    @classmethod
    def from_records(cls, *, arrival, first_token, finish, preemptions, iteration_start, iteration_seconds,
                     prefill_tokens, decode_seqs, kv_tokens, kv_pages=(), queue=(), running=(), generated=(),
                     kv_capacity: int | None = None) -> ServerRun:
        """A run from per-request and per-iteration records (a measured run has no queue or page records)."""

        def ints(values):
            return np.asarray(values, dtype=np.int64)

        def floats(values):
            return np.asarray(values, dtype=np.float64)

        arrival, first_token, finish = floats(arrival), floats(first_token), floats(finish)
        if not len(arrival) == len(first_token) == len(finish) == len(preemptions):
            raise ValueError("per-request records differ in length")
        return cls(arrival=arrival, first_token=first_token, finish=finish, preemptions=ints(preemptions),
                   iteration_start=floats(iteration_start), iteration_seconds=floats(iteration_seconds),
                   prefill_tokens=ints(prefill_tokens), decode_seqs=ints(decode_seqs), kv_tokens=ints(kv_tokens),
                   kv_pages=ints(kv_pages), queue=ints(queue), running=ints(running), generated=ints(generated),
                   kv_capacity=kv_capacity)

    @property
    def requests(self) -> int:
        return len(self.arrival)

    @property
    def completed(self) -> int:
        return int(np.isfinite(self.finish).sum())

    @property
    def makespan_s(self) -> float:
        """First arrival to last finish."""
        return float(np.nanmax(self.finish) - self.arrival[0])

    def steady_window(self) -> tuple[float, float]:
        """From the arrival of request ⌊n/4⌋ to the arrival of the last (module docstring). Requests all
        submitted at once have no such window; then the whole run, first arrival to last finish."""
        start, end = float(self.arrival[self.requests // 4]), float(self.arrival[-1])
        if end <= start:
            start, end = float(self.arrival[0]), float(np.nanmax(self.finish))
        return start, end

    def _window(self, start: float | None, end: float | None) -> tuple[float, float]:
        default = self.steady_window()
        start = default[0] if start is None else float(start)
        end = default[1] if end is None else float(end)
        if not end > start:
            raise ValueError(f"an empty window ({start}, {end}]")
        return start, end

    def throughput(self, start: float | None = None, end: float | None = None) -> float:
        """Requests finishing in (start, end] per second; by default over the steady window."""
        start, end = self._window(start, end)
        return int(((self.finish > start) & (self.finish <= end)).sum()) / (end - start)

    def offered_rate(self, start: float | None = None, end: float | None = None) -> float:
        """Requests arriving in (start, end] per second: what `throughput` keeps up with below capacity."""
        start, end = self._window(start, end)
        return int(((self.arrival > start) & (self.arrival <= end)).sum()) / (end - start)

    def latency_percentiles(self) -> dict[str, float]:
        """p50 / p90 / p99 over every finished request of the end-to-end latency (arrival to last token)
        and of the time to first token, flat so that a table row can take them as they are."""
        done = np.isfinite(self.finish)
        arrival = self.arrival[done]
        series = {"latency": self.finish[done] - arrival, "ttft": self.first_token[done] - arrival}
        return {f"{name}_p{q}_s": float(np.percentile(values, q)) if len(values) else float("nan")
                for name, values in series.items() for q in (50, 90, 99)}

    def kv_utilisation(self, start: float | None = None, end: float | None = None) -> float | None:
        """Time-weighted mean of KV tokens held / `kv_capacity` over the iterations starting in
        [start, end) (by default the steady window); None when the capacity or the times are unknown."""
        if self.kv_capacity is None or not len(self.iteration_start):
            return None
        start, end = self._window(start, end)
        inside = (self.iteration_start >= start) & (self.iteration_start < end) & np.isfinite(self.iteration_seconds)
        weight = float(self.iteration_seconds[inside].sum())
        if weight <= 0:
            return None
        return float((self.kv_tokens[inside] * self.iteration_seconds[inside]).sum()) / (weight * self.kv_capacity)

    def summary(self) -> dict:
        start, end = self.steady_window()
        return {
            "requests": self.requests,
            "completed": self.completed,
            "preemptions": int(self.preemptions.sum()),
            "preempted_requests": int((self.preemptions > 0).sum()),
            "iterations": len(self.iteration_start),
            "makespan_s": self.makespan_s,
            "steady_window_s": [start, end],
            "offered_rate": self.offered_rate(start, end),
            "throughput": self.throughput(start, end),
            **self.latency_percentiles(),
            "max_queue": int(self.queue.max()) if len(self.queue) else None,
            "kv_utilisation": self.kv_utilisation(start, end),
        }


class _Request:
    """A request's state inside `replay` (mutable and touched every iteration: a slotted class)."""

    __slots__ = ("index", "original", "prompt", "output", "cached", "pages", "generated", "active")

    def __init__(self, index: int, prompt: int, output: int):
        self.index = index
        self.original = prompt  # the prompt it arrived with
        self.prompt = prompt  # what it must prefill now: after a preemption, original + generated tokens
        self.output = output
        self.cached = 0  # KV tokens in the cache
        self.pages = 0  # pages held: ⌈cached / page_size⌉
        self.generated = 0  # output tokens emitted so far (a recompute does not emit them again)
        self.active = False  # in the batch (holding pages) rather than waiting or finished


class _Server:
    """The scheduler's state between iterations; `replay` drives it."""

    def __init__(self, server: ServerSpec, n: int):
        self.spec = server
        self.page, self.total = server.page_size, server.pages
        self.free = self.total
        self.kv = 0  # KV tokens held, all active requests together
        self.active: list[_Request] = []  # admission order, as transformers' active_requests dict keeps it
        self.waiting: deque[_Request] = deque()
        self.block_new = False
        self.preemptions = [0] * n

    def schedule(self) -> tuple[list[tuple[_Request, int, bool]], bool, list[tuple[_Request, int]]]:
        """One FIFOScheduler.schedule_batch: the scheduled (request, tokens, decoding) triples, whether an
        allocation failed, and the active requests that starved with the tokens they were denied."""
        page, free = self.page, self.free
        in_margin = free / self.total >= self.spec.safety_margin
        token_budget, request_budget = self.spec.max_batch_tokens, self.spec.max_seqs
        scheduled: list[tuple[_Request, int, bool]] = []
        starved: list[tuple[_Request, int]] = []
        failed = False
        admitted = 0
        decoding = [r for r in self.active if r.cached >= r.prompt]
        prefilling = [r for r in self.active if r.cached < r.prompt]
        waiting = () if self.block_new else self.waiting
        for group in (decoding, prefilling, waiting):
            for r in group:
                is_decoding = r.cached >= r.prompt  # a waiting request has nothing cached
                if not in_margin and scheduled and not is_decoding:
                    break
                if not r.active and free == 0:  # a waiting request needs a page: none of the rest can fit
                    failed = True
                    break
                n = 1 if is_decoding else min(r.prompt - r.cached, token_budget)
                need = -(-(r.cached + n) // page) - r.pages
                if need > free:
                    failed = True
                    if r.active:
                        starved.append((r, n))
                    continue
                free -= need
                r.pages += need
                if not r.active:
                    r.active = True
                    self.active.append(r)
                    admitted += 1
                scheduled.append((r, n, is_decoding))
                token_budget -= n
                request_budget -= 1
                if token_budget == 0 or request_budget == 0:
                    break
            else:
                continue
            break  # an inner break ends scheduling
        self.free = free
        if admitted:  # admitted requests leave the queue; usually they are its head
            for _ in range(admitted):
                if not self.waiting[0].active:
                    self.waiting = deque(r for r in self.waiting if not r.active)
                    break
                self.waiting.popleft()
        return scheduled, failed, starved

    def preempt(self, starved: list[tuple[_Request, int]]) -> int:
        """OffloadingManager.offload_requests with soft resets only: evict the newest starved requests
        until the other starved ones' next tokens fit (always keeping one request active), requeue them
        oldest first as recomputes, and block new requests. Returns how many were evicted."""
        page = self.page
        needs = [-(-(r.cached + n) // page) - r.pages for r, n in starved]
        total_need = sum(needs)
        victims: list[_Request] = []
        while starved and len(self.active) - len(victims) > 1:
            if total_need <= self.free:
                break
            r, _ = starved.pop()
            total_need -= needs.pop()
            self.free += r.pages
            self.kv -= r.cached
            r.pages = r.cached = 0
            r.active = False
            victims.append(r)
        if not victims:
            return 0
        for r in reversed(victims):
            # the tokens it generated become prompt: its cache is rebuilt by prefill, and its next token is new
            r.prompt = r.original + r.generated
            self.preemptions[r.index] += 1
            self.waiting.append(r)
        self.active = [r for r in self.active if r.active]
        self.block_new = True
        return len(victims)


def _token_counts(values) -> np.ndarray:
    values = np.asarray(values)
    if not np.issubdtype(values.dtype, np.integer):
        if not (np.issubdtype(values.dtype, np.floating) and np.isfinite(values).all()
                and (values == np.rint(values)).all()):
            raise ValueError("prompt and output lengths must be whole numbers of tokens")
    return values.astype(np.int64)


def _check_requests(arrival: np.ndarray, prompt: np.ndarray, output: np.ndarray, server: ServerSpec) -> None:
    if not (arrival.ndim == prompt.ndim == output.ndim == 1) or not len(arrival) == len(prompt) == len(output):
        raise ValueError("arrival times, prompt and output lengths must be 1-D arrays of equal length")
    if not len(arrival):
        raise ValueError("no requests")
    if not np.isfinite(arrival).all() or (np.diff(arrival) < 0).any():
        raise ValueError("arrival times must be finite and non-decreasing")
    if (prompt < 1).any() or (output < 1).any():
        raise ValueError("prompt and output lengths must be at least 1 token")
    pages = -(-(prompt + output) // server.page_size)
    worst = int(np.argmax(pages))
    if pages[worst] > server.pages:
        raise ValueError(f"a request of {prompt[worst]} + {output[worst]} tokens needs {pages[worst]} pages of "
                         f"{server.page_size} tokens; the KV cache has {server.pages}")


def replay(arrival_s, prompt, output, server: ServerSpec) -> ServerRun:
    """Serve the given requests (arrival times non-decreasing, in seconds) on `server` until every one
    has finished, scheduling as transformers' FIFO scheduler does (module docstring)."""
    arrival = np.asarray(arrival_s, dtype=np.float64)
    prompt, output = _token_counts(prompt), _token_counts(output)
    _check_requests(arrival, prompt, output, server)
    n = len(arrival)
    arrivals = arrival.tolist()
    requests = [_Request(i, s, o) for i, (s, o) in enumerate(zip(prompt.tolist(), output.tolist()))]
    state = _Server(server, n)
    seconds_of = server.iteration.seconds
    first_token = [float("nan")] * n
    finish = [float("nan")] * n
    generated = [0] * n
    columns: tuple[list, ...] = ([], [], [], [], [], [], [], [])  # start, seconds, p, d, kv, pages, queue, running
    start_s, seconds_s, prefill_rec, decode_rec, kv_rec, pages_rec, queue_rec, running_rec = columns

    now, arrived, done = arrivals[0], 0, 0
    while done < n:
        while arrived < n and arrivals[arrived] <= now:
            state.waiting.append(requests[arrived])
            arrived += 1
        if not state.active and not state.waiting:  # idle until the next arrival
            now = arrivals[arrived]
            continue
        scheduled, failed, starved = state.schedule()
        while not scheduled:  # the cache is full: evict, then schedule again
            if not failed or not state.preempt(starved):
                raise RuntimeError("no request can be scheduled and none can be preempted")
            scheduled, failed, starved = state.schedule()
        if starved:  # free now what the starved requests need next iteration
            state.preempt(starved)

        prefill = sum(n_tokens for _, n_tokens, decoding in scheduled if not decoding)
        decodes = sum(1 for *_, decoding in scheduled if decoding)
        kv_read = sum(r.cached + n_tokens for r, n_tokens, _ in scheduled)  # what the batch attends over
        seconds = float(seconds_of(prefill, decodes, kv_read))
        end = now + seconds
        finished = []
        for r, n_tokens, decoding in scheduled:
            r.cached += n_tokens
            state.kv += n_tokens
            if decoding or r.cached == r.prompt:  # a decode step, or the prefill's last chunk: one new token
                r.generated += 1
                generated[r.index] += 1
                if first_token[r.index] != first_token[r.index]:  # NaN: its first token ever
                    first_token[r.index] = end
                if r.generated == r.output:
                    finished.append(r)
        start_s.append(now)
        seconds_s.append(seconds)
        prefill_rec.append(prefill)
        decode_rec.append(decodes)
        kv_rec.append(state.kv)
        pages_rec.append(state.total - state.free)
        queue_rec.append(len(state.waiting))
        running_rec.append(len(state.active))
        if finished:
            for r in finished:
                finish[r.index] = end
                state.free += r.pages
                state.kv -= r.cached
                r.pages = r.cached = 0
                r.active = False
            state.active = [r for r in state.active if r.active]
            state.block_new = False
            done += len(finished)
        now = end

    return ServerRun.from_records(
        arrival=arrival, first_token=first_token, finish=finish, preemptions=state.preemptions,
        iteration_start=start_s, iteration_seconds=seconds_s, prefill_tokens=prefill_rec, decode_seqs=decode_rec,
        kv_tokens=kv_rec, kv_pages=pages_rec, queue=queue_rec, running=running_rec, generated=generated,
        kv_capacity=server.pages * server.page_size)


def simulate_server(prompt_pool, output_pool, *, rate: float, server: ServerSpec, requests: int,
                    seed: int = 0) -> ServerRun:
    """`requests` Poisson arrivals at `rate` per second, from time 0, with (prompt, output) pairs drawn
    with replacement from the pools' rows (their joint distribution), replayed on `server`. Every row
    must fit the cache alone, drawn or not, so whether a workload is accepted does not depend on the seed."""
    prompt_pool, output_pool = _token_counts(prompt_pool), _token_counts(output_pool)
    if prompt_pool.ndim != 1 or prompt_pool.shape != output_pool.shape or not len(prompt_pool):
        raise ValueError("the prompt and output pools must be non-empty 1-D arrays of equal length")
    if not (np.isfinite(rate) and rate > 0):
        raise ValueError(f"the arrival rate must be positive, got {rate!r}")
    if isinstance(requests, bool) or int(requests) != requests or requests < 1:
        raise ValueError(f"requests must be a positive integer, got {requests!r}")
    _check_requests(np.zeros(len(prompt_pool)), prompt_pool, output_pool, server)
    rng = np.random.default_rng(seed)
    arrival = np.cumsum(rng.exponential(1.0 / rate, size=int(requests)))
    rows = rng.integers(0, len(prompt_pool), size=int(requests))
    return replay(arrival, prompt_pool[rows], output_pool[rows], server)
