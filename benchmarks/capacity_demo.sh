#!/usr/bin/env bash
# The capacity table of docs/capacity.md: teacher, dense student and compressed students on one
# synthetic trace, with b̄, P and D measured on this machine by `bench-serving`, and the simulator's
# check (--validate).
#
#   benchmarks/capacity_demo.sh [COMPRESSED_STUDENT ...]
#
# Environment: RUNS (default runs/capacity), TEACHER (smollm2-135m), STUDENT (runs/student, built here
# when missing), CHUNK (256), CONCURRENCY (8), REPEATS (1), GPU_MEM (4GiB), DTYPE (float32, the CPU
# measurement's dtype), RATE (1 request/s to plan for).
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-runs/capacity}
TEACHER=${TEACHER:-smollm2-135m}
STUDENT=${STUDENT:-runs/student}
CHUNK=${CHUNK:-256}
CONCURRENCY=${CONCURRENCY:-8}
REPEATS=${REPEATS:-1}
GPU_MEM=${GPU_MEM:-4GiB}
DTYPE=${DTYPE:-float32}
RATE=${RATE:-1}

trace=$(python benchmarks/make_trace.py "$RUNS/trace.csv")  # 2,000 requests, E[s] ≈ 258, E[o] ≈ 60
[ -d "$STUDENT" ] || bltool build-student --teacher "$TEACHER" --mode mixed --layers 6 --out "$STUDENT"

# b̄, P and D at the trace's mean lengths (prompt 256, output 60), CONCURRENCY sequences
serve() {  # MODEL OUT
  local settings=(--chunk "$CHUNK" --concurrency "$CONCURRENCY" --prompt-len 256 --output-len 60
                  --repeats "$REPEATS" --out "$2" --overwrite)
  bltool bench-serving "$1" "${settings[@]}"
}

measured=()
i=0
for model in "$TEACHER" "$STUDENT" "$@"; do
  measured+=("$(serve "$model" "$RUNS/serve-$i-$(basename "$model")")")
  i=$((i + 1))
done

for stat in median mean; do
  bltool capacity "${measured[@]}" --workload "$trace" --chunk "$CHUNK" --gpu-mem "$GPU_MEM" --dtype "$DTYPE" \
    --rate "$RATE" --iteration-stat "$stat" --validate --out "$RUNS/capacity-$stat" --overwrite
done

# Memory-bound check against the real server: each bench's saturated run had a KV cache of
# kv_cache_tokens for fixed 256 + 60 token requests. Model exactly that memory (weights + cache, float32)
# and compare μ, the simulator and the completion rate transformers' continuous batching reached.
for dir in "${measured[@]}"; do
  mem=$(python -c 'import json, sys; r = json.load(open(sys.argv[1] + "/result.json"))
print(r["parameters"] * 4 + r["kv_cache_tokens"] * r["kv_bytes_per_token"])' "$dir")
  for stat in median mean; do
    bltool capacity "$dir" --prompt-len 256 --output-len 60 --samples 1 --chunk "$CHUNK" --gpu-mem "$mem" \
      --mem-util 1 --dtype float32 --max-seqs 1000 --iteration-stat "$stat" --validate \
      --out "$RUNS/check-$stat-$(basename "$dir")" --overwrite
  done
done
