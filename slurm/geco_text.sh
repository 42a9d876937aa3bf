#!/usr/bin/env bash
# GeCo text stage over a shard set, as a SLURM array: each array task takes every
# (tasks x GPUs)-th shard; inside a task, one process per GPU (srun task = GPU).
#
# Submit from the repository root (job logs go to logs/):
#   GECO_IN='/data/x/{000000..099999}.tar' GECO_OUT=/data/x-geco GECO_MODEL=/models/qwen2.5-7b-instruct \
#       sbatch --array=0-63 slurm/geco_text.sh [extra `tulip-mega geco text` flags, e.g. --temperature 0]
#
# Resumable: a shard whose output exists is complete and skipped; a killed task leaves only
# OUT/<name>.partial, overwritten next time. Resubmit the same array to finish a run.
# Nothing is downloaded: GECO_MODEL is a local folder or a name already in the HF cache
# (HF_HUB_OFFLINE=1 is set); GECO_MODEL=eda uses the rule-based fallback (no GPU needed).
#
# Environment knobs:
#   GECO_IN, GECO_OUT (required)  input shard spec, output folder
#   GECO_MODEL                    model folder / cached name, or eda (default eda)
#   GECO_SEED                     run seed (default 0); each shard's seed is (seed, shard name)
#   PYTHON                        interpreter (default python3)
#   CONTAINER_IMAGE               run inside this image via pyxis (mounts: CONTAINER_MOUNTS)
#SBATCH --job-name=geco-text
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --array=0-15
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%A_%a.out

set -uo pipefail
REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$REPO_DIR" || { echo "geco_text.sh: cannot cd to REPO_DIR=$REPO_DIR" >&2; exit 1; }
: "${GECO_IN:?set GECO_IN to the input shard spec}"
: "${GECO_OUT:?set GECO_OUT to the output folder}"
PYTHON=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
: "${OMP_NUM_THREADS:=${SLURM_CPUS_PER_TASK:-1}}"; export OMP_NUM_THREADS

# worker = (array index - min) * ntasks + procid, of array count * ntasks: read from SLURM's
# environment by `tulip-mega geco text` (dataloaders/geco/run.py: worker_from_env).
CMD=("$PYTHON" -m tulip_mega.cli geco text --model "${GECO_MODEL:-eda}" --in "$GECO_IN" --out "$GECO_OUT"
     --seed "${GECO_SEED:-0}" "$@")
SRUN_ARGS=(--kill-on-bad-exit=1)
if [[ -n "${CONTAINER_IMAGE:-}" ]]; then
    SRUN_ARGS+=(--container-image="$CONTAINER_IMAGE"
                --container-mounts="${CONTAINER_MOUNTS:-$REPO_DIR:$REPO_DIR}" --container-workdir="$REPO_DIR")
fi
echo "[geco-text $(date +%FT%T)] array task ${SLURM_ARRAY_TASK_ID:-0}/${SLURM_ARRAY_TASK_COUNT:-1}: ${CMD[*]}"
srun "${SRUN_ARGS[@]}" "${CMD[@]}"
