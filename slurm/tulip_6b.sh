#!/usr/bin/env bash
# TULIP 6B (InternViT-6B-shaped vision + 1B text): 128 (up to 512) nodes x 8 H100 80GB, TP=8 x PP=4.
#
# Submit from the repository root (job logs go to logs/, which ships with the repo):
#   sbatch slurm/tulip_6b.sh [key=value ...]
# Command-line flags override the #SBATCH lines, e.g. the largest layout: sbatch --nodes=512 slurm/tulip_6b.sh
# See slurm/README.md (scaling, preemption/requeue, containers) and slurm/common.sh (env knobs).
#SBATCH --job-name=tulip-6b
#SBATCH --nodes=128
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out

RECIPE=${RECIPE:-recipes/tulip_6b.yaml}
source "${REPO_DIR:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
