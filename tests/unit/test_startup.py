"""The first screen of a run: one line per fact on rank 0, no library chatter.

`python -m tulip_mega.train` on the tiny recipe (TP = PP = 1, 2 steps, real shards): the console
shows the layout, batch, contrastive batch, model, backend, layers, FP8 blocks, GPU switches,
loader and run folder lines;
megatron's parameter-bucket listing and the Transformer-Engine/Apex warnings are in the run
folder's debug.log only.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_start_up_prints_facts_and_sends_library_chatter_to_debug_log(shapes_data, tmp_path):
    cmd = [sys.executable, "-m", "tulip_mega.train", str(REPO / "recipes" / "tiny_cpu.yaml"),
           f"data.train_shards={shapes_data['train']}", f"data.tokenizer={shapes_data['tokenizer']}",
           f"run.output_dir={tmp_path}", "run.name=quiet", "train.steps=2", "optim.warmup_steps=1",
           "parallel.tensor_parallel=1", "parallel.pipeline_parallel=1", "eval.interval=0",
           "checkpoint.interval=0", "logging.tensorboard=false"]
    env = {**os.environ, "MASTER_PORT": str(_free_port()), "PYTHONWARNINGS": "default"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    screen = proc.stdout + proc.stderr
    assert proc.returncode == 0, screen[-3000:]
    for fact in ("layout: world 1 = TP 1 x PP 1 x DP 1", "batch: global", "contrastive batch", "model debug",
                 "backend: gloo on CPU", "layers: megatron-core local", "fp8: off (precision.fp8=null)",
                 "GPU switches: off (no CUDA)", "loader:"):
        assert sum(fact in line for line in screen.splitlines()) == 1, (fact, screen[-3000:])
    assert "run folder:" in screen
    assert "bucket" not in screen.lower(), screen[-3000:]
    assert "not installed" not in screen, screen[-3000:]
    debug = (tmp_path / "quiet" / "debug.log").read_text()
    assert "not installed" in debug and "bucket" in debug.lower()
