"""The SLURM batch scripts on a real (single-node, loopback) SLURM cluster.

`.ci/run` starts one with slurm/ci/start_cluster.sh before the tests; these tests skip (saying
why) where `sbatch` is missing or no cluster answers. They submit slurm/tulip_1b.sh exactly as a
user would, with sbatch flags shrinking the allocation to 2 CPU tasks and no GPUs, and recipe
overrides shrinking the model to the debug size:

- a plain run finishes (exit 0, not requeued) and leaves `latest` and metrics.jsonl;
- the pre-timeout warning (USR1 to the batch shell, as `--signal=B:USR1@300` sends it) makes
  every rank checkpoint and exit 75; the script requeues the job, the next run resumes, and the
  job finishes with every step logged exactly once.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tulip_mega.training.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "slurm" / "tulip_1b.sh"


def _cluster_problem() -> str | None:
    if shutil.which("sbatch") is None:
        return "sbatch is not on PATH (install slurm-wlm; .ci/run starts a cluster with slurm/ci/start_cluster.sh)"
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"sinfo failed: {e}"
    states = out.stdout.split()
    if out.returncode != 0 or not any(s.startswith(("idle", "mixed", "alloc", "complet")) for s in states):
        return f"no SLURM cluster is up (sinfo: {(out.stdout + out.stderr).strip()!r}); run slurm/ci/start_cluster.sh"
    return None


pytestmark = [pytest.mark.multiprocess, pytest.mark.skipif(_cluster_problem() is not None,
                                                           reason=str(_cluster_problem()))]

# 2 tasks on 1 node, no GPUs: the sbatch command-line flags override the script's #SBATCH lines.
SBATCH_FLAGS = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--time=00:10:00"]




def _tiny(data: dict, steps: int) -> list[str]:
    """Overrides that turn the 1B recipe into a 2-rank CPU run (DP=2)."""
    return [
        "model.size=debug", "model.vision.image_size=32", "model.vision.patch_size=8",
        "precision.dtype=fp32", "precision.fp8=null", "recompute.granularity=null",
        "parallel.tensor_parallel=1", "parallel.pipeline_parallel=1", "parallel.sequence_parallel=false",
        "parallel.distributed_optimizer=false", "parallel.overlap_grad_reduce=false",
        f"train.steps={steps}", "train.global_batch_size=16", "train.micro_batch_size=8",
        "optim.warmup_steps=2", "run.log_interval=1", "checkpoint.interval=0",
        f"data.train_shards={data['train']}", f"data.tokenizer={data['tokenizer']}",
        "data.shuffle_buffer=64", "logging.tensorboard=false",
    ]


def _submit(tmp_path: Path, name: str, overrides: list[str]) -> str:
    env = dict(os.environ, PYTHON=sys.executable, RUN_ROOT=str(tmp_path / "runs"), RUN_NAME=name)
    out = subprocess.run(
        ["sbatch", "--parsable", *SBATCH_FLAGS, f"--job-name=ci-{name}", f"--output={tmp_path}/slurm-%j.out",
         str(SCRIPT), *overrides],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=30,
    )
    assert out.returncode == 0, f"sbatch failed: {out.stderr}"
    return out.stdout.strip().split(";")[0]


def _job(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=10)
    assert out.returncode == 0, f"scontrol show job {job_id}: {out.stderr}"
    fields = {}
    for token in out.stdout.split():
        key, sep, value = token.partition("=")
        if sep:
            fields.setdefault(key, value)
    return fields


def _log(tmp_path: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(tmp_path.glob("slurm-*.out")))


def _wait_done(job_id: str, tmp_path: Path, timeout: float = 150.0) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = _job(job_id)
        if job["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return job
        time.sleep(0.5)
    subprocess.run(["scancel", job_id])
    pytest.fail(f"job {job_id} did not finish in {timeout:.0f} s; last state {job}\n{_log(tmp_path)}")


def _steps(run: Path) -> list[int]:
    return [m["step"] for m in read_metrics(run / "metrics.jsonl")]


def test_sbatch_runs_to_completion(shapes_data, tmp_path):
    job_id = _submit(tmp_path, "plain", _tiny(shapes_data, steps=4))
    job = _wait_done(job_id, tmp_path)
    log = _log(tmp_path)
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", f"{job}\n{log}"
    assert job["Restarts"] == "0", "a finished run must not requeue itself"
    run = tmp_path / "runs" / "plain"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000004", log
    assert _steps(run) == [1, 2, 3, 4]
    # The launch record: code version, the srun line, the resolved config.
    record = run / "launch" / f"job{job_id}-restart0.txt"
    assert "git rev:" in record.read_text() and "--resume" in record.read_text()
    assert '"size": "debug"' in (run / "launch" / f"job{job_id}-restart0.config.json").read_text()
    assert "training finished" in log


def test_warning_signal_checkpoints_requeues_and_resumes(shapes_data, tmp_path):
    steps = 30
    run = tmp_path / "runs" / "preempted"
    job_id = _submit(tmp_path, "preempted", _tiny(shapes_data, steps=steps))
    # Wait for a few steps, then send what `--signal=B:USR1@300` sends: USR1 to the batch shell.
    deadline = time.monotonic() + 120
    while not ((run / "metrics.jsonl").exists() and len(_steps(run)) >= 3):
        assert time.monotonic() < deadline, f"no training progress\n{_job(job_id)}\n{_log(tmp_path)}"
        assert _job(job_id)["JobState"] in ("PENDING", "RUNNING", "CONFIGURING"), _log(tmp_path)
        time.sleep(0.3)
    sig = subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], capture_output=True, text=True)
    assert sig.returncode == 0, sig.stderr

    job = _wait_done(job_id, tmp_path)
    log = _log(tmp_path)
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", f"{job}\n{log}"
    assert int(job["Restarts"]) == 1, f"expected exactly one requeue: {job}\n{log}"
    assert "requeueing job" in log and "training finished" in log, log
    # The first run stopped at some step k < steps after checkpointing; the second resumed there.
    assert (run / "launch" / f"job{job_id}-restart1.txt").exists()
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{steps:07d}"
    assert _steps(run) == list(range(1, steps + 1)), "a step was lost or repeated across the requeue"
