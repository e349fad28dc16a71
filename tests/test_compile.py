"""`distill --compile`: regional torch.compile (inductor) of the student's decoder layers. The gated linear
recompiles when a module stops its dense matmul, not as ρ moves, and compiled equals eager."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import tiny_config

from bltool.lora import LoRASpec, inject_lora
from bltool.stages.distill import compile_layers
from bltool.train.budget import BudgetConfig, BudgetController

pytestmark = pytest.mark.slow


def _student(layers: int = 2):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", 64, layers, tied=True), dtype=torch.float32)
    adapted = inject_lora(model, LoRASpec(rank=4, alpha=8.0, dropout=0.0, targets=("q_proj", "down_proj")))
    with torch.no_grad():
        for _, m in adapted:
            m.lora_B.normal_(0, 0.02)  # a LoRA path that changes the output
    return model, adapted


def test_compiled_layers_recompile_per_skip_not_per_rho_and_equal_eager():
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager, eager_adapted = _student()
    model, adapted = copy.deepcopy(eager), None
    adapted = [(n, m) for n, m in model.named_modules() if type(m).__name__ == "GatedLoRALinear"]
    assert compile_layers(model) == 2
    steps = 24
    controller = BudgetController([m.dense_macs for _, m in adapted], BudgetConfig(0.0, 0.1, 0.5, 0.5, 0.05), steps)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    distinct_rho = set()
    for _ in range(steps):
        for (_, m), (_, e), rho in zip(adapted, eager_adapted, controller.rho):
            m.set_rho(rho)
            e.set_rho(rho)
        distinct_rho.add(tuple(controller.rho))
        out = model(input_ids=ids).logits
        want = eager(input_ids=ids).logits
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
        out.float().pow(2).mean().backward()  # the backward compiles too
        model.zero_grad(set_to_none=True)
        controller.step()
    assert all(r == 0.0 for r in controller.rho)  # ρ decayed to 0: every module skips its dense matmul
    assert len(distinct_rho) > 10  # ρ took many values ...
    graphs = counters["stats"]["unique_graphs"]
    # ... but each layer only recompiles when one of its 2 modules stops its dense matmul: ≤ 2 × (2 + 1)
    assert 1 <= graphs <= 6, graphs
