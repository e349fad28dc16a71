#!/usr/bin/env bash
# A sweep over methods and budgets that pays for the teacher once: one teacher-logits cache feeds
# kd-full, kd-lora and budgeted-lora at several budgets; each student is compressed, evaluated
# (perplexity, ICL probes) and benchmarked, the teacher and the untrained student are evaluated as
# baselines, and `bltool report` puts it all in one table with the frontier figures.
#
# The defaults are the demo setting (SmolLM2-135M teacher, Python 3.11 docs, 6-layer mixed student)
# sized to finish within an hour on 2 CPU cores. On a GPU host, raise TOKENS (e.g. TOKENS=20M).
#   bash examples/sweep.sh                          # the CPU sweep
#   README=README.md bash examples/sweep.sh         # and regenerate the README's results section
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/lib/site.sh"          # BLTOOL_HOME, BLTOOL_TEACHER, BLTOOL_CORPUS, BLTOOL_DATA_ROOT, BLTOOL_RUNS_ROOT

RUNS=${RUNS:-${BLTOOL_RUNS_ROOT:-runs}/sweep}
TEACHER=${TEACHER:-${BLTOOL_TEACHER:-smollm2-135m}}
CORPUS=${CORPUS:-${BLTOOL_CORPUS:-$(bash "$here/../scripts/install-corpus.sh")}}
GLOB=${GLOB:-**/*.rst.txt}
HELDOUT=${HELDOUT:-0.02}            # the docs corpus is small: 2% holds out ~10 documents, ~28k tokens
SEQ_LEN=${SEQ_LEN:-512}
LAYERS=${LAYERS:-6}
SWEEP=${SWEEP:-kd-full kd-lora budgeted-lora:0.0 budgeted-lora:0.4 budgeted-lora:0.8}
TOKENS=${TOKENS:-96k}               # 94 steps of 2 × 512 tokens per run
BATCH=${BATCH:-2}
TOP_K=${TOP_K:-64}
DISTILL=${DISTILL:-bltool}          # e.g. "torchrun --nproc-per-node 8 -m bltool"
DISTILL_ARGS=${DISTILL_ARGS:-}
DATA=${DATA:-}                      # a prepare-data output to use as it is (default: CORPUS prepared into RUNS,
                                    # or into BLTOOL_DATA_ROOT/<RUNS's name> when the site sets it)
STUDENT=${STUDENT:-}                # a build-student output to use as it is (default: built into RUNS)
PPL_ARGS=${PPL_ARGS:-}              # e.g. "--max-tokens 100000"
ICL_ARGS=${ICL_ARGS:---n 10 --seeds 3}
BENCH_ARGS=${BENCH_ARGS:---repeats 5}
BASELINES=${BASELINES:-1}           # 0: skip evaluating the teacher and the untrained student
README=${README:-}                  # a file whose bltool-report section to regenerate
NOTE=${NOTE:-}

echo "sweep: $SWEEP; $TOKENS tokens each; runs in $RUNS" >&2
data=$DATA
if [ -z "$data" ]; then
  data_out=${BLTOOL_DATA_ROOT:+$BLTOOL_DATA_ROOT/$(basename "$RUNS")}
  data=$(bltool prepare-data "$CORPUS" --glob "$GLOB" --tokenizer "$TEACHER" --heldout "$HELDOUT" \
    --seq-len "$SEQ_LEN" --out "${data_out:-$RUNS/data}" --overwrite)
fi
student=$STUDENT
if [ -z "$student" ]; then
  student=$(bltool build-student --teacher "$TEACHER" --mode mixed --layers "$LAYERS" --out "$RUNS/student" \
    --overwrite)
fi
cache=$(bltool teacher-logits --teacher "$TEACHER" --data "$data" --tokens "$TOKENS" --top-k "$TOP_K" \
  --out "$RUNS/teacher-logits" --overwrite)

if [ "$BASELINES" = 1 ]; then
  # shellcheck disable=SC2086
  bltool eval-ppl "$TEACHER" --data "$data" --out "$RUNS/baselines/teacher-ppl" --overwrite $PPL_ARGS >/dev/null
  # shellcheck disable=SC2086
  bltool eval-ppl "$student" --data "$data" --out "$RUNS/baselines/student-ppl" --overwrite $PPL_ARGS >/dev/null
  # shellcheck disable=SC2086
  bltool eval-icl "$TEACHER" --out "$RUNS/baselines/teacher-icl" --overwrite $ICL_ARGS >/dev/null
  # shellcheck disable=SC2086
  bltool eval-icl "$student" --out "$RUNS/baselines/student-icl" --overwrite $ICL_ARGS >/dev/null
fi

for spec in $SWEEP; do
  method=${spec%%:*}
  budget=()
  name=$method
  if [ "$method" != "$spec" ]; then budget=(--budget "${spec#*:}"); name="$method-${spec#*:}"; fi
  # shellcheck disable=SC2086
  distilled=$($DISTILL distill --teacher-logits "$cache" --student "$student" --data "$data" \
    --method "$method" "${budget[@]}" --tokens "$TOKENS" --batch-size "$BATCH" \
    --out "$RUNS/$name/distilled" --overwrite $DISTILL_ARGS)
  compressed=$(bltool compress "$distilled" --out "$RUNS/$name/compressed" --overwrite)
  # shellcheck disable=SC2086
  bltool eval-ppl "$compressed" --data "$data" --out "$RUNS/$name/ppl" --overwrite $PPL_ARGS >/dev/null
  # shellcheck disable=SC2086
  bltool eval-icl "$compressed" --out "$RUNS/$name/icl" --overwrite $ICL_ARGS >/dev/null
  # shellcheck disable=SC2086
  bltool bench "$compressed" --baseline "$student" --out "$RUNS/$name/bench" --overwrite $BENCH_ARGS >/dev/null
done

readme=()
if [ -n "$README" ]; then readme=(--readme "$README"); fi
bltool report "$RUNS" --out "$RUNS/report" --title "${TITLE:-bltool sweep}" --note "$NOTE" "${readme[@]}" \
  --overwrite
