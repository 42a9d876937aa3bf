#!/usr/bin/env bash
# GeCo text stage (paraphrases + meaning-changing rewrites into key.json) over a shard set, as a
# SLURM array: each array task runs one process per GPU; together they split the shards.
#
# Submit from the repository root (job logs go to logs/):
#   GECO_IN='/data/x/{000000..099999}.tar' GECO_OUT=/data/x-geco GECO_MODEL=/models/qwen2.5-7b-instruct \
#       sbatch --array=0-63 slurm/geco_text.sh [extra `tulip-mega geco text` flags, e.g. --temperature 0]
# GECO_MODEL=eda uses the rule-based fallback (no GPU needed: add --gpus-per-node=0).
# Knobs, resume and worker split: slurm/geco_common.sh. Run this stage before geco_image.sh
# (the image stage draws its negative edits from the text stage's rewrites).
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

GECO_STAGE=text
source "${REPO_DIR:-${SLURM_SUBMIT_DIR:-.}}/slurm/geco_common.sh"
