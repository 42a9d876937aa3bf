#!/usr/bin/env bash
# Install tulip-mega for CPU use (laptop, CI) into ./.venv.
#
# torch==2.13.0 is pinned: pip finds a CPU build of exactly that version (any other pin pulls
# gigabytes of CUDA wheels). megatron-core 0.16.1 is the newest release that installs on
# Python 3.11. megatron-energon 7.4.1 (setup.py) requires torch without a version, so the pin holds.
# GPU machines use `pip install -e .[gpu]` in an NVIDIA container instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# The dali extra (nvidia-dali-cuda120, ~0.5 GB) runs its CPU pipelines here too: the default loader.
.venv/bin/python -m pip install --quiet "torch==2.13.0" "megatron-core==0.16.1" "nvidia-dali-cuda120==2.4.0" -e ".[dev,dali]"
# open_clip (dev extra) pulls PyPI's torchvision, a CUDA build that cannot import beside the CPU
# torch; a start-up hook defines the two operator schemas it needs first (see the file's docstring).
SITE="$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
cp scripts/torchvision_cpu_shim.py "$SITE/_tulip_torchvision_cpu_shim.py"
echo "import _tulip_torchvision_cpu_shim" > "$SITE/_tulip_torchvision_cpu_shim.pth"
echo "installed: $(.venv/bin/python -W ignore -c 'import torch, megatron.core as m, nvidia.dali as d; import torchvision, open_clip; from importlib.metadata import version as v; print("torch", torch.__version__, "| megatron-core", m.__version__, "| dali", d.__version__, "| open_clip", open_clip.__version__, "| energon", v("megatron-energon"))')"
