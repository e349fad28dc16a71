"""docs/method.md §8 formulas against hand calculations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bltool.serve.iteration import IterationModel
from bltool.serve.queueing import (
    Bounds,
    KVShape,
    concurrency_bound,
    gpus_needed,
    iteration_model_bounds,
    iterations,
    kv_bytes_per_token,
    kv_capacity,
    kv_shape,
    lifetime_memory,
    lifetime_memory_smooth,
    memory_slack,
    prefill_memory,
    service_rate,
    token_throughput_bound,
)


@pytest.mark.parametrize(
    ("s", "chunk", "expected"),
    [
        (10, 4, 4 + 8 + 10),  # chunks end at 4, 8 and 10 tokens: the last one is partial
        (8, 4, 4 + 8),  # ŝ divides s
        (3, 512, 3),  # one chunk
        (1, 1, 1),
        (5, 1, 1 + 2 + 3 + 4 + 5),  # token-by-token prefill
        (513, 512, 512 + 513),
    ],
)
def test_prefill_memory_by_hand(s, chunk, expected):
    assert prefill_memory(s, chunk) == expected


def test_lifetime_memory_by_hand():
    # s = 10, o = 3, ŝ = 4: prefill holds 4, 8, 10 (the last chunk emits the first token); the two decodes
    # feed back tokens 1 and 2, holding 11 and 12 (token 3 is never written): 5 iterations, not the paper's 6
    assert lifetime_memory(10, 3, 4) == 22 + 11 + 12 == 45
    assert iterations(10, 3, 4) == 3 + 2
    assert iterations(5, 1, 8) == 1  # one output token: the prefill alone
    # in pages of 4 tokens each iteration holds whole pages: 4, 8, 12, then 12, 12
    assert lifetime_memory(10, 3, 4, page_size=4) == 4 + 8 + 12 + 12 + 12
    assert lifetime_memory(10, 3, 4, page_size=16) == 5 * 16  # one page of 16 throughout
    assert lifetime_memory(10, 3, 4, page_size=1) == lifetime_memory(10, 3, 4)
    # when ŝ divides s the exact sum equals the closed form (1 + s/ŝ)s/2 + s(o − 1) + o(o − 1)/2, the paper's
    # (1 + s/ŝ)s/2 + so + (1 + o)o/2 less the s + o of the decode the servers do not run
    assert lifetime_memory(8, 3, 4) == lifetime_memory_smooth(8, 3, 4) == 12 + 16 + 3
    assert lifetime_memory_smooth(8, 3, 4) + 8 + 3 == (1 + 8 / 4) * 8 / 2 + 8 * 3 + (1 + 3) * 3 / 2
    # otherwise the closed form is off: it assumes s/ŝ chunks
    assert lifetime_memory_smooth(10, 3, 4) != 45


def test_lifetime_memory_matches_brute_force_on_arrays():
    """Held tokens iteration by iteration (prefill chunks, then decodes i = 1..o − 1), each rounded up to whole
    pages, summed; chunks that divide into pages, and chunks whose ends fall inside a page."""
    rng = np.random.default_rng(0)
    s, o = rng.integers(1, 300, size=200), rng.integers(1, 100, size=200)
    for chunk in (1, 7, 16, 64, 512):
        for page in (1, 4, 16, 128):
            brute = [sum(math.ceil(held / page) * page for held in
                         [min(j * chunk, si) for j in range(1, math.ceil(si / chunk) + 1)] +
                         [si + i for i in range(1, oi)]) for si, oi in zip(s.tolist(), o.tolist())]
            assert lifetime_memory(s, o, chunk, page).tolist() == brute, (chunk, page)
            assert lifetime_memory(int(s[0]), int(o[0]), chunk, page) == brute[0]


def test_expected_g_over_correlated_lengths_exceeds_g_at_means():
    """g is quadratic: with long prompts going with long outputs, E[g] is well above g(E[s], E[o])."""
    s = np.array([64] * 50 + [1024] * 50)
    o = np.array([16] * 50 + [512] * 50)  # perfectly correlated with s
    chunk = 64
    mean_g = lifetime_memory(s, o, chunk).mean()
    at_means = lifetime_memory_smooth(s.mean(), o.mean(), chunk)
    assert mean_g > 1.4 * at_means
    # the gap is the covariance term E[s·o] − E[s]E[o] plus the variance terms
    expected = (np.mean(s * o) - s.mean() * o.mean()) + (np.mean(o**2) - o.mean() ** 2) / 2 \
        + (np.mean(s**2) - s.mean() ** 2) / (2 * chunk)
    assert mean_g - at_means == pytest.approx(expected, rel=1e-9)
    # anti-correlated lengths of the same marginals give a smaller E[g]
    assert lifetime_memory(s, o[::-1], chunk).mean() < mean_g
    # with no spread there is nothing to gain: E[g] = g(E[s], E[o])
    assert lifetime_memory(np.full(10, 128), np.full(10, 32), chunk).mean() == lifetime_memory_smooth(128, 32, chunk)


def test_kv_bytes_per_token_from_a_config():
    """The paper student: 6 layers, 3 KV heads of 64, bf16 → 2·6·3·64·2 = 4,608 bytes."""
    from transformers import LlamaConfig

    config = LlamaConfig(num_hidden_layers=6, hidden_size=768, num_attention_heads=12, num_key_value_heads=3,
                         intermediate_size=3072)
    shape = kv_shape(config)
    assert shape == KVShape(layers=6, kv_heads=3, head_dim=64)
    assert kv_bytes_per_token(shape, 2) == 4608
    assert kv_bytes_per_token(shape, 4) == 9216
    # the same from a config.json dict
    assert kv_shape(config.to_dict()) == shape


def test_kv_shape_is_the_cache_each_family_allocates(family):
    """For each family, from the config object and from config.json (which may leave head_dim out): one key
    and one value of (KV heads, head width) per layer and token, as transformers' cache holds them."""
    import json

    import torch
    from helpers import tiny_config
    from transformers import AutoModelForCausalLM

    config = tiny_config(family.model_type, 64, 3, tied=False)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        out = model(torch.tensor([[1, 2, 3, 4, 5]]), use_cache=True)
    cache = out.cache if "cache" in out else out.past_key_values
    shape = kv_shape(config)
    assert kv_shape(json.loads(config.to_json_string())) == shape
    assert len(cache.layers) == shape.layers == 3
    for layer in cache.layers:
        assert tuple(layer.keys.shape) == tuple(layer.values.shape) == (1, shape.kv_heads, 5, shape.head_dim)
    held = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert held == 5 * kv_bytes_per_token(shape, 4)


def test_kv_shape_prefers_an_explicit_head_dim_and_defaults_kv_heads():
    # Qwen3-style: head_dim 128 although hidden / heads = 64
    assert kv_shape({"num_hidden_layers": 2, "hidden_size": 512, "num_attention_heads": 8,
                     "num_key_value_heads": 2, "head_dim": 128}) == KVShape(2, 2, 128)
    # no GQA: as many KV heads as attention heads
    assert kv_shape({"num_hidden_layers": 4, "hidden_size": 256, "num_attention_heads": 4}) == KVShape(4, 4, 64)
    with pytest.raises(ValueError):
        kv_shape({"hidden_size": 256})


def test_kv_capacity_by_hand():
    gib = 2**30
    # (80 GiB · 0.9 − 1 GiB − 2 GiB) / 4608 bytes = 69 GiB / 4608
    assert kv_capacity(80 * gib, 0.9, 1 * gib, 2 * gib, 4608) == math.floor(69 * gib / 4608) == 16_078_165
    assert kv_capacity(1 * gib, 0.5, 1 * gib, 0, 4608) < 0  # weights do not fit


def test_rates_and_gpus_by_hand():
    assert service_rate(100_000, 0.05, 20_000) == pytest.approx(100.0)  # 1e5 / (0.05 · 2e4)
    assert memory_slack(2_000, 100_000) == 0.02
    # 1 / (300/3000 + 100/1000) = 5 requests/s: 101 output tokens, the first from the prefill, 100 decoded
    assert token_throughput_bound(300, 101, 3000, 1000) == pytest.approx(5.0)
    # 8 sequences, each 40 iterations of 0.05 s: 8 / 2 s = 4 requests/s
    assert concurrency_bound(8, 0.05, 40) == pytest.approx(4.0)
    assert gpus_needed(40, 10, 0.8) == 5  # 40 / 8 per GPU
    assert gpus_needed(8, 10, 0.8) == 1  # exactly at the target: one GPU
    assert gpus_needed(8.01, 10, 0.8) == 2
    assert gpus_needed(1, 1000, 0.8) == 1


def test_bounds_report_the_smallest():
    bounds = Bounds(memory=10.0, tokens=4.0, sequences=None)
    assert bounds.binding == "tokens" and bounds.max_stable_rate == 4.0
    assert Bounds(memory=3.0, tokens=None, sequences=5.0).binding == "memory"
    assert Bounds(memory=3.0, tokens=9.0, sequences=2.5).max_stable_rate == 2.5


def test_iteration_model_bounds_reduce_to_the_constant_formulas():
    """With b(p, d, k) = b̄ the bounds are exactly μ = M / (b̄ · E[g]) and max_seqs / (b̄ · E[iterations])."""
    b = IterationModel.constant(0.05)
    bounds, batch = iteration_model_bounds(b, 10_000, 8, mean_s=200.0, mean_o=50.0, mean_g=15_000.0,
                                           mean_iterations=51.0)
    assert bounds.memory == pytest.approx(service_rate(10_000, 0.05, 15_000.0))
    assert bounds.sequences == pytest.approx(concurrency_bound(8, 0.05, 51.0))
    assert bounds.tokens is None  # no per-token cost: no token bound
    # the cache holds 10,000 · 51 / 15,000 = 34 resident requests on average, more than the 8 allowed
    assert batch.requests == 8 and batch.iteration_s == 0.05 and bounds.binding == "sequences"


def test_iteration_model_bounds_by_hand():
    """b = 10 ms + 0.1 ms per prompt token + 1 ms per decoding sequence + 1 ns per query × KV token. Requests of
    E[s] = 100, E[o] = 20, E[iterations] = 21, E[g] = 3,000 (given): with 7 resident requests the batch holds
    p = 7·100/21 = 33.3 prompt tokens, d = 7·19/21 = 6.33 decodes (a request decodes o − 1 times: its first
    token comes out of its last prefill chunk) and k = 7·E[g]/21 KV tokens."""
    b = IterationModel(intercept_s=0.01, prefill_token_s=1e-4, decode_seq_s=1e-3, attention_s=1e-9)
    mean_g = 3_000.0
    bounds, batch = iteration_model_bounds(b, 900, 7, mean_s=100.0, mean_o=20.0, mean_g=mean_g, mean_iterations=21.0)
    p, d, k = 7 * 100 / 21, 7 * 19 / 21, 7 * mean_g / 21
    seconds = 0.01 + 1e-4 * p + 1e-3 * d + 1e-9 * (p + d) * k
    assert bounds.sequences == pytest.approx(7 / (21 * seconds))
    n_m = 900 * 21 / mean_g  # 6.3 resident requests fill the cache: memory binds before the cap
    p_m, d_m, k_m = n_m * 100 / 21, n_m * 19 / 21, n_m * mean_g / 21
    seconds_m = 0.01 + 1e-4 * p_m + 1e-3 * d_m + 1e-9 * (p_m + d_m) * k_m
    assert bounds.memory == pytest.approx(n_m / (21 * seconds_m))
    assert bounds.binding == "memory" and bounds.max_stable_rate == bounds.memory
    assert batch.requests == pytest.approx(n_m) and batch.iteration_s == pytest.approx(seconds_m)
    assert bounds.tokens == pytest.approx(1 / (1e-4 * 100 + 1e-3 * 19))
    # memory counted in whole pages: E[g] of 3,600 page-token·iterations leaves room for 900·21/3,600 = 5.25
    # residents, while the batch still attends over the tokens (k from the 3,000 of E[g] in tokens)
    paged, batch = iteration_model_bounds(b, 900, 7, mean_s=100.0, mean_o=20.0, mean_g=mean_g, mean_iterations=21.0,
                                          mean_g_paged=3_600.0)
    n_p = 900 * 21 / 3_600
    p_p, d_p, k_p = n_p * 100 / 21, n_p * 19 / 21, n_p * mean_g / 21
    assert batch.requests == pytest.approx(n_p) and batch.kv_tokens == pytest.approx(k_p)
    assert paged.memory == pytest.approx(n_p / (21 * (0.01 + 1e-4 * p_p + 1e-3 * d_p + 1e-9 * (p_p + d_p) * k_p)))
    assert bounds.tokens > bounds.sequences > bounds.memory  # per-iteration costs only lower the rate


def test_a_cap_the_worker_never_reaches_does_not_bind():
    """With a large attention cost the rate falls as residents grow: a cache holding 50 requests against a cap
    of 8 must not report the (lower) rate at 50 residents as what binds."""
    b = IterationModel(intercept_s=0.001, attention_s=1e-6)
    bounds, batch = iteration_model_bounds(b, 50 * 1000, 8, mean_s=100.0, mean_o=10.0, mean_g=1000.0,
                                           mean_iterations=11.0)
    assert batch.requests == 8 and bounds.binding == "sequences"
    rate_at_8 = 8 / (11 * float(b.seconds(8 * 100 / 11, 8 * 9 / 11, 8 * 1000 / 11)))
    assert bounds.max_stable_rate == pytest.approx(rate_at_8)
