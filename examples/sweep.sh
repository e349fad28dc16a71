#!/usr/bin/env bash
# A sweep over methods and budgets that pays for the teacher once: one teacher-logits cache feeds
# kd-full, kd-lora and budgeted-lora at several budgets; each student is compressed, evaluated
# (perplexity, ICL probes), benchmarked and served (`bench-serving` on ENGINE), the teacher and the
# untrained student are evaluated as baselines (the teacher served too), one `capacity` plan prices every
# served model for GPU_MEM, RATE and a PROMPT_LEN/OUTPUT_LEN workload, and `bltool report` puts it all
# in one table with the frontier figures. SERVING=0 skips the serving steps.
#
# The defaults are the demo setting (SmolLM2-135M teacher, Python 3.11 docs, 6-layer mixed student)
# sized to finish within an hour on 2 CPU cores. On a GPU host, raise TOKENS (e.g. TOKENS=20M).
#   bash examples/sweep.sh                          # the CPU sweep
#   README=README.md bash examples/sweep.sh         # and regenerate the README's results section
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/lib/site.sh"          # BLTOOL_HOME, BLTOOL_TEACHER, BLTOOL_CORPUS, BLTOOL_DATA_ROOT, BLTOOL_RUNS_ROOT

# The command that produced this sweep, for the report's note: the settings given in the environment.
command=""
for knob in RUNS TEACHER CORPUS GLOB HELDOUT SEQ_LEN LAYERS SWEEP TOKENS BATCH TOP_K DISTILL DISTILL_ARGS DATA \
  STUDENT PPL_ARGS ICL_ARGS BENCH_ARGS BASELINES SERVING ENGINE VLLM_BLTOOL SERVING_ARGS SERVING_CHUNK GPU_MEM RATE \
  PROMPT_LEN OUTPUT_LEN CAPACITY_ARGS TITLE README; do
  if [ -n "${!knob+x}" ]; then
    case ${!knob} in *[!A-Za-z0-9._:/,=+-]*|"") command+="$knob='${!knob}' " ;; *) command+="$knob=${!knob} " ;; esac
  fi
done
command+="bash ${0#"$PWD"/}"

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
SERVING=${SERVING:-1}               # 0: skip bench-serving and capacity
ENGINE=${ENGINE:-transformers}      # bench-serving's engine: transformers or vllm
VLLM_BLTOOL=${VLLM_BLTOOL:-}        # ENGINE=vllm: the vLLM environment's bltool (default: $BLTOOL_VLLM_PYTHON -m
                                    # bltool, else .venv-vllm/bin/bltool)
SERVING_ARGS=${SERVING_ARGS:-}      # more bench-serving flags, e.g. "--concurrency 16 --repeats 1"
SERVING_CHUNK=${SERVING_CHUNK:-256} # prefill chunk, measured by bench-serving and planned by capacity
GPU_MEM=${GPU_MEM:-80GiB}           # capacity: accelerator memory per server
RATE=${RATE:-10}                    # capacity: requests/s to plan servers for
PROMPT_LEN=${PROMPT_LEN:-lognormal:256:0.8}   # capacity's workload: prompt and output length distributions
OUTPUT_LEN=${OUTPUT_LEN:-geometric:128}
CAPACITY_ARGS=${CAPACITY_ARGS:-}    # more capacity flags, e.g. "--dtype float16"
README=${README:-}                  # a file whose bltool-report section to regenerate
NOTE=${NOTE:-}

echo "sweep: $SWEEP; $TOKENS tokens each; runs in $RUNS" >&2
serve=(bltool)
if [ "$ENGINE" = vllm ]; then
  if [ -n "$VLLM_BLTOOL" ]; then read -r -a serve <<<"$VLLM_BLTOOL"
  elif [ -n "${BLTOOL_VLLM_PYTHON:-}" ]; then serve=("$BLTOOL_VLLM_PYTHON" -m bltool)
  elif [ -x "$here/../.venv-vllm/bin/bltool" ]; then serve=("$here/../.venv-vllm/bin/bltool")
  fi
fi
served=()                           # the bench-serving outputs capacity plans for
bench_serving() {  # MODEL OUT
  local out
  # shellcheck disable=SC2086
  out=$("${serve[@]}" bench-serving "$1" --engine "$ENGINE" --chunk "$SERVING_CHUNK" --out "$2" --overwrite \
    $SERVING_ARGS)
  served+=("$out")
}
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
  if [ "$SERVING" = 1 ]; then bench_serving "$TEACHER" "$RUNS/baselines/teacher-serving"; fi
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
  if [ "$SERVING" = 1 ]; then bench_serving "$compressed" "$RUNS/$name/serving"; fi
done

if [ "$SERVING" = 1 ] && [ ${#served[@]} -gt 0 ]; then
  # shellcheck disable=SC2086
  bltool capacity "${served[@]}" --gpu-mem "$GPU_MEM" --rate "$RATE" --prompt-len "$PROMPT_LEN" \
    --output-len "$OUTPUT_LEN" --chunk "$SERVING_CHUNK" --out "$RUNS/capacity" --overwrite $CAPACITY_ARGS >/dev/null
fi

readme=()
if [ -n "$README" ]; then readme=(--readme "$README"); fi
NOTE="${NOTE:+$NOTE }Sweep command: \`$command\`."
bltool report "$RUNS" --out "$RUNS/report" --title "${TITLE:-bltool sweep}" --note "$NOTE" "${readme[@]}" \
  --overwrite
