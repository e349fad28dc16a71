"""Demo-shaped budgeted-LoRA students for timing `compress` and `bench` without a training run.

Takes a built student (e.g. `bltool build-student --teacher smollm2-135m --mode mixed --layers 6`),
injects gated LoRA (rank 128, α 256) on all 7 projections, drives the real BudgetController to each
final budget F over --steps steps (docs/method.md §3), and writes each result as a distill-style artifact
(`stage: distill`, `method: budgeted-lora`, adapters / budget / compute sections) that `bltool compress`
takes like the output of `bltool distill`.

The LoRA factors are RANDOM and UNTRAINED (A as nn.Linear initialises it, B ~ N(0, 0.02²), gates at
their initial g ≈ 0.98, so every rank is kept): the students' outputs are meaningless and only their
shapes, forms and speed are. The compute section's `proxy` is docs/method.md §7's formula; its `realised`
value is simulated from the controller's trajectory (dense MACs of the modules with ρ > 0 at each step,
forward + input-gradient = 2 passes, plus 3 passes of LoRA), not measured from a training run.

    .venv/bin/python benchmarks/demo_students.py runs/student --out runs \
        --budget 0.4 --budget 0.0
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bltool.adapt.adapters import adapter_section, save_adapted
from bltool.adapt.lora import LoRASpec, inject_lora
from bltool.artifacts import artifact_ref, atomic_output, read_manifest, write_manifest
from bltool.models.loading import load_model, load_tokenizer, resolve_model
from bltool.train.budget import BudgetConfig, BudgetController, scheduled_mean_retention


def build(student: Path, out: Path, budget: float, steps: int, rank: int, seed: int) -> Path:
    ref = resolve_model(str(student), flag="STUDENT")
    model = load_model(ref, flag="STUDENT")
    tokenizer = load_tokenizer(ref)
    spec = LoRASpec(rank=rank, alpha=2.0 * rank, dropout=0.0)
    adapted = inject_lora(model, spec)
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, m in adapted:
            m.lora_B.normal_(0.0, 0.02)
    costs = [m.dense_macs for _, m in adapted]
    lora = sum(m.lora_macs for _, m in adapted)
    dense = sum(costs)
    config = BudgetConfig(budget)
    controller = BudgetController(costs, config, steps)
    executed = 0
    for _ in range(steps):
        executed += sum(c for c, r in zip(costs, controller.rho) if r > 0)  # this step's dense matmuls
        controller.step()
    for (_, m), rho in zip(adapted, controller.rho):
        m.set_rho(rho)
    rho_bar = scheduled_mean_retention(budget, config.decay_start, config.decay_end)
    compute = {
        "proxy": (2 * dense * rho_bar + 3 * lora) / (3 * dense),
        "realised": (2 * executed / steps + 3 * lora) / (3 * dense),
        "dense_macs_executed": 2 * executed,
        "dense_macs_kd_full": 3 * dense * steps,
        "note": "synthetic demo student: realised is simulated from the controller trajectory, not measured",
    }
    target = out / f"bl-{budget:.1f}"
    with atomic_output(target, overwrite=True) as tmp:
        save_adapted(tmp, model, tokenizer)
        write_manifest(
            tmp, "distill",
            config={"method": "budgeted-lora", "budget": budget, "steps": steps, "rank": rank, "seed": seed,
                    "synthetic": "random untrained LoRA factors (benchmarks/demo_students.py); speed only"},
            inputs=[artifact_ref(student, read_manifest(student, None, "STUDENT"), "student")],
            adapters=adapter_section(spec, adapted),
            budget={"budget": budget, "decay_start": config.decay_start, "decay_end": config.decay_end,
                    "beta": config.beta, "tau_drop": config.tau_drop},
            compute=compute,
        )
    dropped = sum(r == 0.0 for r in controller.rho)
    print(f"{target}: F={budget}, {dropped}/{len(adapted)} modules at ρ = 0, proxy {compute['proxy']:.2f}, "
          f"realised (simulated) {compute['realised']:.2f}")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("student", type=Path, help="a build-student output directory")
    parser.add_argument("--out", type=Path, required=True, help="directory for bl-<F> artifacts")
    parser.add_argument("--budget", type=float, action="append", required=True, help="final budget F (repeatable)")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for budget in args.budget:
        build(args.student, args.out, budget, args.steps, args.rank, args.seed)


if __name__ == "__main__":
    main()
