#!/usr/bin/env bash
# The evidence sweep sized for one GPU in under 8 minutes: kd-lora, budgeted-lora F = 0.4 and F = 0 from
# one teacher-logits cache, with held-out learning curves (`distill --eval-every`), bf16 frozen weights,
# then compress, eval-ppl, eval-icl, bench and report (examples/sweep.sh does the work).
#
# The token budget is not guessed: a short probe run through $DISTILL measures this host's distillation
# throughput (tokens/s over every process, from its manifest), and each sweep run gets SECONDS_PER_RUN seconds'
# worth of tokens, in whole optimizer steps of the probe's global batch (processes × BATCH × SEQ_LEN); the
# held-out evaluation comes every EVAL_EVERY optimizer steps, EVALS times a run. A budget past one epoch of
# the training split is warned about (the runs then see sequences again).
#   bash examples/gpu_sweep.sh                    # on a GPU host
#   DISTILL="torchrun --nproc-per-node 8 -m bltool" bash examples/gpu_sweep.sh   # sized for 8 GPUs
#   SMOKE=1 bash examples/gpu_sweep.sh            # the same steps on the CPU at toy size (the test suite)
#   README=README.md bash examples/gpu_sweep.sh   # and put its table in the README
# Every setting can be overridden from the environment (see examples/sweep.sh for the sweep's own).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/lib/site.sh"          # BLTOOL_HOME, BLTOOL_TEACHER, BLTOOL_CORPUS, BLTOOL_DATA_ROOT, BLTOOL_RUNS_ROOT

if [ "${SMOKE:-0}" = 1 ]; then
  : "${DEVICE:=cpu}" "${DTYPE:=float32}" "${SECONDS_PER_RUN:=1}" "${PROBE_TOKENS:=256}" "${MIN_TOKENS:=256}"
  : "${SEQ_LEN:=32}" "${BATCH:=2}" "${LAYERS:=2}"
else
  : "${DEVICE:=cuda}" "${DTYPE:=bfloat16}" "${SECONDS_PER_RUN:=75}" "${PROBE_TOKENS:=400k}" "${MIN_TOKENS:=1M}"
  : "${SEQ_LEN:=1024}" "${BATCH:=16}" "${LAYERS:=6}"
fi
export RUNS=${RUNS:-${BLTOOL_RUNS_ROOT:-runs}/gpu-sweep}
export TEACHER=${TEACHER:-${BLTOOL_TEACHER:-smollm2-135m}}
export CORPUS=${CORPUS:-${BLTOOL_CORPUS:-$(bash "$here/../scripts/install-corpus.sh")}}
export DISTILL=${DISTILL:-bltool}   # e.g. "torchrun --nproc-per-node 8 -m bltool": the probe and the sweep's runs
export GLOB=${GLOB:-**/*.rst.txt}
export HELDOUT=${HELDOUT:-0.02}
export SEQ_LEN BATCH LAYERS
export SWEEP=${SWEEP:-kd-lora budgeted-lora:0.4 budgeted-lora:0.0}
EVALS=${EVALS:-12}                  # held-out evaluations per run (the learning curve's points)
EVAL_TOKENS=${EVAL_TOKENS:-16k}
EXTRA=${EXTRA:-}                    # more distill flags for every run, e.g. "--compile"

# The data and the student (unless given as DATA, STUDENT), where examples/sweep.sh puts them: the probe
# and the sweep use the same ones.
data=${DATA:-}
if [ -z "$data" ]; then
  data_out=${BLTOOL_DATA_ROOT:+$BLTOOL_DATA_ROOT/$(basename "$RUNS")}
  data=$(bltool prepare-data "$CORPUS" --glob "$GLOB" --tokenizer "$TEACHER" --heldout "$HELDOUT" \
    --seq-len "$SEQ_LEN" --out "${data_out:-$RUNS/data}" --overwrite)
fi
student=${STUDENT:-}
if [ -z "$student" ]; then
  student=$(bltool build-student --teacher "$TEACHER" --mode mixed --layers "$LAYERS" --out "$RUNS/student" \
    --overwrite)
fi
export DATA=$data STUDENT=$student
# The probe: kd-lora (the slowest LoRA run: its dense matmuls never stop) from a small cache, as the
# sweep's runs read theirs, on the same data, student, batch, flags and processes ($DISTILL).
probe=${PROBE_DIR:-$RUNS-probe}   # outside RUNS: the report reads everything under RUNS
cache=$(bltool teacher-logits --teacher "$TEACHER" --data "$data" --tokens "$PROBE_TOKENS" --device "$DEVICE" \
  --dtype "$DTYPE" --out "$probe/teacher-logits" --overwrite)
# shellcheck disable=SC2086
measured=$($DISTILL distill --teacher-logits "$cache" --student "$student" --data "$data" --method kd-lora \
  --tokens "$PROBE_TOKENS" --batch-size "$BATCH" --device "$DEVICE" --dtype "$DTYPE" --save-every 0 \
  --out "$probe/distilled" --overwrite $EXTRA ${PROBE_ARGS:-})
sizing=$(python3 "$here/lib/size_sweep.py" "$measured" "$data" "$SECONDS_PER_RUN" "$MIN_TOKENS" "$EVALS")
read -r TOKENS EVAL_EVERY WORLD RATE STEP EPOCH <<<"$sizing"
echo "gpu-sweep: measured $RATE tokens/s on $WORLD process(es); $TOKENS tokens per run ($((TOKENS / STEP)) optimizer" \
  "steps of $STEP tokens), held-out evaluation every $EVAL_EVERY steps" >&2

device_name=$(python3 -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU')")
export TOKENS
export DISTILL_ARGS="--device $DEVICE --dtype $DTYPE --eval-every $EVAL_EVERY --eval-tokens $EVAL_TOKENS $EXTRA ${DISTILL_ARGS:-}"
export TITLE=${TITLE:-bltool GPU sweep}
devices=$device_name
if [ "$WORLD" != 1 ]; then devices="$WORLD × $device_name"; fi
export NOTE=${NOTE:-"GPU sweep on $devices, $(date -u +%Y-%m-%d): $TOKENS tokens per run ($SECONDS_PER_RUN s at the measured throughput), $STEP tokens per optimizer step ($WORLD × $BATCH × $SEQ_LEN), $DTYPE frozen weights. Command: DISTILL='$DISTILL' bash examples/gpu_sweep.sh"}
bash "$here/sweep.sh"
