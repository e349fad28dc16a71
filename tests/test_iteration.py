"""b(p, d): the affine iteration-time fit, by hand."""

from __future__ import annotations

import numpy as np
import pytest

from bltool.serve.iteration import IterationModel, fit


def test_fit_recovers_known_coefficients_and_reports_its_error():
    rng = np.random.default_rng(0)
    p = rng.integers(0, 512, size=400)
    d = rng.integers(0, 32, size=400)
    noise = rng.normal(0, 1e-4, size=400)
    y = 0.004 + 2e-5 * p + 3e-4 * d + noise
    model = fit(p, d, y)
    assert model.intercept_s == pytest.approx(0.004, rel=0.02)
    assert model.prefill_token_s == pytest.approx(2e-5, rel=0.02)
    assert model.decode_seq_s == pytest.approx(3e-4, rel=0.02)
    assert model.records == 400
    assert model.rmse_s == pytest.approx(1e-4, rel=0.15)
    assert model.r2 > 0.99 and model.mean_abs_rel_error < 0.02
    assert float(model.seconds(100, 4)) == pytest.approx(model.intercept_s + 100 * model.prefill_token_s
                                                         + 4 * model.decode_seq_s)
    assert IterationModel.from_dict(model.as_dict()) == model


def test_a_slope_the_data_contradicts_is_zero_not_negative():
    rng = np.random.default_rng(1)
    p = rng.integers(0, 512, size=200)
    d = rng.integers(0, 32, size=200)
    y = 0.01 + 1e-5 * p - 1e-4 * d  # more decode sequences "faster": noise a fit must not believe
    model = fit(p, d, y)
    assert model.decode_seq_s == 0.0
    assert model.prefill_token_s > 0
    # refitted without the contradicted feature: the intercept absorbs it
    assert model.intercept_s == pytest.approx(0.01 - 1e-4 * d.mean(), rel=0.05)


def test_a_negative_intercept_is_zero_and_the_slopes_refitted_through_the_origin():
    """Iterations that all did much work can put the least-squares line below zero at no work (seen on a
    busy machine: -0.2 s); an iteration takes no negative time, and the simulator refuses such a model."""
    rng = np.random.default_rng(2)
    p = rng.integers(200, 256, size=200)
    d = rng.integers(0, 4, size=200)
    y = -0.05 + 4e-4 * p + 1e-3 * d + rng.normal(0, 1e-4, size=200)
    model = fit(p, d, y)
    assert model.intercept_s == 0.0 and model.prefill_token_s > 0 and model.decode_seq_s >= 0
    design = np.column_stack([p, d]).astype(float)  # the through-the-origin least squares, by hand
    expected, *_ = np.linalg.lstsq(design, y, rcond=None)
    assert [model.prefill_token_s, model.decode_seq_s] == pytest.approx(expected.tolist(), rel=1e-9)


def test_a_fit_that_would_give_an_iteration_no_time_is_the_constant_mean():
    """A negative intercept and a contradicted slope: through the origin, a one-token prefill iteration
    would take 0 s (the simulator refuses such a model; seen on vLLM on a busy machine): the mean instead."""
    rng = np.random.default_rng(3)
    p = rng.integers(200, 256, size=200)
    d = rng.integers(0, 4, size=200)
    y = -0.05 - 1e-4 * p + 0.1 * d + rng.normal(0, 1e-3, size=200)
    model = fit(p, d, y)
    assert model.is_constant and model.intercept_s == pytest.approx(float(y.mean()))
    assert float(model.seconds(1, 0)) > 0 and float(model.seconds(0, 1)) > 0


def test_a_feature_that_never_varies_gets_no_slope():
    model = fit([0, 0, 0, 0], [4, 4, 4, 4], [0.010, 0.012, 0.011, 0.013])
    assert model.prefill_token_s == 0.0 and model.decode_seq_s == 0.0
    assert model.intercept_s == pytest.approx(0.0115)
    assert model.is_constant and model.r2 == pytest.approx(0.0, abs=1e-9)


def test_fit_refuses_too_few_records():
    with pytest.raises(ValueError, match="at least 3"):
        fit([1, 2], [1, 2], [0.1, 0.2])
    assert IterationModel.constant(0.05).is_constant
    assert float(IterationModel.constant(0.05).seconds(1000, 64)) == 0.05


def test_fit_recovers_the_attention_term():
    rng = np.random.default_rng(2)
    p = rng.integers(0, 264, size=300)
    d = rng.integers(0, 9, size=300)
    k = rng.integers(0, 2560, size=300)
    y = 0.04 + 3e-4 * p + 5e-4 * d + 1e-7 * (p + d) * k + rng.normal(0, 1e-4, size=300)
    model = fit(p, d, y, k)
    assert model.attention_s == pytest.approx(1e-7, rel=0.05)
    assert model.prefill_token_s == pytest.approx(3e-4, rel=0.05)
    assert float(model.seconds(100, 4, 1000)) == pytest.approx(0.04 + 0.03 + 0.002 + 1e-7 * 104 * 1000, rel=0.02)
    assert fit(p, d, y).attention_s == 0.0  # without KV records there is no attention term
