#!/usr/bin/env bash
# One distillation run from a corpus to a report, every stage chained through the path it prints on
# stdout. A template for cluster jobs: point TEACHER at an alias from your teachers.toml (or a
# checkpoint directory), CORPUS at your documents, RUNS at a shared filesystem, and DISTILL at
# "torchrun --nproc-per-node 8 -m bltool" to train data-parallel. A site's defaults for these come from its
# env file (examples/lib/site.sh: BLTOOL_TEACHER, BLTOOL_CORPUS, BLTOOL_DATA_ROOT, BLTOOL_RUNS_ROOT).
#
#   CORPUS=/data/docs METHOD=budgeted-lora BUDGET=0.4 TOKENS=50M bash examples/pipeline.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/lib/site.sh"

CORPUS=${CORPUS:-${BLTOOL_CORPUS:?set CORPUS (or BLTOOL_CORPUS) to a directory of documents (or a .jsonl / .parquet / .arrow file)}}
GLOB=${GLOB:-**/*.txt}              # which files of a CORPUS directory are documents
RUNS=${RUNS:-${BLTOOL_RUNS_ROOT:-runs}/pipeline}
data_out=${BLTOOL_DATA_ROOT:+$BLTOOL_DATA_ROOT/$(basename "$RUNS")}  # prepared data: there, or in RUNS
TEACHER=${TEACHER:-${BLTOOL_TEACHER:-smollm2-135m}}
LAYERS=${LAYERS:-6}
MODE=${MODE:-mixed}
SEQ_LEN=${SEQ_LEN:-1024}
HELDOUT=${HELDOUT:-0.002}
METHOD=${METHOD:-budgeted-lora}     # kd-full | kd-lora | budgeted-lora
BUDGET=${BUDGET:-0.4}               # used by budgeted-lora only
TOKENS=${TOKENS:-2M}
BATCH=${BATCH:-8}
DISTILL=${DISTILL:-bltool}          # e.g. "torchrun --nproc-per-node 8 -m bltool"
DISTILL_ARGS=${DISTILL_ARGS:-}      # extra distill flags, e.g. "--rank 64 --grad-accum 4"
ICL_ARGS=${ICL_ARGS:-}              # e.g. "--n 50 --tasks capitalize,next_item"
BENCH_ARGS=${BENCH_ARGS:-}          # e.g. "--decode-batch 1,32"

name=$METHOD
budget=()
if [ "$METHOD" = budgeted-lora ]; then name="$METHOD-$BUDGET"; budget=(--budget "$BUDGET"); fi

data=$(bltool prepare-data "$CORPUS" --glob "$GLOB" --tokenizer "$TEACHER" --heldout "$HELDOUT" \
  --seq-len "$SEQ_LEN" --out "${data_out:-$RUNS/data}" --overwrite)
student=$(bltool build-student --teacher "$TEACHER" --mode "$MODE" --layers "$LAYERS" --out "$RUNS/student" \
  --overwrite)
# shellcheck disable=SC2086
distilled=$($DISTILL distill --teacher "$TEACHER" --student "$student" --data "$data" --method "$METHOD" \
  "${budget[@]}" --tokens "$TOKENS" --batch-size "$BATCH" --out "$RUNS/$name/distilled" --overwrite $DISTILL_ARGS)
compressed=$(bltool compress "$distilled" --out "$RUNS/$name/compressed" --overwrite)
bltool eval-ppl "$compressed" --data "$data" --out "$RUNS/$name/ppl" --overwrite >/dev/null
# shellcheck disable=SC2086
bltool eval-icl "$compressed" --out "$RUNS/$name/icl" --overwrite $ICL_ARGS >/dev/null
# shellcheck disable=SC2086
bltool bench "$compressed" --baseline "$student" --out "$RUNS/$name/bench" --overwrite $BENCH_ARGS >/dev/null
bltool report "$RUNS" --out "$RUNS/report" --title "$name" --overwrite
