#!/usr/bin/env bash
# The capacity table of docs/capacity.md: teacher, dense student and compressed students on one
# synthetic trace, with b̄, P, D and b(p, d) measured on this machine by `bench-serving`, and the
# check against the simulator and the real server (--validate).
#
#   benchmarks/capacity_demo.sh [COMPRESSED_STUDENT ...]
#
# Environment: RUNS (default runs/capacity), TEACHER (smollm2-135m), STUDENT (runs/student, built here
# when missing; runs/ is $BLTOOL_RUNS_ROOT and the teacher $BLTOOL_TEACHER when a site's env file sets them:
# examples/lib/site.sh), CHUNK (256), CONCURRENCY (8), REPEATS (1), GPU_MEM (4GiB), DTYPE (float32, the CPU
# measurement's dtype), RATE (1 request/s to plan for), VALIDATE_REQUESTS (192 per offered load), ENGINE
# (transformers, or vllm: bench-serving --engine vllm, and the check then serves on vLLM; run it with
# .venv-vllm/bin first on PATH).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../examples/lib/site.sh"

RUNS=${RUNS:-${BLTOOL_RUNS_ROOT:-runs}/capacity}
TEACHER=${TEACHER:-${BLTOOL_TEACHER:-smollm2-135m}}
STUDENT=${STUDENT:-${BLTOOL_RUNS_ROOT:-runs}/student}
CHUNK=${CHUNK:-256}
CONCURRENCY=${CONCURRENCY:-8}
REPEATS=${REPEATS:-1}
GPU_MEM=${GPU_MEM:-4GiB}
DTYPE=${DTYPE:-float32}
RATE=${RATE:-1}
VALIDATE_REQUESTS=${VALIDATE_REQUESTS:-192}
ENGINE=${ENGINE:-transformers}

trace=$(python "$here/make_trace.py" "$RUNS/trace.csv")  # 2,000 requests, E[s] ≈ 258, E[o] ≈ 60
[ -d "$STUDENT" ] || bltool build-student --teacher "$TEACHER" --mode mixed --layers 6 --out "$STUDENT"

# b̄, P and D at the trace's mean lengths (prompt 256, output 60), CONCURRENCY sequences
serve() {  # MODEL OUT
  local settings=(--chunk "$CHUNK" --concurrency "$CONCURRENCY" --prompt-len 256 --output-len 60
                  --repeats "$REPEATS" --engine "$ENGINE" --out "$2" --overwrite)
  bltool bench-serving "$1" "${settings[@]}"
}

measured=()
i=0
for model in "$TEACHER" "$STUDENT" "$@"; do
  measured+=("$(serve "$model" "$RUNS/serve-$i-$(basename "$model")")")
  i=$((i + 1))
done

# The plan on the trace with b(p, d, k) (the default), and with the median and the mean iteration time as
# a constant b̄, for comparison
for stat in fit median mean; do
  bltool capacity "${measured[@]}" --workload "$trace" --chunk "$CHUNK" --gpu-mem "$GPU_MEM" --dtype "$DTYPE" \
    --rate "$RATE" --iteration-stat "$stat" --out "$RUNS/capacity-$stat" --overwrite
done

# The check against the measured server, for the students (the teacher's loads take 4× as long): each served
# by the engine bench-serving measured with its settings (token budget, sequence cap, pages) and a KV cache in
# which memory binds, at 0.5 to 1.6 × the formula's rate (1.6 twice), VALIDATE_REQUESTS requests per load
# drawn stratified by g, against the formula
# and the simulator's replay of the same requests (validation.png, validation.arrow); the simulator also runs
# each plan at 0.8, 1 and 1.2 × its rate (queue.png)
bltool capacity "${measured[@]:1}" --workload "$trace" --chunk "$CHUNK" --gpu-mem "$GPU_MEM" --dtype "$DTYPE" \
  --rate "$RATE" --validate --validate-requests "$VALIDATE_REQUESTS" --out "$RUNS/validate" --overwrite
