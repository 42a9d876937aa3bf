# Shared body of slurm/geco_text.sh and slurm/geco_image.sh (sourced, not submitted).
#
# Runs `tulip-mega geco $GECO_STAGE` once per srun task (one per GPU). Each process works out
# its worker index from SLURM's environment: (array index - min) * ntasks + procid, of
# array count * ntasks (tulip_mega/datagen/geco/run.py: worker_from_env), and takes every
# num_workers-th shard. SLURM_LOCALID picks the GPU.
#
# Resumable: a shard whose output exists is complete and skipped; a killed task leaves only
# OUT/<name>.partial, overwritten next time. Resubmit the same array to finish a run.
# Nothing is downloaded (HF_HUB_OFFLINE=1): GECO_MODEL is a local folder or a cached name.
#
# Environment knobs:
#   GECO_IN, GECO_OUT (required)  input shard spec, output folder
#   GECO_MODEL                    model folder / cached name (text: also eda = rule-based fallback)
#   GECO_SEED                     run seed (default 0); each shard's seed is (seed, shard name)
#   PYTHON                        interpreter (default python3)
#   CONTAINER_IMAGE               run inside this image via pyxis (mounts: CONTAINER_MOUNTS)

set -uo pipefail
: "${GECO_STAGE:?geco_common.sh is sourced by slurm/geco_text.sh or slurm/geco_image.sh}"
REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$REPO_DIR" || { echo "geco_$GECO_STAGE.sh: cannot cd to REPO_DIR=$REPO_DIR" >&2; exit 1; }
: "${GECO_IN:?set GECO_IN to the input shard spec}"
: "${GECO_OUT:?set GECO_OUT to the output folder}"
: "${GECO_MODEL:?set GECO_MODEL to a local model folder or cached name}"
PYTHON=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
: "${OMP_NUM_THREADS:=${SLURM_CPUS_PER_TASK:-1}}"; export OMP_NUM_THREADS
# srun does not inherit the job's --cpus-per-task (SLURM >= 22.05): pass it on.
[[ -n "${SLURM_CPUS_PER_TASK:-}" ]] && export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK

CMD=("$PYTHON" -m tulip_mega.cli geco "$GECO_STAGE" --model "$GECO_MODEL" --in "$GECO_IN" --out "$GECO_OUT"
     --seed "${GECO_SEED:-0}" "$@")
SRUN_ARGS=(--kill-on-bad-exit=1)
if [[ -n "${CONTAINER_IMAGE:-}" ]]; then
    SRUN_ARGS+=(--container-image="$CONTAINER_IMAGE"
                --container-mounts="${CONTAINER_MOUNTS:-$REPO_DIR:$REPO_DIR}" --container-workdir="$REPO_DIR")
fi
echo "[geco-$GECO_STAGE $(date +%FT%T)] array task ${SLURM_ARRAY_TASK_ID:-0}/${SLURM_ARRAY_TASK_COUNT:-1}: ${CMD[*]}"
srun "${SRUN_ARGS[@]}" "${CMD[@]}"
