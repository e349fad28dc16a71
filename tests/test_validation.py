"""The measured-server check's pieces by hand: offered loads and the fit's error on a live run."""

from __future__ import annotations

import numpy as np
import pytest

from bltool.serve.iteration import IterationModel
from bltool.serve.validation import fit_error, offered_loads, server_spec
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
