"""The measured-server check's pieces by hand: offered loads and the fit's error on a live run."""

from __future__ import annotations

import numpy as np
import pytest

from bltool.serve.iteration import IterationModel
from bltool.serve.queueing import lifetime_memory
from bltool.serve.simulator import ServerRun, ServerSpec
from bltool.serve.validation import fit_error, memory_bound_cache, offered_loads, server_spec, speed_factor
from bltool.serve.workload import Workload


def test_offered_loads_are_the_same_requests_at_different_speeds():
    workload = Workload(np.arange(1, 101), np.arange(101, 201), "test")
    slow, fast = offered_loads(workload, [2.0, 8.0], requests=500, seed=3)
    assert slow.arrival_s[0] == fast.arrival_s[0] == 0.0
    assert np.allclose(slow.arrival_s, 4 * fast.arrival_s)  # common random numbers: only the clock differs
    assert np.array_equal(slow.prompt, fast.prompt) and np.array_equal(slow.output, fast.output)
    assert np.all(slow.output - slow.prompt == 100)  # rows drawn whole: the joint distribution is kept
    assert np.all(np.diff(slow.arrival_s) >= 0)
    # Poisson at the rate asked for: 499 gaps of mean 1/2 s
    assert len(slow.arrival_s) / slow.arrival_s[-1] == pytest.approx(2.0, rel=0.1)
    again = offered_loads(workload, [2.0], requests=500, seed=3)[0]
    assert np.array_equal(again.arrival_s, slow.arrival_s)


def test_fit_error_leaves_out_the_waits_for_an_arrival():
    model = IterationModel(intercept_s=0.01, prefill_token_s=1e-4, decode_seq_s=1e-3)
    records = [{"seconds": 0.011 * 1.1, "forward_s": 0.011, "prefill_tokens": 0, "decode_seqs": 1, "kv_tokens": 9},
               {"seconds": 0.02 * 0.9 + 0.001, "forward_s": 0.017, "prefill_tokens": 100, "decode_seqs": 0,
                "kv_tokens": 100},
               {"seconds": 0.5, "forward_s": 0.011, "prefill_tokens": 0, "decode_seqs": 1, "kv_tokens": 10},  # idle
               {"seconds": 0.011, "forward_s": 0.010, "prefill_tokens": 0, "decode_seqs": 1, "kv_tokens": 11},
               {"seconds": None, "forward_s": 0.010, "prefill_tokens": 0, "decode_seqs": 1, "kv_tokens": 12}]
    expected = np.mean([abs(0.0121 - 0.011) / 0.0121, abs(0.019 - 0.02) / 0.019, 0.0])
    assert fit_error(records, model) == pytest.approx(expected)


def test_server_spec_is_the_measured_server():
    measured = {"settings": {"page_size": 16, "concurrency": 8}, "kv_cache_tokens": 2560, "max_batch_tokens": 264,
                "scheduler": {"safety_margin": 0.15}, "iteration_s": 0.05,
                "iteration_model": {"intercept_s": 0.04, "prefill_token_s": 2e-4, "decode_seq_s": 5e-4,
                                    "attention_s": 1e-7, "records": 300}}
    spec = server_spec(measured)
    assert (spec.kv_tokens, spec.page_size, spec.max_batch_tokens, spec.max_seqs, spec.safety_margin) == \
        (2560, 16, 264, 8, 0.15)
    assert spec.iteration.attention_s == 1e-7 and spec.iteration.records == 300
    del measured["iteration_model"]  # an artifact from before the fit: the constant b̄
    assert server_spec(measured).iteration == IterationModel.constant(0.05)


def test_offered_loads_stratified_by_lifetime_memory_hold_the_workloads_mean():
    """Stratified draws: the rows sorted by the key, one row from each of `requests` equal strata. Drawn from a
    heavy-tailed workload, 96 requests then hold its E[g] far closer than independent draws do."""
    workload = Workload(np.arange(1, 1001), np.full(1000, 7), "test")
    load = offered_loads(workload, [1.0], requests=100, seed=0, strata=np.arange(1000)[::-1])[0]
    ranks = np.sort(1000 - load.prompt)  # the key ranks the rows in reverse
    assert (ranks // 10 == np.arange(100)).all()  # exactly one row from each stratum of 10
    assert not (np.diff(load.prompt) > 0).all()  # served in random order, not sorted
    rng = np.random.default_rng(0)
    z = rng.normal(size=(2000, 2)) @ np.linalg.cholesky([[1.0, 0.6], [0.6, 1.0]]).T
    heavy = Workload(np.clip(np.rint(192 * np.exp(0.8 * z[:, 0])), 1, 1536).astype(np.int64),
                     np.clip(np.rint(48 * np.exp(0.7 * z[:, 1])), 1, 512).astype(np.int64), "trace-like")
    g = lifetime_memory(heavy.prompt, heavy.output, 256, 16)

    def error(strata, seed):
        drawn = offered_loads(heavy, [1.0], requests=96, seed=seed, strata=strata)[0]
        return abs(lifetime_memory(drawn.prompt, drawn.output, 256, 16).mean() / g.mean() - 1)

    stratified = [error(g, seed) for seed in range(40)]
    independent = [error(None, seed) for seed in range(40)]
    assert np.median(stratified) < 0.05 < np.median(independent)


def test_memory_bound_cache_by_hand():
    """The check's cache holds max_seqs / 2 resident requests by the formula (n_M = M · E[it] / E[g], g in whole
    pages), at least the largest request and at most the measured cache."""
    def spec(kv_tokens, max_seqs):
        return ServerSpec(kv_tokens=kv_tokens, page_size=16, max_batch_tokens=max_seqs + 32, max_seqs=max_seqs,
                          iteration=IterationModel.constant(0.01))

    # s = 24, o = 8, ŝ = 32: one prefill iteration and 7 decodes, each in 2 pages (25 … 31 tokens): 32 tokens
    # held per iteration; 4 residents of a cap of 8 need 128 tokens, 8 pages (the measured cache has 16)
    same = (np.full(10, 24), np.full(10, 8))
    assert memory_bound_cache(spec(256, 8), *same) == 128
    assert memory_bound_cache(spec(96, 8), *same) == 96  # never more than the measured cache
    # a rare long request: the residents fit in one page, the cache must hold its 13 pages
    tail = (np.array([8] * 99 + [200]), np.array([2] * 99 + [8]))
    assert memory_bound_cache(spec(512, 2), *tail) == 13 * 16


def test_speed_factor_counts_the_time_worked_and_leaves_out_the_waits():
    """How much slower the server ran than b(p, d, k) says: the seconds of the iterations it worked through over
    b's. A (arrives at 0, done at 0.3) and B (arrives at 1.0, done at 1.2), b a constant 0.1 s. Iteration 1
    stalls (0.15 s, A still running: the busy machine's time counts); after iteration 2, A's last, the server
    waits for B (no request pending: left out); the last iteration has no next start."""
    run = ServerRun.from_records(
        arrival=[0.0, 1.0], first_token=[0.1, 1.1], finish=[0.3, 1.2], preemptions=[0, 0],
        iteration_start=[0.0, 0.1, 0.25, 1.0, 1.1], iteration_seconds=[0.1, 0.15, 0.05, 0.1, 0.1],
        prefill_tokens=[8, 0, 0, 8, 0], decode_seqs=[0, 1, 1, 0, 1], kv_tokens=[8, 9, 10, 8, 9])
    records = [{"start_s": start, "seconds": seconds, "forward_s": 0.05, "prefill_tokens": 0, "decode_seqs": 1,
                "kv_tokens": 9} for start, seconds in zip([0.0, 0.1, 0.25, 1.0, 1.1], [0.1, 0.15, 0.75, 0.1, None])]
    constant = IterationModel.constant(0.1)
    assert speed_factor(records, run, constant) == pytest.approx((0.1 + 0.15 + 0.1) / (3 * 0.1))
    assert speed_factor(records, run, IterationModel.constant(0.05)) == pytest.approx(2 * 0.35 / 0.3)
    assert speed_factor(records[2:3] + records[4:], run, constant) is None  # only a wait and the last iteration
    # scaled by it, b gives the iterations worked through their measured time
    scaled = constant.scaled(speed_factor(records, run, constant))
    assert 3 * float(scaled.seconds(0, 1)) == pytest.approx(0.35)
