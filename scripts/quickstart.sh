#!/usr/bin/env bash
# From a fresh clone: install (CPU), write the synthetic shapes dataset and its tokenizer, and
# train the tiny recipe with tensor parallel 2 x pipeline parallel 2 on 4 local processes.
# Extra arguments are recipe overrides, e.g. `bash scripts/quickstart.sh train.steps=50`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_cpu.sh
export PATH="$PWD/.venv/bin:$PATH"
# The shapes dataset at the generator's DATASET_VERSION (tulip_mega/datagen/synthetic.py). One written by
# an older version is replaced (its shards, classes.json and tokenizer; nothing else in data/shapes).
version=$(python -c 'from tulip_mega.datagen.synthetic import DATASET_VERSION; print(DATASET_VERSION)')
if ! grep -qs "\"version\": $version\b" data/shapes/classes.json; then
  rm -f data/shapes/train-*.tar data/shapes/val-*.tar data/shapes/classes.json data/shapes/tokenizer.*
  tulip-mega data synth --out data/shapes
fi
if [ ! -f data/shapes/tokenizer.model ]; then
  tulip-mega tokenizer train --data "data/shapes/train-{000000..000007}.tar" --out data/shapes/tokenizer
fi
torchrun --nproc_per_node 4 -m tulip_mega.train recipes/tiny_cpu.yaml "$@"
