"""Stop signals that arrive during start-up, and reader workers under stop signals.

- `python -m tulip_mega.train` installs its stop-signal handler before model build: SIGUSR1 /
  SIGTERM during a (slowed) model build is recorded, the run stops at the first step boundary
  with exit 75 and no traceback, and `--resume` then finishes with every step logged once;
  a resumed run signalled during start-up keeps its checkpoint and resumes from it again;
- on 2 ranks, a signal on one rank during model build stops both before step 1 (they agree);
- reader worker processes (and their fork server) ignore SIGUSR1 / SIGTERM / SIGINT: a signal
  sent to the whole process group leaves the parent to decide, the read completes, and the
  workers exit 0 when the pool is closed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tulip_mega.parallel.spawn import run_distributed
from tulip_mega.training.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]
RECIPE = str(REPO / "recipes" / "tiny_cpu.yaml")
SLOW_BUILD = str(REPO / "tests" / "slow_build_python.py")


def _overrides(data: dict, out: Path, *extra: str) -> list[str]:
    """tiny_cpu as one CPU process (TP 1, PP 1), 4 steps of 2 x 8 pairs."""
    return [
        f"data.train_shards={data['train']}", f"data.tokenizer={data['tokenizer']}",
        f"run.output_dir={out}", "run.name=run", "parallel.tensor_parallel=1", "parallel.pipeline_parallel=1",
        "train.global_batch_size=16", "train.micro_batch_size=8", "train.steps=4", "optim.warmup_steps=1",
        "logging.tensorboard=false", "eval.interval=0", "run.log_interval=1", *extra,
    ]


def _env(marker: Path, seconds: float) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), SLOW_BUILD_MARKER=str(marker), SLOW_BUILD_SECONDS=str(seconds),
                OMP_NUM_THREADS="1")


def _train_signalled_in_build(overrides: list[str], marker: Path, signum: int) -> subprocess.CompletedProcess:
    """Run the trainer with a 6 s model build; send `signum` once the build has started."""
    proc = subprocess.Popen([sys.executable, SLOW_BUILD, "-m", "tulip_mega.train", RECIPE, *overrides, "--resume"],
                            cwd=REPO, env=_env(marker, 6), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not Path(f"{marker}.0").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the model build never started"
        time.sleep(0.05)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=180)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _train(overrides: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tulip_mega.train", RECIPE, *overrides, "--resume"], cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_signal_during_model_build_stops_at_first_boundary_and_resume_finishes(shapes_data, tmp_path):
    run = tmp_path / "run"
    # A fresh run: the signal lands in the model build; it stops before step 1 (nothing to save).
    first = _train_signalled_in_build(_overrides(shapes_data, tmp_path), tmp_path / "m1", signal.SIGUSR1)
    assert first.returncode == 75, first.stderr
    assert "received SIGUSR1" in first.stderr and "stopping before step 1" in first.stderr, first.stderr
    assert "Traceback" not in first.stderr
    assert not (run / "checkpoints" / "latest").exists()

    # Steps 1-2 and a checkpoint; then a run to step 4 is told to stop (SIGTERM) while it builds:
    # it stops at step 2 with that checkpoint untouched, and the next run resumes from it.
    done = _train(_overrides(shapes_data, tmp_path, "train.steps=2"))
    assert done.returncode == 0, done.stderr
    second = _train_signalled_in_build(_overrides(shapes_data, tmp_path), tmp_path / "m2", signal.SIGTERM)
    assert second.returncode == 75, second.stderr
    assert "resumed from" in second.stderr and "stopping before step 3" in second.stderr, second.stderr
    assert "Traceback" not in second.stderr
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000002"
    last = _train(_overrides(shapes_data, tmp_path))
    assert last.returncode == 0, last.stderr
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000004"
    assert [m["step"] for m in read_metrics(run / "metrics.jsonl")] == [1, 2, 3, 4]


def build_signalled_worker(overrides: list[str]) -> dict:
    """Rank 1 sends itself SIGUSR1 in the middle of its model build; rank 0 gets no signal."""
    import warnings

    import torch.distributed as dist

    warnings.filterwarnings("ignore")
    import tulip_mega.training.loop as loop
    from tulip_mega.config import load_config
    from tulip_mega.training.signals import PreemptionSignal

    build = loop.build_model_chunks

    def build_with_signal(*args, **kwargs):
        if dist.get_rank() == 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        return build(*args, **kwargs)

    loop.build_model_chunks = build_with_signal
    with PreemptionSignal() as stop_signal:  # as tulip_mega.train.main: before the build
        summary = loop.train(load_config(RECIPE, overrides), stop_signal=stop_signal)
    return {"step": summary["step"], "finished": summary["finished"], "received": stop_signal.received}


@pytest.mark.multiprocess
def test_signal_on_one_rank_during_build_stops_every_rank_before_step_one(shapes_data, tmp_path):
    results = run_distributed(build_signalled_worker, 2, _overrides(shapes_data, tmp_path))
    assert [r["step"] for r in results] == [0, 0]
    assert [r["finished"] for r in results] == [False, False]
    assert [r["received"] for r in results] == [None, signal.SIGUSR1]
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or read_metrics(tmp_path / "run" / "metrics.jsonl") == []


# ---------------------------------------------------------------------------- reader workers

_POOL_SCRIPT = textwrap.dedent("""
    import signal, sys, time
    from tulip_mega.data.dali_pipeline import ViewPlan
    from tulip_mega.data.dp_split import ShardSlice
    from tulip_mega.data.host_prep import HostPrep
    from tulip_mega.data.reader_pool import ReaderPool
    from tulip_mega.data.shards import expand_shards
    from tulip_mega.data.tokenizer import Tokenizer
    from tulip_mega.training.signals import PreemptionSignal

    def main():
        shards = [ShardSlice(s) for s in expand_shards(sys.argv[1])]
        prep = HostPrep(ViewPlan(image_size=32, local_crops=2, local_size=16), Tokenizer(sys.argv[2], 16), 0, 0)
        with PreemptionSignal() as stop:
            pool = ReaderPool(prep, workers=2, chunk_size=16)
            n = sum(1 for _ in pool.read(shards[:1]))
            print("pids", " ".join(str(p.pid) for p in pool._procs), flush=True)
            while stop.received is None:  # the test signals the whole process group now
                time.sleep(0.05)
            n += sum(1 for _ in pool.read(shards[1:3]))  # the workers are still there and read on
            alive = [p.is_alive() for p in pool._procs]
            pool.close()
            print("read", n, "alive", alive, "exit", [p.exitcode for p in pool._procs],
                  "signal", signal.Signals(stop.received).name, flush=True)

    if __name__ == "__main__":
        main()
""")


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM])
def test_reader_workers_ignore_stop_signals_sent_to_the_process_group(shapes_data, tmp_path, signum):
    from tulip_mega.data.shards import expand_shards, iter_samples

    script = tmp_path / "pool.py"
    script.write_text(_POOL_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), shapes_data["train"], shapes_data["tokenizer"]], cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    line = proc.stdout.readline()
    assert line.startswith("pids"), (line, proc.communicate())
    os.killpg(proc.pid, signum)  # every process of the group: parent, fork server, workers
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    want = sum(1 for s in expand_shards(shapes_data["train"])[:3] for _ in iter_samples(s))
    assert f"read {want} alive [True, True] exit [0, 0] signal {signal.Signals(signum).name}" in out, (out, err)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err


_UNCLOSED_SCRIPT = textwrap.dedent("""
    import sys
    from tulip_mega.data.dali_pipeline import ViewPlan
    from tulip_mega.data.dp_split import ShardSlice
    from tulip_mega.data.host_prep import HostPrep
    from tulip_mega.data.reader_pool import ReaderPool
    from tulip_mega.data.shards import expand_shards
    from tulip_mega.data.tokenizer import Tokenizer

    if __name__ == "__main__":
        prep = HostPrep(ViewPlan(image_size=32), Tokenizer(sys.argv[2], 16), 0, 0)
        pool = ReaderPool(prep, workers=2, chunk_size=16, queue_chunks=1)
        it = pool.read([ShardSlice(s) for s in expand_shards(sys.argv[1])])
        next(it)  # the workers are busy, their queues full: the process ends with the pool open
        print("pids", " ".join(str(p.pid) for p in pool._procs), flush=True)
""")


def test_process_exits_promptly_with_a_reader_pool_left_open(shapes_data, tmp_path):
    """Workers ignore SIGTERM, so multiprocessing's exit hook (terminate, then join) would wait
    for them forever; the pool's own exit hook closes them first."""
    script = tmp_path / "unclosed.py"
    script.write_text(_UNCLOSED_SCRIPT)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(script), shapes_data["train"], shapes_data["tokenizer"]], cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("pids"), proc.stderr
    assert time.monotonic() - t0 < 30
    assert "Traceback" not in proc.stderr, proc.stderr
    for pid in map(int, proc.stdout.split()[1:]):  # no worker left behind
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
