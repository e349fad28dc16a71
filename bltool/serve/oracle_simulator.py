"""The oracle: a discrete-event simulator of memory-constrained continuous batching whose admission knows
every output length (`bltool.serve.simulator` is the server that does not).

One worker runs batch iterations of `b̄` seconds each (a constant: the measured median at saturation).
Requests arrive as a Poisson process of rate λ, with (prompt, output) lengths drawn with replacement
from the workload's rows (the empirical joint distribution). The queue is served first come, first
served. Within the batch every request advances every iteration, exactly as in the model behind
`queueing.lifetime_memory`: a prefilling request adds a chunk of up to ŝ prompt tokens to its KV cache
(holding min(j·ŝ, s) after its j-th chunk; the last chunk emits the first output token), a decoding
request feeds back its previous token (holding s + i in its i-th decode iteration, i = 1..o − 1), and a
request leaves, freeing its cache, at the end of the iteration that emits its last token.

Memory accounting. `F[k]` is the number of KV tokens the batch holds during iteration k, the sum of
the trajectories above of the requests admitted so far. Summed over the iterations a request spends in
the batch, its trajectory is exactly g(s, o), so Σ_k F[k] = Σ over requests of g(s, o) (checked by the
tests, with `drain=True`), and in the long run throughput = (Σ_k F[k] / iterations) / (b̄ · E[g]):
the simulated rate reaches μ = M / (b̄ · E[g]) exactly when memory is kept full.

Admission. The head of the queue is admitted when, together with every request already in the batch,
its future trajectory never exceeds M (and fewer than `max_seqs` sequences are running). The lengths
are known to the simulator, so this policy never needs to preempt a request; a real server that does
not know o admits optimistically and preempts instead. Several requests may be admitted before one
iteration. An idle worker waits for the next arrival.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_SAMPLES = 4000  # queue-length samples kept per run (every `stride`-th iteration)


@dataclass(frozen=True)
class SimulationResult:
    rate: float  # arrival rate λ (requests/s)
    horizon_s: float  # simulated time; arrivals stop here
    time_s: np.ndarray  # sample times (start of an iteration)
    queue: np.ndarray  # requests waiting (arrived, not admitted) at those times
    running: np.ndarray  # sequences in the batch
    kv_tokens: np.ndarray  # KV tokens held during that iteration
    arrivals: int
    completed: int
    iterations: int
    token_iterations: int  # Σ_k F[k]: KV tokens held, summed over iterations
    admitted_g: int  # Σ g(s, o) over every admitted request
    throughput: float  # completions per second over the second half of the horizon
    queue_slope: float  # least-squares growth of the queue over the second half (requests/s)
    kv_utilisation: float  # mean F[k] / M over the iterations of the second half
    final_queue: int
    max_queue: int

    def summary(self) -> dict:
        return {
            "rate": self.rate,
            "horizon_s": self.horizon_s,
            "arrivals": self.arrivals,
            "completed": self.completed,
            "iterations": self.iterations,
            "throughput": self.throughput,
            "queue_slope": self.queue_slope,
            "final_queue": self.final_queue,
            "max_queue": self.max_queue,
            "mean_queue_second_half": float(self.queue[self.time_s >= self.horizon_s / 2].mean())
            if len(self.queue) else 0.0,
            "kv_utilisation": self.kv_utilisation,
        }


def trajectory(s: int, o: int, chunk: int) -> np.ndarray:
    """KV tokens a request holds in each of its iterations: min(j·ŝ, s) for j = 1..⌈s/ŝ⌉ (the last chunk
    emits the first output token), then s + i for its decode iterations i = 1..o − 1."""
    prefill = np.minimum(np.arange(1, -(-s // chunk) + 1, dtype=np.int64) * chunk, s)
    return np.concatenate([prefill, s + np.arange(1, o, dtype=np.int64)])


def simulate(prompt: np.ndarray, output: np.ndarray, *, rate: float, m_tokens: int, chunk: int,
             iteration_s: float, horizon_s: float, max_seqs: int | None = None, seed: int = 0,
             drain: bool = False) -> SimulationResult:
    """Run the worker for `horizon_s` seconds of Poisson arrivals at `rate` (then, with `drain`, until
    every arrived request has completed). Every request must fit alone: s + o − 1 ≤ M."""
    prompt = np.asarray(prompt, dtype=np.int64)
    output = np.asarray(output, dtype=np.int64)
    if int((prompt + output).max()) - 1 > m_tokens:
        raise ValueError("a request is larger than the KV memory M")
    rng = np.random.default_rng(seed)
    expected = rate * horizon_s
    n = int(expected + 6 * np.sqrt(expected) + 16)
    arrival_times = np.cumsum(rng.exponential(1.0 / rate, size=n))
    while arrival_times[-1] < horizon_s:  # (practically never) more arrivals than the estimate
        more = arrival_times[-1] + np.cumsum(rng.exponential(1.0 / rate, size=n))
        arrival_times = np.concatenate([arrival_times, more])
    arrival_times = arrival_times[arrival_times < horizon_s]
    rows = rng.integers(0, len(prompt), size=len(arrival_times))
    sizes_s, sizes_o = prompt[rows], output[rows]
    n_arrivals = len(arrival_times)

    longest = int((-(-prompt // chunk) + output - 1).max())
    capacity = int(horizon_s / iteration_s) + 2 * longest + 16
    held = np.zeros(capacity, dtype=np.int64)  # F[k]
    ends = np.zeros(capacity, dtype=np.int64)  # requests finishing at the end of iteration k
    stride = max(1, int(horizon_s / iteration_s) // MAX_SAMPLES)
    samples: list[tuple[float, int, int, int]] = []

    now, k, head, arrived, running = 0.0, 0, 0, 0, 0
    completed, token_iterations, admitted_g = 0, 0, 0
    half = horizon_s / 2
    half_completed = half_tokens = half_iterations = 0
    head_traj = None
    cap = max_seqs if max_seqs is not None else np.iinfo(np.int64).max
    while True:
        while arrived < n_arrivals and arrival_times[arrived] <= now:
            arrived += 1
        if now >= horizon_s and not (drain and (running or head < arrived)):
            break
        if running == 0 and head == arrived:  # idle until the next arrival
            if arrived == n_arrivals:
                break
            now = float(arrival_times[arrived])
            continue
        while head < arrived and running < cap:  # FCFS admission while the head's future fits
            if head_traj is None:
                head_traj = trajectory(int(sizes_s[head]), int(sizes_o[head]), chunk)
            life = len(head_traj)
            if k + life > len(held):
                grow = max(len(held), life)
                held = np.concatenate([held, np.zeros(grow, dtype=np.int64)])
                ends = np.concatenate([ends, np.zeros(grow, dtype=np.int64)])
            window = held[k:k + life]
            if window[0] + head_traj[0] > m_tokens or int((window + head_traj).max()) > m_tokens:
                break
            window += head_traj
            ends[k + life - 1] += 1
            admitted_g += int(head_traj.sum())
            running += 1
            head += 1
            head_traj = None
        if k % stride == 0:
            samples.append((now, arrived - head, running, int(held[k])))
        # iteration k: every running request advances; those at their last iteration complete
        tokens = int(held[k])
        token_iterations += tokens
        done = int(ends[k])
        running -= done
        completed += done
        if half <= now < horizon_s:
            half_completed += done
            half_tokens += tokens
            half_iterations += 1
        k += 1
        now += iteration_s

    times = np.array([s[0] for s in samples])
    queue = np.array([s[1] for s in samples], dtype=np.int64)
    second = times >= half
    slope = float(np.polyfit(times[second], queue[second], 1)[0]) if second.sum() >= 2 else 0.0
    return SimulationResult(
        rate=rate,
        horizon_s=horizon_s,
        time_s=times,
        queue=queue,
        running=np.array([s[2] for s in samples], dtype=np.int64),
        kv_tokens=np.array([s[3] for s in samples], dtype=np.int64),
        arrivals=n_arrivals,
        completed=completed,
        iterations=k,
        token_iterations=token_iterations,
        admitted_g=admitted_g,
        throughput=half_completed / (horizon_s - half),
        queue_slope=slope,
        kv_utilisation=half_tokens / (m_tokens * half_iterations) if half_iterations else 0.0,
        final_queue=int(arrived - head),
        max_queue=int(queue.max()) if len(queue) else 0,
    )
