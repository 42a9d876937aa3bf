#!/usr/bin/env bash
# TULIP 1B (SigLIP g/16 vision + so400m text): 64 nodes x 8 H100 80GB = 512 GPUs.
#
# Submit from the repository root (job logs go to logs/, which ships with the repo):
#   sbatch slurm/tulip_1b.sh [key=value ...]
# Command-line flags override the #SBATCH lines, e.g. half the nodes: sbatch --nodes=32 slurm/tulip_1b.sh
# See slurm/README.md (scaling, preemption/requeue, containers) and slurm/common.sh (env knobs).
#SBATCH --job-name=tulip-1b
#SBATCH --nodes=64
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out

RECIPE=${RECIPE:-recipes/tulip_1b.yaml}
source "${REPO_DIR:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
