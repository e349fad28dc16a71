"""Peak memory of the KD loss (docs/method.md §4), forward + backward: full logits vs fused.

Shapes default to the demo teacher's (SmolLM2-135M: hidden 576, vocabulary 49152) at batch 2 × 1024.
Each variant runs in a fresh subprocess so that no allocator cache or earlier peak carries over:

  naive          both models' full (B, T, V) float32 logits, then `kd_loss_reference` (autograd)
  fused          `kd_loss`: per-chunk heads, loss and gradients in one pass; nothing (B, T, V) is kept

On CUDA the figure is `torch.cuda.max_memory_allocated` above what was allocated before the loss
(inputs, heads). On CPU it is the growth of the process's peak resident set (`ru_maxrss`) over its
resident set just before the loss, with glibc's mmap threshold fixed at 1 MiB so that freed tensors
leave the resident set at once; it still includes some allocator slack, so read it as approximate.
Both include the student head's weight gradient (V × d float32).

    .venv/bin/python benchmarks/kd_loss_memory.py [--device cuda] [--chunk 512]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

VARIANTS = ("naive", "fused")


def rss_mib() -> float:
    """Current resident set of this process in MiB (Linux)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


def measure(args) -> dict:
    """Run one variant once in this process and return its peak memory above the baseline (MiB)."""
    import torch

    from bltool.train.losses import kd_loss, kd_loss_reference

    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    head_s = torch.nn.Linear(args.hidden, args.vocab, bias=False, device=dev, dtype=dtype)
    head_t = torch.nn.Linear(args.hidden, args.vocab, bias=False, device=dev, dtype=dtype).requires_grad_(False)
    h_s = torch.randn(args.batch, args.seq, args.hidden, device=dev, dtype=dtype, requires_grad=True)
    h_t = torch.randn(args.batch, args.seq, args.hidden, device=dev, dtype=dtype)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=dev)
    mask = torch.ones_like(ids)

    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base, peak_before = rss_mib(), peak_rss_mib()
    start = time.perf_counter()
    if args.variant == "naive":
        z_s = head_s(h_s).float()  # (B, T, V) float32
        with torch.no_grad():
            z_t = head_t(h_t).float()  # (B, T, V) float32
        out = kd_loss_reference(z_s, z_t, ids, mask)
    else:
        out = kd_loss(h_s, h_t, head_s, head_t, ids, mask, chunk=args.chunk)
    out.loss.backward()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20 - base
        note = ""
    else:
        peak = peak_rss_mib() - base
        note = "" if peak_rss_mib() > peak_before else "peak set before the loss: lower bound"
    return {"variant": args.variant, "peak_mib": round(peak, 1), "seconds": round(time.perf_counter() - start, 2),
            "loss": round(out.loss.item(), 6), "note": note}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", help="hidden states and heads (logits are float32 either way)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--chunk", type=int, default=512, help="tokens (rows × positions) per LM-head chunk")
    p.add_argument("--variant", choices=VARIANTS, help="run one variant in this process and print JSON")
    args = p.parse_args()
    if args.variant:
        print(json.dumps(measure(args)))
        return

    logits_mib = args.batch * args.seq * args.vocab * 4 / 2**20
    print(f"KD loss fwd+bwd, B={args.batch} T={args.seq} V={args.vocab} d={args.hidden} {args.dtype} "
          f"on {args.device}, chunk={args.chunk}; one model's (B, T, V) fp32 logits = {logits_mib:.0f} MiB")
    print(f"{'variant':<16}{'peak MiB':>10}{'seconds':>10}{'loss':>12}  note")
    # A fixed mmap threshold: glibc otherwise raises it after each large free (up to 32 MiB), so smaller
    # chunks' freed logits stay in the heap and RSS would count them long after they died.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    rows = []
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--variant", variant] + sys.argv[1:]
        proc = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
        row = json.loads(proc.stdout.splitlines()[-1])
        rows.append(row)
        print(f"{variant:<16}{row['peak_mib']:>10.0f}{row['seconds']:>10.2f}{row['loss']:>12.6f}  {row['note']}")
    naive = rows[0]["peak_mib"]
    for row in rows[1:]:
        print(f"{row['variant']}: {row['peak_mib'] / naive:.2f}× the naive peak")


if __name__ == "__main__":
    main()
