#!/usr/bin/env bash
# The evidence sweep sized for one GPU in under 8 minutes: kd-lora, budgeted-lora F = 0.4 and F = 0 from
# one teacher-logits cache, with held-out learning curves (`distill --eval-every`), bf16 frozen weights,
# then compress, eval-ppl, eval-icl, bench and report (examples/sweep.sh does the work).
#
# The token budget is not guessed: a short probe run measures this machine's distillation throughput
# (tokens/s from its manifest), and each sweep run gets SECONDS_PER_RUN seconds' worth of tokens.
#   bash examples/gpu_sweep.sh                    # on a GPU host
#   SMOKE=1 bash examples/gpu_sweep.sh            # the same steps on the CPU at toy size (the test suite)
#   README=README.md bash examples/gpu_sweep.sh   # and put its table in the README
# Every setting can be overridden from the environment (see examples/sweep.sh for the sweep's own).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

if [ "${SMOKE:-0}" = 1 ]; then
  : "${DEVICE:=cpu}" "${DTYPE:=float32}" "${SECONDS_PER_RUN:=1}" "${PROBE_TOKENS:=256}" "${MIN_TOKENS:=256}"
  : "${SEQ_LEN:=32}" "${BATCH:=2}" "${LAYERS:=2}"
else
  : "${DEVICE:=cuda}" "${DTYPE:=bfloat16}" "${SECONDS_PER_RUN:=75}" "${PROBE_TOKENS:=400k}" "${MIN_TOKENS:=1M}"
  : "${SEQ_LEN:=1024}" "${BATCH:=16}" "${LAYERS:=6}"
fi
export RUNS=${RUNS:-runs/gpu-sweep}
export TEACHER=${TEACHER:-smollm2-135m}
export CORPUS=${CORPUS:-$(bash "$here/../scripts/install-corpus.sh")}
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
  data=$(bltool prepare-data "$CORPUS" --glob "$GLOB" --tokenizer "$TEACHER" --heldout "$HELDOUT" \
    --seq-len "$SEQ_LEN" --out "$RUNS/data" --overwrite)
fi
student=${STUDENT:-}
if [ -z "$student" ]; then
  student=$(bltool build-student --teacher "$TEACHER" --mode mixed --layers "$LAYERS" --out "$RUNS/student" \
    --overwrite)
fi
export DATA=$data STUDENT=$student
# The probe: kd-lora (the slowest LoRA run: its dense matmuls never stop) from a small cache, as the
# sweep's runs read theirs, on the same data, student, batch and flags.
probe=${PROBE_DIR:-$RUNS-probe}   # outside RUNS: the report reads everything under RUNS
cache=$(bltool teacher-logits --teacher "$TEACHER" --data "$data" --tokens "$PROBE_TOKENS" --device "$DEVICE" \
  --dtype "$DTYPE" --out "$probe/teacher-logits" --overwrite)
# shellcheck disable=SC2086
measured=$(bltool distill --teacher-logits "$cache" --student "$student" --data "$data" --method kd-lora \
  --tokens "$PROBE_TOKENS" --batch-size "$BATCH" --device "$DEVICE" --dtype "$DTYPE" --save-every 0 \
  --out "$probe/distilled" --overwrite $EXTRA ${PROBE_ARGS:-})
tokens=$(python3 - "$measured" "$SECONDS_PER_RUN" "$MIN_TOKENS" "$SEQ_LEN" "$BATCH" "$EVALS" <<'PY'
import json, sys, pathlib
from bltool.units import parse_count
manifest = json.loads((pathlib.Path(sys.argv[1]) / "manifest.json").read_text())
rate, seconds = manifest["training"]["tokens_per_s"], float(sys.argv[2])
step = int(sys.argv[4]) * int(sys.argv[5])
tokens = max(int(rate * seconds), parse_count(sys.argv[3], "MIN_TOKENS")) // step * step
print(tokens, max(1, tokens // step // int(sys.argv[6])))
PY
)
read -r TOKENS EVAL_EVERY <<<"$tokens"
echo "gpu-sweep: measured $(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['training']['tokens_per_s'])" \
  "$measured/manifest.json") tokens/s; $TOKENS tokens per run, held-out evaluation every $EVAL_EVERY steps" >&2

device_name=$(python3 -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU')")
export TOKENS
export DISTILL_ARGS="--device $DEVICE --dtype $DTYPE --eval-every $EVAL_EVERY --eval-tokens $EVAL_TOKENS $EXTRA ${DISTILL_ARGS:-}"
export TITLE=${TITLE:-bltool GPU sweep}
export NOTE=${NOTE:-"GPU sweep on $device_name, $(date -u +%Y-%m-%d): $TOKENS tokens per run ($SECONDS_PER_RUN s at the measured throughput), batch $BATCH × $SEQ_LEN, $DTYPE frozen weights. Command: bash examples/gpu_sweep.sh"}
bash "$here/sweep.sh"
