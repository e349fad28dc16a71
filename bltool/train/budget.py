"""Budget schedule and controller (docs/method.md §3): the target fraction f(s) (`target_fraction`), the
settings (`BudgetConfig`, with its warning for runs too short for ρ to settle) and `BudgetController`.

The controller works on numbers only: module dense costs c_m = d_in · d_out in registration order, and
their retention coefficients ρ_m; the training loop copies ρ into the modules after each step. Because
it is a pure function of the step count, every data-parallel rank computes the same ρ without
communicating.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from bltool.errors import UsageError


def target_fraction(s: float, budget: float, decay_start: float, decay_end: float) -> float:
    """f(s): 1 until s0, a cosine from 1 down to F between s0 and s1, then F."""
    if s <= decay_start:
        return 1.0
    if s >= decay_end:
        return budget
    phase = (s - decay_start) / (decay_end - decay_start)
    return budget + (1.0 - budget) * 0.5 * (1.0 + math.cos(math.pi * phase))


def settle_steps(beta: float, tau_drop: float) -> int:
    """Steps that smoothing needs to take a module from 1 to below τ_drop: log(τ_drop) / log(β)."""
    return math.ceil(math.log(tau_drop) / math.log(beta)) if 0 < beta < 1 else 1


def scheduled_mean_retention(budget: float, decay_start: float, decay_end: float) -> float:
    """ρ̄ = s0 + (s1 − s0)(1 + F)/2 + (1 − s1) F, the time-average of f(s) (docs/method.md §7)."""
    return decay_start + (decay_end - decay_start) * (1 + budget) / 2 + (1 - decay_end) * budget


@dataclass(frozen=True)
class BudgetConfig:
    budget: float  # --budget F: final fraction of dense cost kept
    decay_start: float = 0.1  # --decay-start s0 (fraction of training)
    decay_end: float = 0.3  # --decay-end s1
    beta: float = 0.9  # --rho-ema β: smoothing of ρ toward its target
    tau_drop: float = 0.05  # --tau-drop: ρ below this is clamped to 0

    def __post_init__(self):
        if not 0.0 <= self.budget <= 1.0:
            raise UsageError(f"--budget must be in [0, 1], got {self.budget}")
        if not 0.0 <= self.decay_start < self.decay_end <= 1.0:
            raise UsageError(
                f"--decay-start must be below --decay-end, both in [0, 1]; got {self.decay_start} and {self.decay_end}"
            )
        if not 0.0 <= self.beta < 1.0:
            raise UsageError(f"--rho-ema must be in [0, 1), got {self.beta}")
        if not 0.0 <= self.tau_drop < 1.0:
            raise UsageError(f"--tau-drop must be in [0, 1), got {self.tau_drop}")

    def short_run_warning(self, total_steps: int) -> str | None:
        """A run with too few steps after s1 leaves modules between τ_drop and τ_svd (docs/method.md §3)."""
        after = total_steps - math.ceil(self.decay_end * total_steps)
        needed = settle_steps(self.beta, self.tau_drop)
        if self.budget < 1.0 and after < needed:
            return (f"only {after} steps follow --decay-end; ρ needs about {needed} (log τ_drop / log β) to settle, "
                    "so some modules may end between --tau-drop and τ_svd and be SVD-compressed instead of dropped")
        return None


class BudgetController:
    """Holds ρ_m for modules of dense cost c_m and moves them toward the scheduled budget."""

    def __init__(self, costs: list[int], config: BudgetConfig, total_steps: int):
        if total_steps < 1:
            raise ValueError("total_steps must be at least 1")
        self.costs = [int(c) for c in costs]
        self.total_cost = sum(self.costs)
        self.config = config
        self.total_steps = total_steps
        self.rho = [1.0] * len(self.costs)
        self.step_count = 0
        # ascending cost; Python's sort is stable, so ties keep registration order
        self.order = sorted(range(len(self.costs)), key=lambda m: self.costs[m])

    def retained_cost(self) -> float:
        return sum(r * c for r, c in zip(self.rho, self.costs))

    def actual_fraction(self) -> float:
        return self.retained_cost() / self.total_cost if self.total_cost else 0.0

    def computed_fraction(self) -> float:
        """Share of dense MACs still executed: modules at ρ = 0 skip their matmul entirely."""
        return sum(c for r, c in zip(self.rho, self.costs) if r > 0) / self.total_cost if self.total_cost else 0.0

    def target(self, step: int) -> float:
        c = self.config
        return target_fraction(step / self.total_steps, c.budget, c.decay_start, c.decay_end)

    def step(self) -> dict:
        """Advance one training step; returns the target and actual fractions after it."""
        self.step_count += 1
        target = self.target(self.step_count)
        goal = target * self.total_cost
        excess = self.retained_cost() - goal
        if excess > 1e-9 * self.total_cost:
            beta, tau = self.config.beta, self.config.tau_drop
            for m in self.order:
                if excess <= 0:
                    break
                cut = min(self.rho[m] * self.costs[m], excess)  # cost removed from module m's target
                if cut <= 0:
                    continue
                excess -= cut
                rho_hat = max(self.rho[m] - cut / self.costs[m], 0.0)
                rho = beta * self.rho[m] + (1.0 - beta) * rho_hat
                self.rho[m] = 0.0 if rho < tau else rho
        return {
            "step": self.step_count,
            "target_fraction": target,
            "actual_fraction": self.actual_fraction(),
            "computed_fraction": self.computed_fraction(),
            "modules_dropped": sum(r == 0.0 for r in self.rho),
        }

    def state_dict(self) -> dict:
        return {"rho": list(self.rho), "step_count": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        if len(state["rho"]) != len(self.costs):
            raise ValueError(f"controller state has {len(state['rho'])} modules, expected {len(self.costs)}")
        self.rho = [float(r) for r in state["rho"]]
        self.step_count = int(state["step_count"])
