# Shared body of the slurm/tulip_*.sh batch scripts; they set RECIPE and source this file.
#
#   sbatch slurm/tulip_1b.sh [key=value ...]        (submit from the repository root)
#
# What it does, per job (and again for each requeue of the same job):
#   - run folder $RUN_ROOT/$RUN_NAME (defaults ./runs and the job name): stable across
#     requeues, so `--resume` (always passed) continues from the newest checkpoint there;
#   - writes the code version, launch line and resolved config into $RUN_DIR/launch/;
#   - starts one task per GPU: srun ... $PYTHON -m tulip_mega.train $RECIPE <overrides> --resume
#     (inside a pyxis container when CONTAINER_IMAGE is set);
#   - forwards the pre-timeout warning (#SBATCH --signal=B:USR1@300 reaches this batch shell
#     only) to every task: they checkpoint at the next step boundary and exit 75;
#   - exit 75 from the step (stopped early after checkpointing) -> `scontrol requeue`, the
#     next run resumes; 0 -> done; anything else -> the job fails with that code and is NOT
#     requeued: 4 = too many consecutive non-finite steps (train.max_skipped_steps), 5 = pipeline
#     stages read different samples, 2 = config error, 3 = checkpoint error (tulip_mega/train.py).
#
# Environment knobs (all optional):
#   PYTHON           interpreter on the compute nodes (default python3; e.g. .venv/bin/python)
#   RUN_ROOT         parent of run folders (default ./runs, relative to the submit directory)
#   RUN_NAME         run folder name (default: the job name); keep it fixed across resubmissions
#   CONTAINER_IMAGE  run the tasks in this image via pyxis (srun --container-image)
#   CONTAINER_MOUNTS pyxis mounts (default: the repository and RUN_ROOT at the same paths)
#   MAX_REQUEUES     stop requeueing after this many restarts (default 1000)
#   SRUN_EXTRA       extra srun flags, word-split (e.g. "--cpu-bind=none")
#   SRUN_WAIT        seconds srun lets the other tasks finish after the first exits (default 120)
# GPU / task counts come from the allocation: override the #SBATCH lines on the sbatch
# command line, e.g. `sbatch --nodes=1 --ntasks-per-node=2 --gpus-per-node=0 ...` on a CPU box.

set -uo pipefail

: "${RECIPE:?set RECIPE (e.g. recipes/tulip_1b.yaml) before sourcing common.sh}"
REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$REPO_DIR" || { echo "common.sh: cannot cd to REPO_DIR=$REPO_DIR" >&2; exit 1; }

PYTHON=${PYTHON:-python3}
RUN_ROOT=${RUN_ROOT:-runs}
RUN_NAME=${RUN_NAME:-${SLURM_JOB_NAME:-tulip}}
RUN_DIR="$RUN_ROOT/$RUN_NAME"
MAX_REQUEUES=${MAX_REQUEUES:-1000}
RESTART=${SLURM_RESTART_COUNT:-0}
JOB_ID=${SLURM_JOB_ID:-local}
EXIT_STOPPED_EARLY=75   # tulip_mega/train.py: checkpointed and stopped early (signal / wall time)

mkdir -p "$RUN_DIR/launch"
LAUNCH_TAG="job${JOB_ID}-restart${RESTART}"
say() { echo "[tulip-slurm $(date +%FT%T)] $*"; }

# --- performance settings Megatron uses on H100 (ignored on a CPU/gloo run) -----------------
# Cluster/site values already in the environment win (":=" only sets unset variables).
: "${CUDA_DEVICE_MAX_CONNECTIONS:=1}"     # keeps TP/SP communication ordered before compute kernels
: "${TORCH_NCCL_AVOID_RECORD_STREAMS:=1}" # frees NCCL buffers promptly
: "${TORCH_NCCL_ASYNC_ERROR_HANDLING:=1}" # a failed collective kills the job instead of hanging
: "${NCCL_IB_TIMEOUT:=22}"                # tolerate IB link flaps on large jobs
: "${NCCL_IB_QPS_PER_CONNECTION:=4}"
: "${NCCL_NVLS_ENABLE:=0}"
: "${NVTE_FWD_LAYERNORM_SM_MARGIN:=16}"   # leave SMs for overlapped communication
: "${NVTE_BWD_LAYERNORM_SM_MARGIN:=16}"
: "${OMP_NUM_THREADS:=${SLURM_CPUS_PER_TASK:-1}}"
export CUDA_DEVICE_MAX_CONNECTIONS TORCH_NCCL_AVOID_RECORD_STREAMS TORCH_NCCL_ASYNC_ERROR_HANDLING \
    NCCL_IB_TIMEOUT NCCL_IB_QPS_PER_CONNECTION NCCL_NVLS_ENABLE NVTE_FWD_LAYERNORM_SM_MARGIN \
    NVTE_BWD_LAYERNORM_SM_MARGIN OMP_NUM_THREADS
export PYTHONUNBUFFERED=1
# Rendezvous port: distinct per job and per restart, so a requeued run does not trip over the
# previous run's socket (still in TIME_WAIT seconds later). Every task inherits it from here.
if [[ -z "${MASTER_PORT:-}" && "$JOB_ID" =~ ^[0-9]+$ ]]; then
    export MASTER_PORT=$(( 20000 + (JOB_ID % 4000) * 5 + RESTART % 5 ))
fi

# --- the training command ---------------------------------------------------------------------
# Our run.* keys come first so "$@" can still override anything (but keep run.name/output_dir
# stable across requeues: prefer RUN_ROOT / RUN_NAME).
TRAIN_ARGS=("$RECIPE" "run.output_dir=$RUN_ROOT" "run.name=$RUN_NAME" "$@" --resume)

# Not --kill-on-bad-exit: exit 75 is "bad" to srun, and the first rank to exit 75 would kill
# the others while they still finish. Instead srun ends the remaining tasks SRUN_WAIT seconds
# after the first one exits (a crashed rank also makes the NCCL/gloo collectives fail fast).
SRUN_ARGS=(--kill-on-bad-exit=0 --wait="${SRUN_WAIT:-120}")
if [[ -n "${CONTAINER_IMAGE:-}" ]]; then
    abs_root=$(cd "$RUN_ROOT" && pwd)
    SRUN_ARGS+=(--container-image="$CONTAINER_IMAGE"
                --container-mounts="${CONTAINER_MOUNTS:-$REPO_DIR:$REPO_DIR,$abs_root:$abs_root}"
                --container-workdir="$REPO_DIR")
fi
# shellcheck disable=SC2206  # word splitting of SRUN_EXTRA is intended
SRUN_ARGS+=(${SRUN_EXTRA:-})

# --- record what runs: code version, launch line, resolved config ----------------------------
{
    echo "job:       $JOB_ID (restart $RESTART) name=${SLURM_JOB_NAME:-} nodes=${SLURM_JOB_NODELIST:-} ntasks=${SLURM_NTASKS:-}"
    echo "git rev:   $(git -C "$REPO_DIR" rev-parse HEAD 2>/dev/null || echo unknown)"
    echo "git dirty: $(git -C "$REPO_DIR" status --porcelain 2>/dev/null | grep -c . || true) changed files"
    echo "container: ${CONTAINER_IMAGE:-none}"
    printf 'command:   srun'; printf ' %q' "${SRUN_ARGS[@]}" "$PYTHON" -m tulip_mega.train "${TRAIN_ARGS[@]}"; echo
} > "$RUN_DIR/launch/$LAUNCH_TAG.txt"
git -C "$REPO_DIR" diff HEAD > "$RUN_DIR/launch/$LAUNCH_TAG.diff" 2>/dev/null || true
if [[ -z "${CONTAINER_IMAGE:-}" ]]; then
    # Resolve (and validate) the config on the batch node: a bad key fails here in seconds,
    # before any GPU is touched. In a container the trainer's own run-folder config.yaml serves.
    overrides=("${TRAIN_ARGS[@]:1}"); unset 'overrides[${#overrides[@]}-1]'  # drop RECIPE, --resume
    if ! "$PYTHON" -m tulip_mega.cli config "$RECIPE" "${overrides[@]}" > "$RUN_DIR/launch/$LAUNCH_TAG.config.json"; then
        say "config error (see above); not launching"
        exit 2
    fi
fi
say "run folder $RUN_DIR; launch record $RUN_DIR/launch/$LAUNCH_TAG.txt"

# --- launch, forward the warning signal, decide -------------------------------------------------
SRUN_PID=""
forward() {
    say "received SIG$1: asking every task to checkpoint and stop"
    [[ -n "$SRUN_PID" ]] && kill -s "$1" "$SRUN_PID" 2>/dev/null
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

srun "${SRUN_ARGS[@]}" "$PYTHON" -m tulip_mega.train "${TRAIN_ARGS[@]}" &
SRUN_PID=$!
while :; do
    wait "$SRUN_PID"; rc=$?
    # A trapped signal interrupts `wait` (rc > 128) while srun still runs: wait again.
    if (( rc > 128 )) && kill -0 "$SRUN_PID" 2>/dev/null; then continue; fi
    break
done
trap - USR1 TERM

case $rc in
    0)
        say "training finished"
        exit 0 ;;
    "$EXIT_STOPPED_EARLY")
        if (( RESTART >= MAX_REQUEUES )); then
            say "stopped early after checkpointing; MAX_REQUEUES=$MAX_REQUEUES reached, not requeueing"
            exit "$rc"
        fi
        say "stopped early after checkpointing: requeueing job $JOB_ID (the next run resumes)"
        # The requeue ends this batch shell; nothing after it runs.
        scontrol requeue "$JOB_ID" || { say "scontrol requeue failed"; exit "$rc"; }
        sleep 60
        exit "$rc" ;;
    4)
        say "training stopped: train.max_skipped_steps consecutive non-finite steps (exit 4); not requeueing," \
            "a resume would diverge the same way: lower the LR or resume from an earlier checkpoint"
        exit "$rc" ;;
    5)
        say "training stopped: pipeline stages read different samples (exit 5); not requeueing"
        exit "$rc" ;;
    *)
        say "training failed with exit code $rc"
        exit "$rc" ;;
esac
