"""docs/method.md §7 reproduced through the real controller and the real compression code: the paper's
student shape (6 layers, d 768, ff 3072, 12 heads / 3 KV heads of 64, LoRA rank 128 on all 42
projections) with random weights, driven to F = 0.4 / 0 / 0.8 in 80 steps, then compressed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bltool.adapt.compression import CompressionPolicy, compress_model
from bltool.adapt.compression import summarize as summarize_records
from bltool.adapt.lora import LoRASpec, inject_lora
from bltool.adapt.lowrank import LowRankLinear
from bltool.train.budget import BudgetConfig, BudgetController

D, FF, HEADS, KV_HEADS, HEAD_DIM, LAYERS = 768, 3072, 12, 3, 64, 6


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(D, HEADS * HEAD_DIM, bias=False)
        self.k_proj = nn.Linear(D, KV_HEADS * HEAD_DIM, bias=False)
        self.v_proj = nn.Linear(D, KV_HEADS * HEAD_DIM, bias=False)
        self.o_proj = nn.Linear(HEADS * HEAD_DIM, D, bias=False)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj = nn.Linear(D, FF, bias=False)
        self.up_proj = nn.Linear(D, FF, bias=False)
        self.down_proj = nn.Linear(FF, D, bias=False)


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn, self.mlp = Attention(), MLP()


def paper_student(budget: float, steps: int = 80):
    """The paper-shape projections with random weights and LoRA factors, ρ set by the budget controller."""
    torch.manual_seed(0)
    with torch.device("meta"):  # built without initialising, then filled with random values below
        model = nn.Module()
        model.layers = nn.ModuleList(Layer() for _ in range(LAYERS))
    model = model.to_empty(device="cpu")
    adapted = inject_lora(model, LoRASpec(rank=128, alpha=256.0, dropout=0.0))
    with torch.no_grad():
        for _, m in adapted:
            m.base.weight.normal_(0.0, 0.02)
            m.lora_B.normal_(0.0, 0.02)
    controller = BudgetController([m.dense_macs for _, m in adapted], BudgetConfig(budget), steps)
    for _ in range(steps):
        controller.step()
    for (_, m), rho in zip(adapted, controller.rho):
        m.set_rho(rho)
    return model, adapted


@pytest.mark.parametrize("budget, kept, svd, dropped, speedup", [
    (0.4, 9, 0, 33, 1.74),
    (0.0, 0, 0, 42, 4.05),
    (0.8, 17, 1, 24, None),  # docs/method.md gives the counts only
])
def test_paper_student_forms_and_mac_speedup(budget, kept, svd, dropped, speedup):
    model, adapted = paper_student(budget)
    records = compress_model(model, CompressionPolicy())
    summary = summarize_records(records)
    assert (summary["kept"], summary["svd"], summary["dropped"]) == (kept, svd, dropped)
    assert summary["modules"] == 42 and summary["multiplied_out"] == 0
    if speedup is not None:
        assert round(summary["mac_speedup"], 2) == speedup
    # the accounting is what the deployed modules actually hold
    deployed = [model.get_submodule(r["name"]) for r in records]
    assert sum(r["macs"] for r in records) == sum(
        m.macs if isinstance(m, LowRankLinear) else m.in_features * m.out_features for m in deployed)
    assert sum(r["params"] for r in records) == sum(p.numel() for p in model.parameters())
    assert all(isinstance(m, LowRankLinear) == (r["form"] != "keep") for m, r in zip(deployed, records))
    # gates start at g ≈ 0.98 ≥ τ_rank, so every dropped module keeps all 128 LoRA ranks
    assert all(r["kept_rank"] == 128 for r in records)
    assert summary["dense_macs"] == LAYERS * (2 * D * D + 2 * D * KV_HEADS * HEAD_DIM + 3 * D * FF)


def test_paper_student_dropped_modules_are_the_cheap_ones_first():
    _, adapted = paper_student(0.4)
    rho = {name.rsplit(".", 1)[-1]: m._rho for name, m in adapted}  # the last layer's, by kind
    assert rho["k_proj"] == rho["v_proj"] == rho["q_proj"] == rho["o_proj"] == 0.0
