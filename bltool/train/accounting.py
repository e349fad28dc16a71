"""Training compute of the adapted modules (docs/method.md §7): the proxy (3D, 2D + 3L, 2D·ρ̄ + 3L,
normalised so that kd-full is 1) and `ComputeMeter`, which counts step by step the dense MACs a run
actually executed (`realised`, normalised the same way).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bltool.train.budget import scheduled_mean_retention


@dataclass(frozen=True)
class ComputeProxy:
    """A method's training compute per token over the adapted linears (a `bltool.train.methods` entry's)."""

    dense_passes: int  # 3 when the dense weights train (forward, activation and weight backward), else 2
    scheduled: bool  # the dense cost follows the budget schedule's mean retention ρ̄ (else ρ = 1)

    def proxy(self, dense: int, lora: int, budget: float | None = None, decay_start: float = 0.1,
              decay_end: float = 0.3) -> float:
        """docs/method.md §7's training-compute proxy, normalised to kd-full = 1."""
        rho_bar = scheduled_mean_retention(budget, decay_start, decay_end) if self.scheduled else 1
        return (self.dense_passes * dense * rho_bar + 3 * lora) / (3 * dense)


@dataclass
class ComputeMeter:
    """Accumulates, per step, the tokens processed and the dense MACs the adapted modules executed."""

    rule: ComputeProxy  # the method's
    costs: list[int]  # c_m per adapted module (dense MACs per token)
    lora: int  # L: LoRA MACs per token at full rank, summed over modules (0 for kd-full)
    tokens: int = 0
    dense_forward_macs: int = 0  # Σ tokens · Σ_{m computed} c_m
    steps: int = field(default=0)

    @property
    def dense(self) -> int:
        return sum(self.costs)

    def add(self, tokens: int, rho: list[float] | None) -> None:
        """One step of `tokens` tokens with retention `rho` (None: every dense matmul runs)."""
        active = self.dense if rho is None else sum(c for r, c in zip(rho, self.costs) if r > 0)
        self.tokens += int(tokens)
        self.dense_forward_macs += int(tokens) * active
        self.steps += 1

    def summary(self, budget: float | None = None, decay_start: float = 0.1, decay_end: float = 0.3) -> dict:
        dense, lora = self.dense, self.lora
        executed = self.rule.dense_passes * self.dense_forward_macs
        lora_total = 3 * lora * self.tokens
        full = 3 * dense * self.tokens
        return {
            "proxy": self.rule.proxy(dense, lora, budget, decay_start, decay_end),
            "realised": (executed + lora_total) / full if full else None,
            "dense_fraction_executed": self.dense_forward_macs / (dense * self.tokens) if self.tokens else None,
            "dense_macs_executed": executed,
            "lora_macs": lora_total,
            "dense_macs_kd_full": full,
            "adapted_dense_macs_per_token": dense,
            "lora_macs_per_token": lora,
            "tokens": self.tokens,
            "note": "adapted linears only, forward + backward MACs; normalised so that kd-full is 1",
        }

    def state_dict(self) -> dict:
        return {"tokens": self.tokens, "dense_forward_macs": self.dense_forward_macs, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.tokens = int(state["tokens"])
        self.dense_forward_macs = int(state["dense_forward_macs"])
        self.steps = int(state["steps"])
