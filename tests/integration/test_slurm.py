"""The SLURM batch scripts on a real (single-node, loopback) SLURM cluster.

`.ci/run` starts one with slurm/ci/start_cluster.sh before the tests; these tests skip (saying
why) where `sbatch` is missing or no cluster answers. They submit slurm/tulip_1b.sh exactly as a
user would, with sbatch flags shrinking the allocation to 2 CPU tasks and no GPUs, and recipe
overrides shrinking the model to the debug size:

- a plain run finishes (exit 0, not requeued) and leaves `latest` and metrics.jsonl;
- the pre-timeout warning (USR1 to the batch shell, as `--signal=B:USR1@300` sends it) makes
  every rank checkpoint and exit 75; the script requeues the job, the next run resumes, and the
  job finishes with every step logged exactly once;
- the same warning while the ranks build their model (slowed down by tests/slow_build_python.py
  as `$PYTHON`): they stop at the first step boundary with exit 75 instead of dying, the job is
  requeued once and the next run finishes;
- each task gets the node's CPUs / its tasks (--cpus-per-task) and OMP_NUM_THREADS, as the
  launch record and the trainer's start-up line say.
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

REPO = Path(__file__).resolve().parents[2]
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


def _submit(tmp_path: Path, name: str, overrides: list[str], **env_extra: str) -> str:
    env = {**os.environ, "PYTHON": sys.executable, "RUN_ROOT": str(tmp_path / "runs"), "RUN_NAME": name, **env_extra}
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


def _wait_done(job_id: str, tmp_path: Path, timeout: float = 300.0) -> dict[str, str]:
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
    # 2 CPUs, 2 tasks: one core each, and the one OpenMP thread the loader's threads leave.
    assert "cpus:      1 per task (node 2 CPUs, 2 tasks), OMP_NUM_THREADS=1" in record.read_text()
    assert "host cpus: " in log and "OMP_NUM_THREADS=1, torch threads 1;" in log, log


def test_warning_signal_during_model_build_requeues_and_the_next_run_finishes(shapes_data, tmp_path):
    steps = 3
    run = tmp_path / "runs" / "early"
    wrapper = tmp_path / "python"  # $PYTHON: the trainer with a 15 s model build
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} {REPO / "tests" / "slow_build_python.py"} "$@"\n')
    wrapper.chmod(0o755)
    marker = tmp_path / "building"
    job_id = _submit(tmp_path, "early", _tiny(shapes_data, steps=steps), PYTHON=str(wrapper),
                     SLOW_BUILD_MARKER=str(marker), SLOW_BUILD_SECONDS="15", PYTHONPATH=str(REPO))
    deadline = time.monotonic() + 120
    while not Path(f"{marker}.0").exists():  # rank 0 has started its model build
        assert time.monotonic() < deadline, f"the model build never started\n{_job(job_id)}\n{_log(tmp_path)}"
        time.sleep(0.2)
    sig = subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], capture_output=True, text=True)
    assert sig.returncode == 0, sig.stderr

    job = _wait_done(job_id, tmp_path)
    log = _log(tmp_path)
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", f"{job}\n{log}"
    assert int(job["Restarts"]) == 1, f"expected exactly one requeue: {job}\n{log}"
    assert "received SIGUSR1: will checkpoint and stop at the next step boundary" in log, log
    assert "stopping before step 1 (stop requested during start-up)" in log, log
    assert "requeueing job" in log and "training finished" in log, log
    assert "Traceback" not in log, log
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{steps:07d}"
    assert _steps(run) == list(range(1, steps + 1))


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


# --------------------------------------------------------------------------- GeCo arrays

_DONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def _submit_geco(tmp_path: Path, stage: str, env: dict[str, str], flags: list[str], args: list[str]) -> str:
    out = subprocess.run(
        ["sbatch", "--parsable", "--nodes=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=00:10:00",
         f"--output={tmp_path}/slurm-%A_%a.out", *flags, str(REPO / "slurm" / f"geco_{stage}.sh"), *args],
        cwd=REPO, env=dict(os.environ, PYTHON=sys.executable, **env), capture_output=True, text=True, timeout=30,
    )
    assert out.returncode == 0, f"sbatch failed: {out.stderr}"
    return out.stdout.strip().split(";")[0]


def _wait_array(job_id: str, tmp_path: Path, timeout: float = 240.0) -> list[tuple[str, str]]:
    """(JobState, ExitCode) of every task of array job ``job_id`` once all have ended."""
    deadline = time.monotonic() + timeout
    tasks: list[tuple[str, str]] = []
    while time.monotonic() < deadline:
        out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=10)
        tasks = []
        for line in out.stdout.splitlines():
            fields = dict(t.partition("=")[::2] for t in line.split() if "=" in t)
            tasks.append((fields.get("JobState", "?"), fields.get("ExitCode", "?")))
        if tasks and all(state in _DONE for state, _ in tasks):
            return tasks
        time.sleep(0.5)
    subprocess.run(["scancel", job_id])
    pytest.fail(f"array job {job_id} did not finish in {timeout:.0f} s: {tasks}\n{_log(tmp_path)}")


@pytest.fixture()
def geco_shards(tmp_path) -> str:
    from tulip_mega.datagen.synthetic import write_shapes_dataset

    info = write_shapes_dataset(str(tmp_path / "in"), num_train=20, num_val=0, samples_per_shard=4, image_size=16)
    return info["train_spec"]  # 5 shards


def test_geco_scripts_split_shards_over_array_tasks_and_srun_tasks(geco_shards, tmp_path):
    """geco_text.sh as a 2-task array x 2 srun tasks (4 workers over 5 shards), then
    geco_image.sh as a 2-task array on its output: every shard written once, equal to one
    local process (text: byte for byte; image: same records, pixels up to thread rounding)."""
    from tulip_mega.datagen.geco.image import DiffusersImageEditor, ImageEditSettings, ImageStage
    from tulip_mega.datagen.geco.rules import RuleTextGenerator
    from tulip_mega.datagen.geco.run import run_geco, run_geco_text
    from tulip_mega.data.shards import expand_shards, iter_samples
    from test_geco_image import FAST, build_tiny_pix2pix, pixels

    names = sorted(os.path.basename(s) for s in expand_shards(geco_shards))
    text_out, image_out = tmp_path / "text", tmp_path / "image"
    job = _submit_geco(tmp_path, "text", {"GECO_IN": geco_shards, "GECO_OUT": str(text_out), "GECO_MODEL": "eda",
                                          "GECO_SEED": "4"},
                       ["--array=0-1", "--ntasks-per-node=2"], ["--no-progress"])
    tasks = _wait_array(job, tmp_path)
    assert tasks == [("COMPLETED", "0:0")] * 2, f"{tasks}\n{_log(tmp_path)}"
    assert sorted(os.listdir(text_out)) == names
    local = tmp_path / "text_local"
    run_geco_text(geco_shards, str(local), RuleTextGenerator(), seed=4, progress=False)
    for name in names:
        assert (text_out / name).read_bytes() == (local / name).read_bytes(), name
    log = _log(tmp_path)
    for worker in range(4):  # every worker of the 4 reported its split
        assert f'"worker": {worker}, "num_workers": 4' in log, log

    pipe = str(tmp_path / "pix2pix")
    build_tiny_pix2pix(pipe)
    job = _submit_geco(tmp_path, "image", {"GECO_IN": str(text_out), "GECO_OUT": str(image_out), "GECO_MODEL": pipe},
                       ["--array=0-1", "--ntasks-per-node=1"], FAST)
    tasks = _wait_array(job, tmp_path)
    assert tasks == [("COMPLETED", "0:0")] * 2, f"{tasks}\n{_log(tmp_path)}"
    assert sorted(os.listdir(image_out)) == names
    settings = ImageEditSettings(steps=2, resolution=64, pos_max_change=1.0, neg_min_change=0.0)
    local = tmp_path / "image_local"
    run_geco(str(text_out), str(local), ImageStage(DiffusersImageEditor(pipe, settings)), progress=False)
    for name in names:
        got, want = list(iter_samples(str(image_out / name))), list(iter_samples(str(local / name)))
        assert [s["__key__"] for s in got] == [s["__key__"] for s in want]
        for g, w in zip(got, want):
            assert g["json"] == w["json"] and g["txt"] == w["txt"]
            for view in ("pos.jpg", "neg.jpg"):
                diff = abs(pixels(g[view]) - pixels(w[view]))  # float rounding, then JPEG's 8x8 blocks
                assert diff.mean() <= 1 / 255 and diff.max() <= 16 / 255, (name, g["__key__"], view)
