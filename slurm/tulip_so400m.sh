#!/usr/bin/env bash
# TULIP SO400M (SigLIP so400m/14 towers): 16 nodes x 8 H100 80GB = 128 GPUs.
#
# Submit from the repository root (job logs go to logs/, which ships with the repo):
#   sbatch slurm/tulip_so400m.sh [key=value ...]
# Command-line flags override the #SBATCH lines, e.g. half the nodes: sbatch --nodes=8 slurm/tulip_so400m.sh
# See slurm/README.md (scaling, preemption/requeue, containers) and slurm/common.sh (env knobs).
#SBATCH --job-name=tulip-so400m
#SBATCH --nodes=16
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out

RECIPE=${RECIPE:-recipes/tulip_so400m.yaml}
source "${REPO_DIR:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
