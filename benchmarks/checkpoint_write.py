"""How long `distill` takes to write a checkpoint, the part of the grace time a preempted job needs
besides finishing its micro-batch (README, "Preemption"; docs/reliability.md).

Builds the run's trainable state as `distill` does (the student with LoRA of --rank on the seven
projections, AdamW state after one step), then times `trainstate.save` (warm-up, median of repeats),
into a directory next to --out.

    .venv/bin/python benchmarks/checkpoint_write.py runs/demo/student --rank 128 --out runs/ckpt-bench
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import torch

import bltool
from bltool.adapt.lora import LoRASpec, inject_lora
from bltool.serve.timing import machine_info
from bltool.train import trainstate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("student")
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--method", choices=("kd-lora", "kd-full"), default="kd-lora")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    model = bltool.load_model(args.student)
    if args.method == "kd-lora":
        inject_lora(model, LoRASpec(rank=args.rank, alpha=2.0 * args.rank, gated=True))
    else:
        model.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    rng = trainstate.rng_tensors([trainstate.local_rng_state()])
    out = Path(args.out)
    seconds = []
    for i in range(args.repeats + 1):
        began = time.perf_counter()
        trainstate.save(out, model, optimizer, rng, {"step": i}, {"benchmark": True})
        if i:  # the first write is the warm-up
            seconds.append(time.perf_counter() - began)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    shutil.rmtree(out)
    print(json.dumps({
        "student": args.student, "method": args.method, "rank": args.rank,
        "trainable_parameters": sum(p.numel() for p in params), "checkpoint_mib": round(size / 2**20, 1),
        "write_s_median": round(statistics.median(seconds), 3), "write_s_max": round(max(seconds), 3),
        "repeats": args.repeats, "machine": machine_info("cpu"),
    }, indent=2))


if __name__ == "__main__":
    main()
