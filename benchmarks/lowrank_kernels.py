"""Speed target of the low-rank kernels: measured compressed-module speedup against the MAC ratio, per kernel.

Times every adapted module of a compressed student against the same-named dense module of its baseline
(`bltool.stages.bench.bench_modules`: same inputs, warm-up, median of repeats, dense and compressed
interleaved), once per low-rank kernel (`bltool.adapt.lowrank`: linear | mm | compile), at the prefill shape
(1 × --prefill-tokens) and decode shapes (B × 1). Target: at prefill, Σ dense time / Σ compressed time
≥ 95% of the MAC ratio; at decode batch 1, ≥ 75% of the weight-bytes ratio. The low-rank members of a
group (q/k/v, gate/up) share one down GEMM (`bltool.adapt.lowrank.LowRankGroup`): each group is timed as it
runs (`speedup`) and with each member computing alone beside it (`ungrouped`), interleaved.

`--paper-shape` adds the paper's student (6 layers, d 768, ff 3072, 3 KV heads of 64) with all 42
modules dropped to rank-128 factors (MAC ratio 4.05), built directly from random weights, grouped as a
compressed student's are.

    .venv/bin/python benchmarks/lowrank_kernels.py runs/bl-0.0-c --baseline runs/student \
        --paper-shape --json runs/kernels.json
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from torch import nn

from bltool.adapt.lowrank import LowRankLinear, group_layers, set_kernel
from bltool.models.devices import resolve_device, resolve_dtype
from bltool.models.loading import load_model, resolve_model
from bltool.serve.timing import machine_info
from bltool.stages.bench import BenchConfig, bench_modules, compared_modules, summarize_modules

PAPER = {"q_proj": (768, 768), "k_proj": (768, 192), "v_proj": (768, 192), "o_proj": (768, 768),
         "gate_proj": (768, 3072), "up_proj": (768, 3072), "down_proj": (3072, 768)}


def paper_pair(rank: int, dtype, device):
    """(dense, compressed) module trees with the paper's 42 projections; compressed = all dropped."""
    dense, low = nn.Module(), nn.Module()
    entries = []
    for i in range(6):
        for name, (d_in, d_out) in PAPER.items():
            path = f"l{i}_{name}"
            setattr(dense, path, nn.Linear(d_in, d_out, bias=False, device=device, dtype=dtype))
            setattr(low, path, LowRankLinear(d_in, d_out, rank, device=device, dtype=dtype))
            entries.append({"name": path, "form": "drop", "layout": "lowrank"})
        for members in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            group_layers([getattr(low, f"l{i}_{name}") for name in members])
    return dense, low, entries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a compressed student (bltool compress output)")
    parser.add_argument("--baseline", required=True, help="its dense student")
    parser.add_argument("--kernels", default="linear,mm,compile")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--prefill-tokens", type=int, default=2048)
    parser.add_argument("--decode-batch", default="1,8,32")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--paper-shape", action="store_true")
    parser.add_argument("--json", help="write all results here")
    args = parser.parse_args()

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    config = BenchConfig(model=args.model, baseline=args.baseline, prefill_tokens=args.prefill_tokens,
                         decode_batch=tuple(int(b) for b in args.decode_batch.split(",")),
                         warmup=args.warmup, repeats=args.repeats)
    ref = resolve_model(args.model)
    model = load_model(ref, dtype=dtype, device=device)
    baseline = load_model(resolve_model(args.baseline), dtype=dtype, device=device)
    from bltool.artifacts import read_manifest

    suites = {"student": (baseline, model, compared_modules(model, read_manifest(ref.path)))}
    if args.paper_shape:
        suites["paper-shape"] = paper_pair(128, dtype, device)
    machine = {**machine_info(device), "dtype": str(dtype).replace("torch.", "")}
    print(f"# {machine['device_name']}, {device} {machine['dtype']}, {machine['threads']} threads, "
          f"load {machine.get('load_average')}", file=sys.stderr)
    results = []
    for suite, (dense, low, entries) in suites.items():
        for kernel in args.kernels.split(","):
            resolved = set_kernel(low, kernel)
            with torch.inference_mode():
                rows = bench_modules(low, dense, entries, config, device, dtype)
            for s in summarize_modules(rows):
                results.append({"suite": suite, "kernel": resolved, **s})
                print(f"{suite:12s} {resolved:8s} {s['phase']:7s} {s['batch']:>2}×{s['tokens']:<5} "
                      f"dense {s['dense_s'] * 1e3:8.2f} ms  compressed {s['compressed_s'] * 1e3:8.2f} ms  "
                      f"speedup {s['speedup']:5.2f}×  MAC {s['mac_ratio']:4.2f}×  bytes {s['bytes_ratio']:4.2f}×  "
                      f"{s['fraction_of_bound']:4.0%} of {s['bound']}  ungrouped {s['ungrouped_speedup']:5.2f}× "
                      f"({s['ungrouped_fraction_of_bound']:4.0%})", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"machine": machine, "config": vars(args), "results": results}, handle, indent=2)


if __name__ == "__main__":
    main()
