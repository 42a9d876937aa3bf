#!/usr/bin/env bash
# GPU acceptance: what CI cannot run (NCCL layouts, TE / FP8, DALI mixed decode, overlapped
# gradient reduction, GPU fusions, a TE checkpoint used on the CPU, MFU), in one command on one
# GPU node; one markdown report. On a machine without a GPU every GPU check reports "skip" and why.
#
#   bash scripts/gpu_acceptance.sh [--out gpu_acceptance.md] [--only cuda_vs_cpu,mfu] [--quick]
#
# Run it inside the environment that trains (an NGC PyTorch container with `pip install -e .[gpu]`,
# or .venv on a CPU box). PYTHON picks the interpreter (default: .venv/bin/python if present, else python3).
# Exit status 1 when a check failed; the report lists every check with its numbers.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONUNBUFFERED=1
exec "$PYTHON" -W ignore benchmarks/gpu_acceptance.py "$@"
