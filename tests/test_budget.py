"""Budget schedule and controller (docs/method.md §3), including the paper-shape figures of §3 and §7."""

from __future__ import annotations

import math
import random

import pytest

from bltool.errors import UsageError
from bltool.train.budget import (
    BudgetConfig,
    BudgetController,
    scheduled_mean_retention,
    settle_steps,
    target_fraction,
)

D, FF, KV = 768, 3072, 192
PAPER_LAYER = [D * D, D * KV, D * KV, D * D, D * FF, D * FF, D * FF]  # q k v o gate up down
PAPER_COSTS = PAPER_LAYER * 6


def run(costs, budget, steps, **kw):
    controller = BudgetController(costs, BudgetConfig(budget, **kw), steps)
    log = [controller.step() for _ in range(steps)]
    return controller, log


def forms(rho, tau_drop=0.05, tau_svd=0.5):
    keep = sum(r >= tau_svd for r in rho)
    drop = sum(r < tau_drop for r in rho)
    return keep, len(rho) - keep - drop, drop


def test_target_fraction_schedule():
    assert target_fraction(0.0, 0.4, 0.1, 0.3) == 1.0
    assert target_fraction(0.1, 0.4, 0.1, 0.3) == 1.0
    assert target_fraction(0.2, 0.4, 0.1, 0.3) == pytest.approx(0.4 + 0.6 * 0.5)  # cosine midpoint
    assert target_fraction(0.15, 0.4, 0.1, 0.3) == pytest.approx(0.4 + 0.6 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert target_fraction(0.3, 0.4, 0.1, 0.3) == 0.4
    assert target_fraction(0.9, 0.0, 0.1, 0.3) == 0.0
    values = [target_fraction(i / 100, 0.2, 0.1, 0.3) for i in range(101)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # non-increasing


def test_target_follows_schedule_and_cost_settles_within_it():
    controller, log = run(PAPER_COSTS, 0.4, 200)
    for entry in log:
        assert entry["target_fraction"] == pytest.approx(target_fraction(entry["step"] / 200, 0.4, 0.1, 0.3))
    assert log[-1]["actual_fraction"] <= 0.4 + 1e-6  # geometric approach: 0.9^140 of the gap left
    assert log[-1]["actual_fraction"] == pytest.approx(0.4, abs=1e-6)
    # smoothing lags the target but closes on it: never more than the lag of a cosine step above
    assert all(e["actual_fraction"] >= e["target_fraction"] - 1e-9 for e in log)


@pytest.mark.parametrize("budget, steps, expected", [
    (0.4, 80, (9, 0, 33)),   # docs/method.md §3 / §7: F = 0.4 → 9 kept, 33 dropped
    (0.0, 80, (0, 0, 42)),   # F = 0 → all 42 dropped
    (0.8, 80, (17, 1, 24)),  # F = 0.8 → 17 kept, 1 SVD, 24 dropped
    (0.4, 20, (9, 33, 0)),   # too short: 33 modules stuck in the SVD band
])
def test_paper_shape_module_forms(budget, steps, expected):
    controller, _ = run(PAPER_COSTS, budget, steps)
    assert forms(controller.rho) == expected


def test_ascending_cost_with_registration_order_ties():
    costs = [30, 10, 20, 10, 40]  # modules 1 and 3 tie at the lowest cost
    controller = BudgetController(costs, BudgetConfig(0.9, decay_start=0.0, decay_end=1e-9, beta=0.0,
                                                      tau_drop=0.0), 10)
    assert controller.order == [1, 3, 2, 0, 4]
    controller.step()  # target 0.9 · 110 = 99: remove 11 → module 1 to 0, module 3 loses 1
    assert controller.rho == pytest.approx([1.0, 0.0, 1.0, 0.9, 1.0])


def test_rho_never_rises_and_clamps():
    rng = random.Random(0)
    costs = [rng.randint(1, 100) for _ in range(30)]
    controller = BudgetController(costs, BudgetConfig(0.3), 100)
    previous = list(controller.rho)
    for _ in range(100):
        controller.step()
        assert all(now <= before + 1e-12 for now, before in zip(controller.rho, previous))
        assert all(r == 0.0 or r >= 0.05 for r in controller.rho)  # nothing in (0, τ_drop)
        previous = list(controller.rho)


def test_budget_one_keeps_everything():
    controller, log = run(PAPER_COSTS, 1.0, 50)
    assert controller.rho == [1.0] * 42 and log[-1]["modules_dropped"] == 0


def test_computed_fraction_counts_only_nonzero_modules():
    controller, log = run(PAPER_COSTS, 0.0, 80)
    assert log[-1]["computed_fraction"] == 0.0 and log[-1]["modules_dropped"] == 42
    controller, log = run(PAPER_COSTS, 0.4, 80)
    kept_cost = sum(c for r, c in zip(controller.rho, PAPER_COSTS) if r > 0)
    assert log[-1]["computed_fraction"] == pytest.approx(kept_cost / sum(PAPER_COSTS))


def test_state_round_trip_continues_identically():
    a, _ = run(PAPER_COSTS, 0.4, 100)
    b = BudgetController(PAPER_COSTS, BudgetConfig(0.4), 100)
    for _ in range(37):
        b.step()
    c = BudgetController(PAPER_COSTS, BudgetConfig(0.4), 100)
    c.load_state_dict(b.state_dict())
    for _ in range(63):
        c.step()
    assert c.rho == a.rho and c.step_count == 100
    with pytest.raises(ValueError):
        c.load_state_dict({"rho": [1.0], "step_count": 0})


def test_settle_steps_and_short_run_warning():
    assert settle_steps(0.9, 0.05) == 29  # log(0.05)/log(0.9) = 28.4
    assert BudgetConfig(0.4).short_run_warning(20) is not None
    assert BudgetConfig(0.4).short_run_warning(80) is None
    assert BudgetConfig(1.0).short_run_warning(5) is None


def test_scheduled_mean_retention_matches_paper_proxy():
    # docs/method.md §7: budgeted proxy 2D·ρ̄ + 3L over kd-full 3D; paper student → 0.59 (F=0.4), 0.38 (F=0)
    dense = sum(PAPER_COSTS)
    lora = sum(128 * (a + b) for a, b in [(D, D), (D, KV), (D, KV), (D, D), (D, FF), (D, FF), (FF, D)]) * 6
    for budget, expected in ((0.4, 0.59), (0.0, 0.38)):
        proxy = (2 * dense * scheduled_mean_retention(budget, 0.1, 0.3) + 3 * lora) / (3 * dense)
        assert round(proxy, 2) == expected
    assert round((2 * dense + 3 * lora) / (3 * dense), 2) == 0.91  # kd-lora


@pytest.mark.parametrize("kwargs, flag", [
    ({"budget": 1.5}, "--budget"), ({"budget": -0.1}, "--budget"),
    ({"budget": 0.4, "decay_start": 0.3, "decay_end": 0.3}, "--decay-start"),
    ({"budget": 0.4, "decay_start": 0.5, "decay_end": 0.2}, "--decay-start"),
    ({"budget": 0.4, "beta": 1.0}, "--rho-ema"), ({"budget": 0.4, "tau_drop": 1.0}, "--tau-drop"),
])
def test_config_validation_names_the_flag(kwargs, flag):
    with pytest.raises(UsageError, match=flag):
        BudgetConfig(**kwargs)
