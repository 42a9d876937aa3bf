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
#   - gives each task its share of the node's CPUs (--cpus-per-task, bound to cores socket by
#     socket) and sets OMP_NUM_THREADS to the cores its loader threads leave;
#   - forwards the pre-timeout warning (#SBATCH --signal=B:USR1@300 reaches this batch shell
#     only) to every task: they checkpoint at the next step boundary and exit 75 (a signal
#     before the tasks start requeues the job without starting them);
#   - exit 75 from the step (stopped early after checkpointing) -> `scontrol requeue`, the
#     next run resumes; 0 -> done; anything else -> the job fails with that code and is NOT
#     requeued: 4 = too many consecutive non-finite steps (train.max_skipped_steps), 5 = pipeline
#     stages read different samples, 2 = config error, 3 = checkpoint error (tulip_mega/train.py).
#
# Environment knobs (all optional):
#   PYTHON           interpreter on the compute nodes (default python3; e.g. .venv/bin/python)
#   RUN_ROOT         parent of run folders (default ./runs, relative to the submit directory)
#   RUN_NAME         run folder name (default: the job name); keep it fixed across resubmissions
#   CONTAINER_IMAGE  run the tasks in this image via pyxis (srun --container-image); the config
#                    check then runs in the image too (one task)
#   CONTAINER_MOUNTS pyxis mounts (default: the repository, RUN_ROOT, the recipe's folder and every
#                    folder the resolved recipe reads or writes: tulip_mega/slurm_launch.py)
#   HOST_PYTHON      python3 on the batch node for tulip_mega/slurm_launch.py (standard library only)
#   CPUS_PER_TASK    CPUs per task (default: sbatch --cpus-per-task, else the node's CPUs / its tasks)
#   SRUN_CPU_BIND    srun --cpu-bind (default cores; "none" = no binding)
#   SRUN_DISTRIBUTION srun --distribution (default block:block: ranks fill sockets in GPU order)
#   OMP_NUM_THREADS  default: CPUS_PER_TASK minus the rank's loader threads and workers (at least 1)
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
export CUDA_DEVICE_MAX_CONNECTIONS TORCH_NCCL_AVOID_RECORD_STREAMS TORCH_NCCL_ASYNC_ERROR_HANDLING \
    NCCL_IB_TIMEOUT NCCL_IB_QPS_PER_CONNECTION NCCL_NVLS_ENABLE NVTE_FWD_LAYERNORM_SM_MARGIN \
    NVTE_BWD_LAYERNORM_SM_MARGIN
export PYTHONUNBUFFERED=1
# Rendezvous port: distinct per job and per restart, so a requeued run does not trip over the
# previous run's socket (still in TIME_WAIT seconds later). Every task inherits it from here.
if [[ -z "${MASTER_PORT:-}" && "$JOB_ID" =~ ^[0-9]+$ ]]; then
    export MASTER_PORT=$(( 20000 + (JOB_ID % 4000) * 5 + RESTART % 5 ))
fi

# --- stop signals before the launch ---------------------------------------------------------------
# Until the tasks run there is nothing to checkpoint: a warning (USR1) or TERM that arrives
# now is remembered, and the job is requeued without starting them (see "launch" below).
SRUN_PID=""
PENDING_SIGNAL=""
forward() {
    if [[ -z "$SRUN_PID" ]]; then
        PENDING_SIGNAL=$1
        say "received SIG$1 before the tasks started"
        return
    fi
    say "received SIG$1: asking every task to checkpoint and stop"
    kill -s "$1" "$SRUN_PID" 2>/dev/null
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

requeue() {  # requeue this job (the next run resumes); the requeue ends this batch shell
    if (( RESTART >= MAX_REQUEUES )); then
        say "MAX_REQUEUES=$MAX_REQUEUES reached, not requeueing"
        exit "$EXIT_STOPPED_EARLY"
    fi
    say "requeueing job $JOB_ID (the next run resumes)"
    scontrol requeue "$JOB_ID" || { say "scontrol requeue failed"; exit "$EXIT_STOPPED_EARLY"; }
    sleep 60
    exit "$EXIT_STOPPED_EARLY"
}

# --- CPU cores per task -----------------------------------------------------------------------------
# A rank is more than one thread: the training thread, DALI's CPU threads (data.threads), the
# reader worker processes (data.reader_workers) and the loader's prefetch thread; `tulip-mega
# plan` prints the host cores per GPU the loader needs, and the trainer warns at start-up when
# its CPU affinity is smaller. SLURM gives a task one CPU unless told otherwise, so each task
# gets the node's CPUs / its tasks (224 / 8 = 28 on a DGX H100) unless sbatch --cpus-per-task
# (or CPUS_PER_TASK) says otherwise. srun gets the figure explicitly: since SLURM 22.05 srun
# does not inherit the job's --cpus-per-task (SRUN_CPUS_PER_TASK covers any other srun here).
tasks_on_node=${SLURM_NTASKS_PER_NODE:-${SLURM_TASKS_PER_NODE:-1}}
tasks_on_node=${tasks_on_node%%[(,]*}              # "8(x64)" -> 8
CPUS_PER_TASK=${CPUS_PER_TASK:-${SLURM_CPUS_PER_TASK:-$(( ${SLURM_CPUS_ON_NODE:-1} / tasks_on_node ))}}
(( CPUS_PER_TASK >= 1 )) || CPUS_PER_TASK=1
export SRUN_CPUS_PER_TASK=$CPUS_PER_TASK
# Binding: each task on its own cores, tasks laid out socket by socket (block:block: local
# ranks 0-3 on socket 0, 4-7 on socket 1). Local rank i drives GPU i, and on 2-socket 8-GPU
# nodes (DGX / HGX H100) GPUs 0-3 hang off socket 0: so each rank's loader threads run on its
# GPU's socket. SLURM's default spreads consecutive tasks over the sockets in turn (the second
# --distribution level defaults to cyclic), putting every other rank on the far socket.
CPU_ARGS=(--cpus-per-task="$CPUS_PER_TASK")
[[ "${SRUN_CPU_BIND:-cores}" != none ]] && CPU_ARGS+=(--cpu-bind="${SRUN_CPU_BIND:-cores}")
[[ "${SRUN_DISTRIBUTION:-block:block}" != none ]] && CPU_ARGS+=(--distribution="${SRUN_DISTRIBUTION:-block:block}")

# --- the training command ---------------------------------------------------------------------
# Our run.* keys come first so "$@" can still override anything (but keep run.name/output_dir
# stable across requeues: prefer RUN_ROOT / RUN_NAME).
TRAIN_ARGS=("$RECIPE" "run.output_dir=$RUN_ROOT" "run.name=$RUN_NAME" "$@" --resume)

# Not --kill-on-bad-exit: exit 75 is "bad" to srun, and the first rank to exit 75 would kill
# the others while they still finish. Instead srun ends the remaining tasks SRUN_WAIT seconds
# after the first one exits (a crashed rank also makes the NCCL/gloo collectives fail fast).
SRUN_ARGS=(--kill-on-bad-exit=0 --wait="${SRUN_WAIT:-120}" "${CPU_ARGS[@]}")
HOST_PYTHON=${HOST_PYTHON:-python3}
CONFIG_JSON="$RUN_DIR/launch/$LAUNCH_TAG.config.json"

# --- resolve (and validate) the config: a bad key fails here in seconds, before any GPU ----------
overrides=("${TRAIN_ARGS[@]:1}"); unset 'overrides[${#overrides[@]}-1]'  # drop RECIPE, --resume
CONFIG_CMD=("$PYTHON" -m tulip_mega.cli config "$RECIPE" "${overrides[@]}")
if [[ -n "${CONTAINER_IMAGE:-}" ]]; then
    # In the image (its interpreter and packages), as one task, with the repository, the run
    # root and the recipe's folder mounted; its output then names the folders the run needs.
    abs_root=$(cd "$RUN_ROOT" && pwd)
    recipe_dir=$(cd "$(dirname "$RECIPE")" && pwd)
    BASE_MOUNTS="$REPO_DIR:$REPO_DIR,$abs_root:$abs_root"
    [[ "$recipe_dir/" == "$REPO_DIR/"* ]] || BASE_MOUNTS+=",$recipe_dir:$recipe_dir"
    CONTAINER_ARGS=(--container-image="$CONTAINER_IMAGE" --container-workdir="$REPO_DIR")
    CONFIG_CMD=(srun --ntasks=1 --nodes=1 --cpus-per-task=1 "${CONTAINER_ARGS[@]}"
                --container-mounts="${CONTAINER_MOUNTS:-$BASE_MOUNTS}" "${CONFIG_CMD[@]}")
fi
if ! "${CONFIG_CMD[@]}" > "$CONFIG_JSON"; then
    say "config error (see above); not launching"
    exit 2
fi
if [[ -n "${CONTAINER_IMAGE:-}" ]]; then
    if [[ -z "${CONTAINER_MOUNTS:-}" ]]; then
        CONTAINER_MOUNTS=$("$HOST_PYTHON" -m tulip_mega.slurm_launch mounts "$CONFIG_JSON" --base "$REPO_DIR" \
                           --always "$REPO_DIR" --always "$abs_root" --always "$recipe_dir") \
            || { say "cannot derive the container mounts (see above); set CONTAINER_MOUNTS"; exit 2; }
    fi
    SRUN_ARGS+=("${CONTAINER_ARGS[@]}" --container-mounts="$CONTAINER_MOUNTS")
fi
# shellcheck disable=SC2206  # word splitting of SRUN_EXTRA is intended
SRUN_ARGS+=(${SRUN_EXTRA:-})
# OpenMP threads: the task's cores minus the rank's training thread, DALI threads, reader
# workers and prefetch thread (tulip_mega/slurm_launch.py omp_threads), at least 1; a site or
# user value wins. More would spin against the loader's threads on the same cores.
if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
    OMP_NUM_THREADS=$("$HOST_PYTHON" -m tulip_mega.slurm_launch omp-threads "$CONFIG_JSON" \
                      --cpus-per-task "$CPUS_PER_TASK") || OMP_NUM_THREADS=1
fi
export OMP_NUM_THREADS

# --- record what runs: code version, launch line, resolved config ----------------------------
{
    echo "job:       $JOB_ID (restart $RESTART) name=${SLURM_JOB_NAME:-} nodes=${SLURM_JOB_NODELIST:-} ntasks=${SLURM_NTASKS:-}"
    echo "git rev:   $(git -C "$REPO_DIR" rev-parse HEAD 2>/dev/null || echo unknown)"
    echo "git dirty: $(git -C "$REPO_DIR" status --porcelain 2>/dev/null | grep -c . || true) changed files"
    echo "container: ${CONTAINER_IMAGE:-none}"
    echo "cpus:      $CPUS_PER_TASK per task (node ${SLURM_CPUS_ON_NODE:-?} CPUs, $tasks_on_node tasks), OMP_NUM_THREADS=$OMP_NUM_THREADS"
    printf 'command:   srun'; printf ' %q' "${SRUN_ARGS[@]}" "$PYTHON" -m tulip_mega.train "${TRAIN_ARGS[@]}"; echo
} > "$RUN_DIR/launch/$LAUNCH_TAG.txt"
git -C "$REPO_DIR" diff HEAD > "$RUN_DIR/launch/$LAUNCH_TAG.diff" 2>/dev/null || true
say "run folder $RUN_DIR; launch record $RUN_DIR/launch/$LAUNCH_TAG.txt"

# --- launch, forward the warning signal, decide -------------------------------------------------
if [[ -n "$PENDING_SIGNAL" ]]; then
    say "SIG$PENDING_SIGNAL arrived before the launch: nothing to checkpoint yet"
    requeue
fi
srun "${SRUN_ARGS[@]}" "$PYTHON" -m tulip_mega.train "${TRAIN_ARGS[@]}" &
SRUN_PID=$!
# A signal between the two lines above was kept: pass it on (the trainer defers it from its start).
[[ -n "$PENDING_SIGNAL" ]] && forward "$PENDING_SIGNAL"
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
        say "stopped early (exit 75: checkpointed, or stopped before its first step with nothing new to save)"
        requeue ;;
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
