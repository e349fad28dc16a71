"""Serving capacity under KV-cache memory (docs/method.md §8): pure functions, no I/O. The KV shape and
bytes per token, the cache's capacity M, a request's lifetime memory g(s, o) counted as the servers run it
and in whole pages (`lifetime_memory(..., page_size)`), the stable service rate μ, the slack δ, and the
memory, sequence and token bounds (`iteration_model_bounds` with the fitted iteration time).

Units: lengths in tokens, memory in bytes (KV and weights) or tokens (`M`, `g`), times in seconds,
rates in requests per second.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

# Bytes per element of the KV cache / weights for each --dtype.
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float8": 1, "int8": 1}


@dataclass(frozen=True)
class KVShape:
    """What fixes the KV cache's size per token: attention layers, KV heads and head width."""

    layers: int
    kv_heads: int
    head_dim: int

    def as_dict(self) -> dict[str, int]:
        return {"layers": self.layers, "kv_heads": self.kv_heads, "head_dim": self.head_dim}


def kv_shape(config: Mapping[str, Any] | Any) -> KVShape:
    """KV shape from a transformers config (object or config.json dict).

    `head_dim` is the config's own when set (Qwen3 and others decouple it from the width), else
    `hidden_size // num_attention_heads`; KV heads default to the attention heads (no GQA).
    """

    def get(name):
        return config.get(name) if isinstance(config, Mapping) else getattr(config, name, None)

    layers, heads, hidden = get("num_hidden_layers"), get("num_attention_heads"), get("hidden_size")
    if not layers or not heads:
        raise ValueError("config has no num_hidden_layers / num_attention_heads")
    kv_heads = get("num_key_value_heads") or heads
    head_dim = get("head_dim") or (hidden // heads if hidden else None)
    if not head_dim:
        raise ValueError("config has neither head_dim nor hidden_size")
    return KVShape(int(layers), int(kv_heads), int(head_dim))


def kv_bytes_per_token(shape: KVShape, dtype_bytes: int) -> int:
    """`2 · n_layers · n_kv_heads · head_dim · dtype_bytes`: one key and one value vector per KV head
    per layer. Compression of the projections leaves it unchanged (same layers and KV heads)."""
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * dtype_bytes


def kv_capacity(gpu_mem: float, mem_util: float, weight_bytes: float, activation_reserve: float,
                kv_bytes: int) -> int:
    """`M = floor((gpu_mem · util − weights − activation_reserve) / kv_bytes_per_token)`, in tokens
    (negative when the weights and reserve do not fit; the caller reports that)."""
    return math.floor((gpu_mem * mem_util - weight_bytes - activation_reserve) / kv_bytes)


def _paged(tokens, page_size: int):
    """`⌈t / P⌉ · P`: the tokens a request holding `t` occupies in whole pages of `P` (t itself when P = 1)."""
    return -(-tokens // page_size) * page_size


def _page_sum(n, page_size: int):
    """`Σ_{t=1..n} ⌈t/P⌉·P`: with `n = a·P + b` (0 ≤ b < P), each of the a full pages is held by P values of
    t at k·P tokens, and the b last values by the (a + 1)-th page."""
    a, b = n // page_size, n % page_size
    return page_size * page_size * a * (a + 1) // 2 + b * (a + 1) * page_size


def prefill_memory(s, chunk: int, page_size: int = 1):
    """Token·iterations held during chunked prefill: `Σ_{j=1..⌈s/ŝ⌉} min(j·ŝ, s)`, each term rounded up to
    whole pages of `page_size` tokens (the engines allocate the cache in pages: `⌈t/P⌉·P` for t tokens).

    With `q = s // ŝ` full chunks the sum is `Σ_{j=1..q} ⌈j·ŝ/P⌉·P` (`ŝ·q(q+1)/2` when P divides ŝ), plus
    `⌈s/P⌉·P` for the last, partial chunk when `ŝ` does not divide `s`. Exact integers; `s` may be an int
    or an integer array.
    """
    s = np.asarray(s, dtype=np.int64)
    q = s // chunk
    if chunk % page_size == 0:
        full = chunk * q * (q + 1) // 2
    else:  # chunk ends fall inside pages: Σ_{j ≤ q} ⌈j·ŝ/P⌉·P, tabulated once up to the largest q
        steps = _paged(np.arange(0, int(q.max()) + 1, dtype=np.int64) * chunk, page_size)
        full = np.cumsum(steps)[q]
    value = full + np.where(s % chunk > 0, _paged(s, page_size), 0)
    return int(value) if value.ndim == 0 else value


def lifetime_memory(s, o, chunk: int, page_size: int = 1):
    """`g(s, o)`: KV token·iterations a request holds from admission to completion, as the servers run it.

    Prefill (above); its last chunk emits the first output token. Then `o − 1` decode iterations, each
    feeding back the previous token, holding `s + 1, …, s + o − 1` tokens: `s·(o − 1) + o(o − 1)/2`
    (the paper's form counts one more decode, holding `s + o`). With `page_size` > 1 every term is
    rounded up to whole pages (token·iterations of the pages held). Exact for integer lengths; scalars or
    arrays.
    """
    s = np.asarray(s, dtype=np.int64)
    o = np.asarray(o, dtype=np.int64)
    decode = _page_sum(s + o - 1, page_size) - _page_sum(s, page_size)
    value = prefill_memory(s, chunk, page_size) + decode
    return int(value) if np.ndim(value) == 0 else value


def lifetime_memory_smooth(s: float, o: float, chunk: int) -> float:
    """The paper's closed form for real `s`, `o` with the servers' `o − 1` decode iterations:
    `(1 + s/ŝ)·s/2 + s·(o − 1) + o·(o − 1)/2` (the paper's `(1 + s/ŝ)·s/2 + s·o + (1 + o)·o/2` less the
    `s + o` of the decode iteration the servers do not run; equal to `lifetime_memory` when `ŝ` divides
    `s`). Used to show what plugging in mean lengths gives."""
    return (1 + s / chunk) * s / 2 + s * (o - 1) + o * (o - 1) / 2


def iterations(s, o, chunk: int):
    """Batch iterations a request spends in the batch: `⌈s/ŝ⌉` prefill chunks, the last of which emits the
    first output token, then `o − 1` decodes (one per further output token), as the servers run it."""
    s = np.asarray(s, dtype=np.int64)
    o = np.asarray(o, dtype=np.int64)
    value = -(-s // chunk) + o - 1
    return int(value) if np.ndim(value) == 0 else value


def service_rate(m_tokens: int, iteration_s: float, mean_g: float) -> float:
    """`μ = M / (b̄ · E[g])`: requests per second the KV memory can sustain. `E[g]` must be the mean
    of g over the joint length distribution: g is quadratic, so g(E[s], E[o]) underestimates it."""
    return m_tokens / (iteration_s * mean_g)


def memory_slack(max_request_tokens: int, m_tokens: int) -> float:
    """`δ = max(s + o) / M`: the share of memory a work-conserving policy may leave idle because the
    next request does not fit. Stable for `λ < μ(1 − δ)`, unstable for `λ > μ`."""
    return max_request_tokens / m_tokens


def token_throughput_bound(mean_s: float, mean_o: float, prefill_tps: float, decode_tps: float) -> float:
    """`1 / (E[s]/P + (E[o] − 1)/D)`: requests per second when compute, not memory, is the limit (a request
    costs E[s] prefill tokens at P tokens/s, whose last chunk yields its first output token, and E[o] − 1
    decode tokens at D tokens/s)."""
    return 1.0 / (mean_s / prefill_tps + (mean_o - 1) / decode_tps)


def concurrency_bound(max_seqs: int, iteration_s: float, mean_iterations: float) -> float:
    """`max_seqs / (b̄ · E[iterations])`: with at most `max_seqs` sequences in the batch, each in it
    for E[iterations] iterations of b̄ seconds, Little's law caps the completion rate here."""
    return max_seqs / (iteration_s * mean_iterations)


def gpus_needed(rate: float, max_stable_rate: float, target_util: float) -> int:
    """`⌈λ / (u · μ)⌉`: data-parallel replicas add their rates; run each at utilisation u."""
    return max(1, math.ceil(rate / (target_util * max_stable_rate) - 1e-12))


@dataclass(frozen=True)
class Bounds:
    """The ceilings on a worker's completion rate (requests/s) and the one that binds first."""

    memory: float  # μ = M / (b̄ · E[g])
    tokens: float | None  # 1 / (E[s]/P + E[o]/D), when P and D are known
    sequences: float | None  # max_seqs / (b̄ · E[iterations]), when a cap is set
    # which of memory and sequences the worker reaches first, where that decides a tie (iteration_model_bounds)
    resident: str | None = None

    @property
    def named(self) -> dict[str, float]:
        values = {"memory": self.memory, "tokens": self.tokens, "sequences": self.sequences}
        return {k: v for k, v in values.items() if v is not None}

    @property
    def binding(self) -> str:
        named = self.named
        lowest = min(named.values())
        tied = [k for k, v in named.items() if v == lowest]
        return self.resident if self.resident in tied else tied[0]

    @property
    def max_stable_rate(self) -> float:
        return self.named[self.binding]


@dataclass(frozen=True)
class SaturatedBatch:
    """The batch of a worker that keeps `n` requests resident, on average per iteration: `n · E[s] /
    E[iterations]` prompt tokens, `n · (E[o] − 1) / E[iterations]` decoding sequences (a request decodes
    o − 1 times: its first token comes out of its last prefill chunk) and `n · E[g] / E[iterations]` KV
    tokens held (each request spends E[iterations] iterations in the batch, holding E[g] token·iterations
    over them), and the iteration time b(p, d, k) of that batch."""

    requests: float
    prefill_tokens: float
    decode_seqs: float
    kv_tokens: float
    iteration_s: float

    @property
    def rate(self) -> float:
        """Little's law: `n` resident requests, each in the batch for E[iterations] iterations of this
        length, complete at `n / (E[iterations] · b)` per second (the caller divides by E[iterations])."""
        return self.requests / self.iteration_s


def saturated_batch(iteration, n: float, mean_s: float, mean_o: float, mean_g: float,
                    mean_iterations: float) -> SaturatedBatch:
    """`iteration`: an `IterationModel` (anything with `seconds(p, d, k)`); `mean_g` in KV tokens (what the
    batch attends over, not rounded to pages)."""
    p, d, k = n * mean_s / mean_iterations, n * (mean_o - 1) / mean_iterations, n * mean_g / mean_iterations
    return SaturatedBatch(n, p, d, k, float(iteration.seconds(p, d, k)))


def iteration_model_bounds(iteration, m_tokens: int, max_seqs: int | None, mean_s: float, mean_o: float,
                           mean_g: float, mean_iterations: float,
                           mean_g_paged: float | None = None) -> tuple[Bounds, SaturatedBatch]:
    """The bounds of `Bounds` with b̄ replaced by the iteration time as a function of the batch,
    b(p, d, k) (`bltool.serve.iteration`), evaluated at the batch a saturated worker runs:

    - memory: the cache holds `n_M = M · E[iterations] / E[g]` resident requests on average, and they
      complete at `n_M / (E[iterations] · b(batch of n_M))`; with `mean_g_paged` (E[g] in whole pages,
      `lifetime_memory(..., page_size)`, and `m_tokens` the cache's whole pages) memory is counted in
      pages, as the engines allocate it, and `mean_g` (tokens) still gives the KV the batch attends over;
    - sequences: the same with `max_seqs` resident requests;
    - tokens: `1 / (c_p · E[s] + c_d · (E[o] − 1))`, the rate when only the per-token work counts (no
      per-iteration or attention cost), the model's form of `1 / (E[s]/P + (E[o] − 1)/D)`.

    With a constant b (c_p = c_d = c_a = 0) the first two are exactly μ = M / (b̄ · E[g]) and
    `concurrency_bound`. Returns the bounds and the batch of the binding one of memory and sequences
    (the one the worker runs at saturation)."""
    paged = mean_g if mean_g_paged is None else mean_g_paged
    memory = saturated_batch(iteration, m_tokens * mean_iterations / paged, mean_s, mean_o, mean_g,
                             mean_iterations)
    sequences = (saturated_batch(iteration, max_seqs, mean_s, mean_o, mean_g, mean_iterations)
                 if max_seqs else None)
    per_token = iteration.prefill_token_s * mean_s + iteration.decode_seq_s * (mean_o - 1)
    memory_rate = memory.rate / mean_iterations
    sequence_rate = sequences.rate / mean_iterations if sequences is not None else None
    resident = memory if sequences is None or memory.requests <= sequences.requests else sequences
    # the worker runs with the fewer residents of the two; with a large attention cost b grows faster than
    # n, and the bound it never reaches must not undercut the one it does
    if sequence_rate is not None:
        if resident is memory:
            sequence_rate = max(sequence_rate, memory_rate)
        else:
            memory_rate = max(memory_rate, sequence_rate)
    bounds = Bounds(memory=memory_rate, tokens=1.0 / per_token if per_token > 0 else None, sequences=sequence_rate,
                    resident="memory" if resident is memory else "sequences")
    return bounds, resident
