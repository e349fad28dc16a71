# Sourced by every job script of examples/slurm/ (after it found the repository) and by submit.sh: the
# site's settings (examples/lib/site.sh), the sweep's settings, the paths every job agrees on, and the
# helpers that launch a stage as a job step and make a requeued job continue instead of starting over.
set -euo pipefail
# shellcheck source=examples/lib/site.sh
source "$BLTOOL_REPO/examples/lib/site.sh"
for bltool_setting in BLTOOL_RUNS_ROOT BLTOOL_DATA_ROOT; do
  if [ -z "${!bltool_setting:-}" ]; then
    echo "error: $bltool_setting is not set (set it in the site env file: examples/site.env.example)" >&2
    exit 2
  fi
done
unset bltool_setting

RUN=${RUN:-sweep}                   # the sweep's name: its runs go to $BLTOOL_RUNS_ROOT/$RUN
RUNS=$BLTOOL_RUNS_ROOT/$RUN
DATA=${DATA:-$BLTOOL_DATA_ROOT/$RUN}       # the prepare-data output
STUDENT=${STUDENT:-$RUNS/student}          # the build-student output
CACHE=${CACHE:-$RUNS/teacher-logits}       # the teacher-logits output the distill tasks read
LOGS=$RUNS/logs
TEACHER=${TEACHER:-${BLTOOL_TEACHER:-}}
CORPUS=${CORPUS:-${BLTOOL_CORPUS:-}}
GLOB=${GLOB:-**/*.txt}              # which files of a CORPUS directory are documents
HELDOUT=${HELDOUT:-0.002}
SEQ_LEN=${SEQ_LEN:-1024}
MODE=${MODE:-mixed}
LAYERS=${LAYERS:-6}
SWEEP=${SWEEP:-kd-lora budgeted-lora:0.0 budgeted-lora:0.4 budgeted-lora:0.8}  # one array task each
TOKENS=${TOKENS:-20M}
BATCH=${BATCH:-8}
TOP_K=${TOP_K:-64}
NPROC_PER_NODE=${NPROC_PER_NODE:-1} # torchrun processes per node (GPUs per node; 1 on CPU nodes)
TORCHRUN=${TORCHRUN:-torchrun}
DISTILL_ARGS=${DISTILL_ARGS:-}      # extra distill flags, e.g. "--rank 64 --save-every 500"
TEACHER_LOGITS_ARGS=${TEACHER_LOGITS_ARGS:-}  # e.g. "--batch-size 32"
PPL_ARGS=${PPL_ARGS:-}
ICL_ARGS=${ICL_ARGS:-}
BENCH_ARGS=${BENCH_ARGS:-}
export RUN DATA STUDENT CACHE
if [ -z "$TEACHER" ]; then
  echo "error: BLTOOL_TEACHER is not set (set it in the site env file, or TEACHER)" >&2
  exit 2
fi


# The sweep's task $1 (an array index): sets `name` (its directory under RUNS) and `method_args`.
sweep_task() {
  local specs spec
  read -r -a specs <<< "$SWEEP"
  if [ "$1" -ge "${#specs[@]}" ]; then
    echo "error: array task $1, but SWEEP has ${#specs[@]} entries: $SWEEP" >&2
    exit 2
  fi
  spec=${specs[$1]}
  name=${spec/:/-}
  method_args=(--method "${spec%%:*}")
  if [ "$spec" != "${spec%%:*}" ]; then method_args+=(--budget "${spec#*:}"); fi
}

# Whether this job continues an earlier attempt: Slurm requeued it (SLURM_RESTART_COUNT > 0), or the
# sweep was resubmitted with RESUME=1. A first attempt starts every stage over (--overwrite).
resuming() {
  [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ] || [ "${RESUME:-0}" = 1 ]
}

# Whether the stage writing $1 can be skipped: a continued job whose output is finished (outputs are
# written whole, so a manifest means done).
finished() {
  resuming && [ -f "$1/manifest.json" ]
}

# Run a stage as a job step. The job scripts ask for --signal=B:TERM@SECONDS: before the time limit Slurm
# sends SIGTERM to this shell, which passes it on to the job's steps (`scancel --signal=TERM`: slurmstepd
# signals every task; srun itself would kill the step on SIGTERM); bltool's distill and teacher-logits
# checkpoint and stop, and the job requeues itself to continue from the checkpoint. A job that is no longer
# running (cancelled, or requeued by `scontrol requeue`: Slurm signals its steps itself) is left as it is.
bltool_signalled=0
bltool_child=
# this job: an array task by its array id (an array task's SLURM_JOB_ID can equal the whole array's id)
bltool_job=${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID:-}}
bltool_job=${bltool_job:-${SLURM_JOB_ID:-}}
bltool_running() {
  [ "$(squeue --noheader --jobs "$bltool_job" --format %T 2>/dev/null)" = RUNNING ]
}
bltool_forward() {
  bltool_signalled=1
  if [ -n "$bltool_job" ]; then
    if bltool_running; then scancel --signal=TERM "$bltool_job" & fi  # in the background: scancel may retry
  elif [ -n "$bltool_child" ]; then
    kill -TERM "$bltool_child" 2>/dev/null || true
  fi
}
trap bltool_forward TERM
step() {
  local rc
  "$@" &
  bltool_child=$!
  while :; do
    rc=0
    wait "$bltool_child" || rc=$?
    kill -0 "$bltool_child" 2>/dev/null || break  # else `wait` returned for the trapped signal: wait on
  done
  bltool_child=
  if [ "$bltool_signalled" = 1 ] && [ "$rc" != 0 ] && [ -n "$bltool_job" ] && bltool_running; then
    echo "bltool: stopped by SIGTERM before the time limit; requeueing job $bltool_job to continue" >&2
    scontrol requeue "$bltool_job"
  fi
  return "$rc"
}

# One process on one node of the allocation.
single() {
  step srun --nodes=1 --ntasks=1 "$@"
}

# torchrun on every node of the allocation, NPROC_PER_NODE processes each, rendezvous (c10d) at the
# allocation's first node on a port of this job's own (array tasks may share a node).
distributed() {
  local head
  head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  step srun --nodes="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \
    "$TORCHRUN" --nnodes="$SLURM_JOB_NUM_NODES" --nproc-per-node="$NPROC_PER_NODE" --rdzv-backend=c10d \
    --rdzv-endpoint="$head:${RDZV_PORT:-$((20000 + SLURM_JOB_ID % 20000))}" --rdzv-id="$SLURM_JOB_ID" \
    -m bltool "$@"
}

if [ -n "${SLURM_JOB_ID:-}" ]; then
  echo "bltool: job $SLURM_JOB_NAME $bltool_job, attempt" \
    "$((${SLURM_RESTART_COUNT:-0} + 1)), on $SLURM_JOB_NODELIST at $(date -u +%FT%TZ)" >&2
fi
