"""The discrete-event simulator: exact memory accounting, hand-checked cases, and stability around μ."""

from __future__ import annotations

import numpy as np
import pytest

from bltool.serve.queueing import concurrency_bound, iterations, lifetime_memory, service_rate
from bltool.serve.simulator import simulate, trajectory


def correlated_lengths(n: int = 4000, seed: int = 0):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 2)) @ np.linalg.cholesky(np.array([[1.0, 0.6], [0.6, 1.0]])).T
    s = np.maximum(1, np.rint(np.exp(np.log(96) + 0.6 * z[:, 0]))).astype(np.int64)
    o = np.maximum(1, np.rint(np.exp(np.log(24) + 0.6 * z[:, 1]))).astype(np.int64)
    return s, o


def test_trajectory_sums_to_g_and_lasts_its_iterations():
    rng = np.random.default_rng(1)
    for s, o, chunk in zip(rng.integers(1, 400, 100), rng.integers(1, 60, 100), rng.integers(1, 130, 100)):
        path = trajectory(int(s), int(o), int(chunk))
        assert path.sum() == lifetime_memory(s, o, chunk)
        assert len(path) == iterations(s, o, chunk)
        assert path[-1] == s + o and (np.diff(path) > 0).all()
    assert trajectory(10, 3, 4).tolist() == [4, 8, 10, 11, 12, 13]


def test_memory_accounting_equals_sum_of_g_once_drained():
    s, o = correlated_lengths()
    sim = simulate(s, o, rate=3.0, m_tokens=2_000, chunk=32, iteration_s=0.01, horizon_s=60, seed=3, drain=True)
    assert sim.completed == sim.arrivals > 100
    assert sim.token_iterations == sim.admitted_g  # Σ_k F[k] = Σ g(s, o) over every request
    assert sim.final_queue == 0


def test_kv_memory_and_sequence_cap_are_never_exceeded():
    s, o = correlated_lengths()
    sim = simulate(s, o, rate=50.0, m_tokens=3_000, chunk=64, iteration_s=0.01, horizon_s=30, max_seqs=5, seed=0)
    assert len(sim.kv_tokens) == sim.iterations  # short run: every iteration sampled
    assert sim.kv_tokens.max() <= 3_000
    assert sim.running.max() == 5


def test_one_request_at_a_time_by_hand():
    """M holds exactly one request (s = 4, o = 2, ŝ = 4): each lasts 3 iterations (one prefill, two
    decodes), so a saturated worker completes one request per 3 iterations, below μ = 6 / (b̄ · 15):
    the whole memory is the slack δ = 1."""
    b = 0.1
    sim = simulate(np.array([4]), np.array([2]), rate=100.0, m_tokens=6, chunk=4, iteration_s=b, horizon_s=60)
    assert sim.throughput == pytest.approx(1 / (3 * b), rel=0.01)
    assert sim.kv_tokens[:6].tolist() == [4, 5, 6, 4, 5, 6]
    assert service_rate(6, b, lifetime_memory(4, 2, 4)) == pytest.approx(4.0)


def test_queue_bounded_below_mu_and_growing_linearly_above():
    s, o = correlated_lengths()
    m_tokens, chunk, b = 20_000, 64, 0.01
    mu = service_rate(m_tokens, b, lifetime_memory(s, o, chunk).mean())
    horizon = 20_000 / mu
    below = simulate(s, o, rate=0.8 * mu, m_tokens=m_tokens, chunk=chunk, iteration_s=b, horizon_s=horizon, seed=1)
    above = simulate(s, o, rate=1.2 * mu, m_tokens=m_tokens, chunk=chunk, iteration_s=b, horizon_s=horizon, seed=1)
    # below μ: the queue stays small and flat, and the worker keeps up with the arrivals
    assert below.max_queue < 0.02 * below.arrivals
    assert abs(below.queue_slope) < 0.02 * mu
    assert below.throughput == pytest.approx(0.8 * mu, rel=0.05)
    # above μ: the worker is saturated at about μ and the queue grows at about λ − μ = 0.2μ
    assert above.throughput == pytest.approx(mu, rel=0.05)
    assert above.queue_slope == pytest.approx(0.2 * mu, rel=0.2)
    assert above.final_queue > 0.1 * above.arrivals
    assert above.kv_utilisation > 0.95
    half = len(above.queue) // 2  # linear: the second half of the horizon adds as much as the first
    assert above.queue[-1] - above.queue[half] == pytest.approx(above.queue[half], rel=0.25)


def test_sequence_cap_binds_at_its_bound():
    s, o = correlated_lengths()
    b, chunk = 0.01, 64
    bound = concurrency_bound(4, b, iterations(s, o, chunk).mean())
    sim = simulate(s, o, rate=1.5 * bound, m_tokens=10**7, chunk=chunk, iteration_s=b, horizon_s=20_000 / bound,
                   max_seqs=4, seed=2)
    assert sim.throughput == pytest.approx(bound, rel=0.05)
