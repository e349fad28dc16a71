#!/usr/bin/env bash
# Which teacher signal should distillation read? One student, one token budget, learning curves from
#   live       the teacher run at every step (the reference),
#   top-k:K    `teacher-logits --top-k K` (the K largest logits and the tail's mass; biased),
#   sample:N   `teacher-logits --sample N` (N draws at the distillation temperature; unbiased),
# each over SEEDS (the distill --seed: data order, LoRA initialisation, dropout; the caches are written
# for each seed's data order). Held-out perplexity every EVAL_EVERY steps on the whole held-out split.
# Resumable: a run whose output exists is kept, so a stopped sweep goes on where it stopped.
#   bash benchmarks/teacher_signal.sh                                 # the CPU setting (docs/benchmarks.md)
#   SIGNALS="live sample:32" SEEDS="0 1 2" TOKENS=200k bash benchmarks/teacher_signal.sh
# Then: python benchmarks/teacher_signal_table.py "$RUNS" (the table and the figure).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../examples/lib/site.sh"

RUNS=${RUNS:-${BLTOOL_RUNS_ROOT:+$BLTOOL_RUNS_ROOT/}runs/signal}
TEACHER=${TEACHER:-${BLTOOL_TEACHER:-smollm2-135m}}
CORPUS=${CORPUS:-${BLTOOL_CORPUS:-$(bash "$here/../scripts/install-corpus.sh")}}
GLOB=${GLOB:-**/*.rst.txt}
HELDOUT=${HELDOUT:-0.02}
SEQ_LEN=${SEQ_LEN:-512}
LAYERS=${LAYERS:-6}
MODE=${MODE:-mixed}
TOKENS=${TOKENS:-60k}
BATCH=${BATCH:-2}
SEEDS=${SEEDS:-0 1}
SIGNALS=${SIGNALS:-live top-k:64 top-k:16 sample:32}
EVAL_EVERY=${EVAL_EVERY:-10}
EVAL_TOKENS=${EVAL_TOKENS:-10000000}  # capped by the held-out split: all of it
DISTILL_ARGS=${DISTILL_ARGS:-}

mkdir -p "$RUNS"
echo "teacher signal: $SIGNALS; seeds $SEEDS; $TOKENS tokens each; runs in $RUNS" >&2
data=$RUNS/data
[ -f "$data/manifest.json" ] || bltool prepare-data "$CORPUS" --glob "$GLOB" --tokenizer "$TEACHER" \
  --heldout "$HELDOUT" --seq-len "$SEQ_LEN" --out "$data" --overwrite >/dev/null
student=$RUNS/student
[ -f "$student/manifest.json" ] || bltool build-student --teacher "$TEACHER" --mode "$MODE" --layers "$LAYERS" \
  --out "$student" --overwrite >/dev/null
teacher_ppl=$RUNS/teacher-ppl
[ -f "$teacher_ppl/manifest.json" ] || bltool eval-ppl "$TEACHER" --data "$data" --max-tokens "$EVAL_TOKENS" \
  --out "$teacher_ppl" --overwrite >/dev/null

for seed in $SEEDS; do
  for signal in $SIGNALS; do
    kind=${signal%%:*}
    name=${signal/:/-}-s$seed
    out=$RUNS/$name
    if [ ! -f "$out/manifest.json" ]; then
      source_args=(--teacher "$TEACHER")
      if [ "$kind" != live ]; then
        cache=$RUNS/cache-${signal/:/-}-s$seed
        if [ ! -f "$cache/manifest.json" ]; then
          again=--overwrite
          [ -d "$cache.partial" ] && again=--resume   # a stopped cache goes on from its completed parts
          bltool teacher-logits --teacher "$TEACHER" --data "$data" --tokens "$TOKENS" --seed "$seed" \
            "--$kind" "${signal#*:}" --out "$cache" $again >/dev/null
        fi
        source_args=(--teacher-logits "$cache")
      fi
      again=--overwrite
      [ -d "$out.checkpoint" ] && again=--resume     # a run stopped by SIGTERM goes on from its checkpoint
      echo "teacher signal: $name" >&2
      # shellcheck disable=SC2086
      bltool distill --student "$student" --data "$data" "${source_args[@]}" --method kd-lora --tokens "$TOKENS" \
        --batch-size "$BATCH" --seed "$seed" --eval-every "$EVAL_EVERY" --eval-tokens "$EVAL_TOKENS" \
        --out "$out" $again $DISTILL_ARGS >/dev/null
    fi
    # its held-out windows, for the paired comparison with the live run of the same seed
    [ -f "$RUNS/ppl/$name/manifest.json" ] || bltool eval-ppl "$out" --data "$data" --max-tokens "$EVAL_TOKENS" \
      --out "$RUNS/ppl/$name" --overwrite >/dev/null
  done
done
echo "$RUNS"
