#!/usr/bin/env bash
# GeCo image stage (instruction-edited key.pos.jpg / key.neg.jpg) over a shard set, as a SLURM
# array: each array task runs one process per GPU; together they split the shards.
#
# Submit from the repository root (job logs go to logs/), on the output of geco_text.sh:
#   GECO_IN='/data/x-geco/{000000..099999}.tar' GECO_OUT=/data/x-geco2 GECO_MODEL=/models/instruct-pix2pix \
#       sbatch --array=0-127 slurm/geco_image.sh [extra `tulip-mega geco image` flags, e.g. --steps 30]
# GECO_MODEL is a diffusers instruction-editing pipeline folder (e.g. timbrooks/instruct-pix2pix
# saved with save_pretrained) or a name already in the HF cache.
# Knobs, resume and worker split: slurm/geco_common.sh.
#SBATCH --job-name=geco-image
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=08:00:00
#SBATCH --array=0-31
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%A_%a.out

GECO_STAGE=image
source "${REPO_DIR:-${SLURM_SUBMIT_DIR:-.}}/slurm/geco_common.sh"
