#!/usr/bin/env bash
# SigLIP 2 so400m (recipes/siglip2_so400m.yaml): 32 nodes x 8 H100 80GB = 256 GPUs.
#
# Submit from the repository root (job logs go to logs/, which ships with the repo):
#   sbatch slurm/siglip2_so400m.sh [key=value ...]
# Command-line flags override the #SBATCH lines, e.g. half the nodes: sbatch --nodes=8 slurm/siglip2_so400m.sh
# See slurm/README.md (scaling, preemption/requeue, containers) and slurm/common.sh (env knobs).
#SBATCH --job-name=siglip2-so400m
#SBATCH --nodes=32
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out

RECIPE=${RECIPE:-recipes/siglip2_so400m.yaml}
source "${REPO_DIR:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
