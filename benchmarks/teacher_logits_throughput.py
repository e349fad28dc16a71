"""teacher-logits throughput: the stage's per-batch work (teacher forward + top-k statistics) for each way
of running the teacher, side by side in one run.

Variants:
  eager-mkl       float32, eager, every linear through `F.linear` (MKL on x86): BLTOOL_ONEDNN=0
  eager           float32, eager (the CPU default: the teacher's linears through oneDNN, bltool.adapt.kernels)
  compile         float32, `--compile` (regional torch.compile of the teacher's decoder layers)
  bf16            `--dtype bfloat16`, eager
  bf16-compile    `--dtype bfloat16 --compile`

Protocol. Each (variant, round) runs in its own fresh interpreter, which loads the teacher, runs one
warm-up batch (for the compiled variants it includes the compilation, reported apart as
`first_batch_s`) and `--batches` timed batches of the stage's own code path: `collate` → `hidden_states`
→ `teacher_topk_rows` over the predicting positions, under `inference_mode`, exactly as
`bltool teacher-logits` computes a batch (writing the Arrow part is not timed). The rounds run the variants
in an order rotated by one per round; a variant's figure is the median batch time over all its timed
batches; tokens/s is batch tokens ÷ that. The break-even for a compiled variant is the number of tokens
after which its compilation has paid for itself against eager at the same dtype. `÷ float32` sets each
bf16 variant beside its float32 twin (bf16 ÷ eager, bf16-compile ÷ compile).

Model FLOPs and MFU. FLOPs/token = 2·M, M the teacher's forward matmul MACs per token of the timed batches
(`bltool.adapt.compression.macs_per_token`): the seven projections, attention QKᵀ and A·V over each
sequence's mean causal context (L + 1)/2, and the LM head for the predicting positions (L − 1 of L); the
top-k statistics are not counted. MFU = tokens/s × FLOPs/token ÷ the machine's matmul peak for the
variant's dtype, measured in this process at the start of every round, interleaved with the variants, on
the same threads (`bltool.serve.timing.matmul_peak`: the fastest of F.linear and oneDNN on a square
--peak-size GEMM; the median over rounds).

    .venv/bin/python benchmarks/teacher_logits_throughput.py --rounds 3
    .venv/bin/python benchmarks/teacher_logits_throughput.py --smoke     # tiny random teacher, for the tests

Data: the sequences `bltool teacher-logits` would cover first (`covered_sequences`, seed 0) from --data, a
prepare-data output (default: the demo setting, prepared at --seq-len 256 into --work).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {"eager-mkl": ("float32", False), "eager": ("float32", False), "compile": ("float32", True),
            "bf16": ("bfloat16", False), "bf16-compile": ("bfloat16", True)}


def worker(spec: dict) -> dict:
    import torch

    from bltool.adapt.compression import macs_per_token
    from bltool.adapt.kernels import use_onednn
    from bltool.data.prepared import PreparedData
    from bltool.eval.nll import hidden_states
    from bltool.models.compiling import compile_layers
    from bltool.models.loading import load_model, resolve_model
    from bltool.train.batches import PackedSequences, collate
    from bltool.train.teacher_cache import teacher_topk_rows

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    dtype, compiled = VARIANTS[spec["variant"]]
    data = PreparedData.open(Path(spec["data"]))
    train = PackedSequences(data.split_path("train"))
    pad_id = int(data.tokenizer["eos_token_id"])
    teacher = load_model(resolve_model(spec["teacher"]), dtype=getattr(torch, dtype), device="cpu")
    teacher.requires_grad_(False).eval()
    use_onednn(teacher)  # as the stage does (a no-op under BLTOOL_ONEDNN=0)
    if compiled:
        compile_layers(teacher)
    head = teacher.get_output_embeddings()
    b = spec["batch"]
    times, tokens = [], []
    with torch.inference_mode():
        for i in range(1 + spec["batches"]):
            rows = [train[j] for j in range(i * b, (i + 1) * b)]
            began = time.perf_counter()
            ids, mask = collate(rows, pad_id, "cpu")
            hidden = hidden_states(teacher, ids, mask)
            predicting = hidden[:, :-1][mask[:, 1:].bool()]
            teacher_topk_rows(predicting, head, spec["top_k"], 3.0, len(rows) * 256)
            times.append(time.perf_counter() - began)
            tokens.append(sum(len(r) for r in rows))
    lengths = [len(train[j]) for j in range(b, (1 + spec["batches"]) * b)]  # the timed batches' sequences
    macs = macs_per_token(teacher, context=sum(n * (n + 1) / 2 for n in lengths) / sum(lengths),
                          logits_per_token=sum(n - 1 for n in lengths) / sum(lengths))
    return {"variant": spec["variant"], "round": spec["round"], "first_batch_s": times[0], "batch_s": times[1:],
            "tokens_per_batch": tokens[1:], "flops_per_token": 2 * macs["total"], "macs": macs}


def _run_worker(spec: dict) -> dict:
    env = {**os.environ, **({"BLTOOL_ONEDNN": "0"} if spec["variant"] == "eager-mkl" else {})}
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                          timeout=1800, env=env)
    if proc.returncode != 0:
        return {"variant": spec["variant"], "round": spec["round"], "error": proc.stderr[-3000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _smoke_inputs(work: Path) -> tuple[str, str]:
    """A tiny random Llama teacher with a tiny tokenizer and data, built here (no download)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from helpers import save_tiny_model, train_tokenizer, write_corpus

    from bltool.stages import prepare_data

    teacher = save_tiny_model(work / "teacher", train_tokenizer(), "llama", layers=2, tied=True)
    corpus = write_corpus(work / "corpus", n_docs=30)
    data = prepare_data.run(prepare_data.PrepareDataConfig(inputs=(str(corpus),), tokenizer=str(teacher),
                                                           out=str(work / "data"), heldout=0.1, seq_len=32,
                                                           overwrite=True))
    return str(teacher), str(data)


def _demo_data(args) -> str:
    from bltool.stages import prepare_data

    out = Path(args.work) / f"data-{args.seq_len}"
    if not (out / "manifest.json").is_file():
        script = Path(__file__).resolve().parent.parent / "scripts" / "install-corpus.sh"
        corpus = subprocess.run(["bash", str(script)], stdout=subprocess.PIPE, text=True, check=True).stdout.strip()
        prepare_data.run(prepare_data.PrepareDataConfig(inputs=(corpus,), tokenizer=args.teacher, out=str(out),
                                                        heldout=0.02, seq_len=args.seq_len, glob="**/*.rst.txt",
                                                        overwrite=True))
    return str(out)


def measure_peak(size: int, threads: int | None) -> dict:
    """The float32 and bf16 matmul peaks on this process's threads (bltool.serve.timing.matmul_peak)."""
    import torch

    from bltool.serve.timing import matmul_peak

    if threads:
        torch.set_num_threads(threads)
    return matmul_peak(("float32", "bfloat16"), size=size)


def summarise(results: list[dict], peaks: list[dict] | None = None) -> dict:
    """Per variant: tokens/s, ratios, compile break-even; with `peaks` (one `measure_peak` per round) its
    model GFLOP/s and MFU against the median peak of its dtype."""
    peak = {d: statistics.median(p[d]["gflops"] for p in peaks) for d in ("float32", "bfloat16")} if peaks else {}
    rows = {}
    for variant in VARIANTS:
        runs = [r for r in results if r["variant"] == variant and "error" not in r]
        if not runs:
            continue
        times = [t for r in runs for t in r["batch_s"]]
        tokens = statistics.median([n for r in runs for n in r["tokens_per_batch"]])
        median = statistics.median(times)
        flops = runs[0]["flops_per_token"]
        rows[variant] = {"dtype": VARIANTS[variant][0], "tokens_per_s": tokens / median, "median_batch_s": median,
                         "timed_batches": len(times),
                         "first_batch_s": statistics.median(r["first_batch_s"] for r in runs),
                         "flops_per_token": flops, "model_gflops": tokens / median * flops / 1e9}
        if peak:
            rows[variant]["mfu"] = rows[variant]["model_gflops"] / peak[VARIANTS[variant][0]]
    for variant, row in rows.items():
        dtype, compiled = VARIANTS[variant]
        for ref in ("eager", "eager-mkl"):
            if ref in rows:
                row[f"vs_{ref}"] = row["tokens_per_s"] / rows[ref]["tokens_per_s"]
        twin = "compile" if compiled else "eager"  # the float32 variant a bf16 one is set beside
        if dtype == "bfloat16" and twin in rows:
            row["vs_float32"] = row["tokens_per_s"] / rows[twin]["tokens_per_s"]
        base = "eager" if dtype == "float32" else "bf16"
        if compiled and base in rows:
            saving = rows[base]["median_batch_s"] - row["median_batch_s"]  # per batch, steady state
            extra = row["first_batch_s"] - rows[base]["first_batch_s"]  # compilation
            per_token = saving / statistics.median(n for r in results if r.get("variant") == variant
                                                   for n in r.get("tokens_per_batch", []))
            row["break_even_tokens"] = extra / per_token if per_token > 0 else None
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--data", help="a prepare-data output (default: the demo corpus at --seq-len into --work)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--work", default="runs/bench-teacher-logits")
    parser.add_argument("--batch", type=int, default=8, help="sequences per batch (teacher-logits --batch-size)")
    parser.add_argument("--batches", type=int, default=3, help="timed batches per worker")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--threads", type=int)
    parser.add_argument("--peak-size", type=int, default=2048, help="the square GEMM of the matmul peak (MFU)")
    parser.add_argument("--out", help="JSON results (default WORK/teacher_logits_throughput.json)")
    parser.add_argument("--smoke", action="store_true", help="tiny random teacher, 1 round, 2 batches")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if unknown := [v for v in variants if v not in VARIANTS]:
        parser.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        args.teacher, args.data = _smoke_inputs(work)
        args.rounds, args.batches, args.batch, args.top_k, args.threads = 1, 2, 2, 5, args.threads or 1
        args.peak_size = 256
    data = args.data or _demo_data(args)
    results, peaks = [], []
    for round_ in range(args.rounds):
        peaks.append(measure_peak(args.peak_size, args.threads))
        print(f"teacher_logits_throughput: round {round_} matmul peak: "
              + ", ".join(f"{d} {p['gflops']:.0f} GFLOP/s ({p['kernel']})" for d, p in peaks[-1].items()),
              file=sys.stderr, flush=True)
        k = round_ % len(variants)
        for variant in variants[k:] + variants[:k]:
            spec = {"variant": variant, "round": round_, "teacher": args.teacher, "data": data, "batch": args.batch,
                    "batches": args.batches, "top_k": args.top_k, "threads": args.threads}
            results.append(_run_worker(spec))
            r = results[-1]
            print(f"teacher_logits_throughput: round {round_} {variant}: "
                  + (f"error {r['error'][-300:]}" if "error" in r else
                     f"{statistics.median(r['batch_s']):.3f} s/batch"), file=sys.stderr, flush=True)
    rows = summarise(results, peaks)
    peak = {d: statistics.median(p[d]["gflops"] for p in peaks) for d in ("float32", "bfloat16")}
    out = Path(args.out) if args.out else work / "teacher_logits_throughput.json"
    out.write_text(json.dumps({"rows": rows, "workers": results, "peaks": peaks, "peak_gflops": peak,
                               "peak_size": args.peak_size, "batch": args.batch, "rounds": args.rounds,
                               "batches": args.batches, "data": data, "teacher": args.teacher, "threads": args.threads},
                              indent=2) + "\n", encoding="utf-8")
    nan = float("nan")
    print(f"matmul peak ({args.peak_size}³ GEMM, median of {len(peaks)}): float32 {peak['float32']:.0f} GFLOP/s, "
          f"bfloat16 {peak['bfloat16']:.0f} GFLOP/s")
    print("| variant | dtype | tokens/s | ÷ eager | ÷ eager-mkl | ÷ float32 | MFLOP/token | GFLOP/s | MFU "
          "| first batch s | break-even tokens |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for variant in variants:
        if variant not in rows:
            print(f"| {variant} | {VARIANTS[variant][0]} | FAILED | | | | | | | | |")
            continue
        row = rows[variant]
        be, f32 = row.get("break_even_tokens"), row.get("vs_float32")
        print(f"| {variant} | {row['dtype']} | {row['tokens_per_s']:.1f} | {row.get('vs_eager', nan):.2f}× | "
              f"{row.get('vs_eager-mkl', nan):.2f}× | {'' if f32 is None else f'{f32:.2f}×'} | "
              f"{row['flops_per_token'] / 1e6:.4g} | {row['model_gflops']:.4g} | {row['mfu']:.1%} | "
              f"{row['first_batch_s']:.1f} | {'' if be is None else f'{be:,.0f}'} |")
    return 0 if len(rows) == len(variants) else 1


if __name__ == "__main__":
    sys.exit(main())
