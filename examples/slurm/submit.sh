#!/usr/bin/env bash
# Submit a sweep as Slurm jobs, one stage per job, chained with --dependency so that each starts when
# what it reads is finished:
#
#   prepare-data ─┐
#                 ├─ teacher-logits ─┬─ distill[0..n-1] ──(aftercorr)── evaluate[0..n-1] ── report
#   build-student ┴──────────────────┘
#
# distill and evaluate are job arrays with one task per SWEEP entry; distill and teacher-logits run
# torchrun on NODES nodes. Every job is requeueable and continues from its checkpoint when requeued;
# each writes its log to $BLTOOL_RUNS_ROOT/$RUN/logs. Paths come from the site env file
# (examples/lib/site.sh); the settings of examples/slurm/common.sh are read from the environment, and
# sbatch passes the environment to the jobs.
#
#   RUN=sweep1 SWEEP="kd-lora budgeted-lora:0.4" TOKENS=50M NODES=2 GPUS_PER_NODE=8 CPUS_PER_NODE=64 \
#     SBATCH_ARGS="--partition gpu --time 04:00:00" EVAL_SBATCH_ARGS="--gpus 1" bash examples/slurm/submit.sh
#
# Prints the report job's id; WAIT=1 waits for it (sbatch --wait) and prints the report's directory.
set -euo pipefail
BLTOOL_REPO=${BLTOOL_REPO:-$(cd "$(dirname "$0")/../.." && pwd)}
export BLTOOL_REPO
# shellcheck source=examples/slurm/common.sh
source "$BLTOOL_REPO/examples/slurm/common.sh"

if [ -z "$CORPUS" ]; then
  echo "error: BLTOOL_CORPUS is not set (set it in the site env file, or CORPUS)" >&2
  exit 2
fi
NODES=${NODES:-1}                   # nodes of each teacher-logits and distill job
GPUS_PER_NODE=${GPUS_PER_NODE:-0}   # 0: CPU nodes, one process each
SBATCH_ARGS=${SBATCH_ARGS:-}        # for every job, e.g. "--partition gpu --account proj --time 04:00:00"
CPUS_PER_NODE=${CPUS_PER_NODE:-}   # CPUs of each teacher-logits and distill node (default: Slurm's, often 1)
TRAIN_SBATCH_ARGS=${TRAIN_SBATCH_ARGS:-}  # for teacher-logits and distill only, e.g. "--time 24:00:00"
EVAL_SBATCH_ARGS=${EVAL_SBATCH_ARGS:-}    # for evaluate only, e.g. "--gpus 1 --cpus-per-task 8"
WAIT=${WAIT:-0}
if [ "$GPUS_PER_NODE" -gt 0 ]; then
  NPROC_PER_NODE=$GPUS_PER_NODE
  train=(--nodes "$NODES" --gpus-per-node "$GPUS_PER_NODE")
else
  NPROC_PER_NODE=1
  train=(--nodes "$NODES")
fi
if [ -n "$CPUS_PER_NODE" ]; then train+=(--cpus-per-task "$CPUS_PER_NODE"); fi
export NPROC_PER_NODE
read -r -a specs <<< "$SWEEP"
last=$((${#specs[@]} - 1))
here=$BLTOOL_REPO/examples/slurm
mkdir -p "$LOGS"

# sbatch with the common arguments; prints the job id. A job whose dependency failed is cancelled
# (--kill-on-invalid-dep), so nothing waits forever behind a failed stage.
submit() {
  # shellcheck disable=SC2086
  sbatch --parsable --export=ALL --kill-on-invalid-dep=yes $SBATCH_ARGS "$@" | cut -d ';' -f 1
}

prepare=$(submit --output "$LOGS/%x-%j.out" "$here/prepare-data.sbatch")
student=$(submit --output "$LOGS/%x-%j.out" "$here/build-student.sbatch")
# shellcheck disable=SC2086
logits=$(submit --dependency "afterok:$prepare" --output "$LOGS/%x-%j.out" "${train[@]}" $TRAIN_SBATCH_ARGS \
  "$here/teacher-logits.sbatch")
# shellcheck disable=SC2086
distill=$(submit --dependency "afterok:$logits:$student" --array "0-$last" --output "$LOGS/%x-%A_%a.out" \
  "${train[@]}" $TRAIN_SBATCH_ARGS "$here/distill.sbatch")
# shellcheck disable=SC2086
evaluate=$(submit --dependency "aftercorr:$distill" --array "0-$last" --output "$LOGS/%x-%A_%a.out" \
  $EVAL_SBATCH_ARGS "$here/evaluate.sbatch")
echo "bltool: $RUN: prepare-data $prepare, build-student $student, teacher-logits $logits, distill $distill" \
  "(array 0-$last: $SWEEP), evaluate $evaluate; logs in $LOGS" >&2
if [ "$WAIT" = 1 ]; then
  report=$(submit --dependency "afterok:$evaluate" --output "$LOGS/%x-%j.out" --wait "$here/report.sbatch") || true
  # sbatch --wait exits 0 for a job cancelled before it started (a stage it depends on failed)
  state=$(scontrol --oneliner show job "${report%%$'\n'*}" | grep -o 'JobState=[A-Z_]*' || true)
  if [ "$state" != JobState=COMPLETED ]; then
    echo "error: the report job ${report%%$'\n'*} ended ${state#JobState=} (a stage failed): see the logs in $LOGS" >&2
    exit 1
  fi
  echo "$RUNS/report"
else
  submit --dependency "afterok:$evaluate" --output "$LOGS/%x-%j.out" "$here/report.sbatch"
fi
