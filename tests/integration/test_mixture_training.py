"""Weighted mixtures through the DALI loader (reader worker pools per dataset, DALI-side skips)
and through the trainer: kill -9 mid-run and resume reproduce the uninterrupted run's losses,
and the per-dataset sample counts follow the weights. Stream-level tests: tests/unit/test_mixture.py.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tulip_mega.data.dali_loader import DaliLoader
from tulip_mega.data.dali_pipeline import ViewPlan
from tulip_mega.data.mixture import MixturePart
from tulip_mega.data.shards import ShardWriter, expand_shards, iter_samples
from tulip_mega.data.tokenizer import Tokenizer
from tulip_mega.training.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]
RECIPE = str(REPO / "recipes" / "tiny_cpu.yaml")
PLAN = ViewPlan(image_size=32, crops=1, local_crops=1, local_size=16, eda=True)


def _same(xs, ys) -> None:
    assert len(xs) == len(ys)
    for a, b in zip(xs, ys):
        assert a.keys == b.keys
        for name, t in a.tensor_fields().items():
            assert (t == getattr(b, name)).all(), name


def _bad_curated(shapes_data, tmp_path) -> tuple[str, set[str]]:
    """One 48-sample shard: a truncated JPEG (DALI rejects it after the host checks passed) and garbage."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
    jpg = buf.getvalue()
    src = list(itertools.islice(iter_samples(expand_shards(shapes_data["train"])[7]), 48))
    bad = {src[4]["__key__"], src[30]["__key__"]}
    with ShardWriter(str(tmp_path / "cur-%02d.tar"), 100) as w:
        for i, s in enumerate(src):
            s = {k: v for k, v in s.items() if k != "__shard__"}
            if i == 4:
                s["jpg"] = jpg[: len(jpg) // 2]
            if i == 30:
                s["jpg"] = b"garbage" * 20
            w.write(s)
    return w.shards[0], bad


def test_dali_mixture_resumes_exactly_with_any_worker_count_and_counts_per_dataset(shapes_data, tmp_path) -> None:
    tok = Tokenizer(shapes_data["tokenizer"], 24)
    web = expand_shards(shapes_data["train"])[:2]
    cur, bad = _bad_curated(shapes_data, tmp_path)
    parts = [MixturePart("web", web, 2.0), MixturePart("curated", [cur], 1.0)]

    def make(workers: int) -> DaliLoader:
        return DaliLoader(parts, 16, PLAN, tok, dp_rank=1, dp_size=2, seed=7, shuffle_buffer=32, gpu=False,
                          reader_workers=workers, chunk_size=16, read_chunk_size=16)

    ref_loader = make(0)
    ref = list(itertools.islice(ref_loader, 8))  # 128 samples: the curated half-set (24) cycles ~2 times
    stats = ref_loader.stats()
    keys = [k for b in ref for k in b.keys]
    cur_keys = {s["__key__"] for s in iter_samples(cur)}
    assert not bad & set(keys)
    assert stats["samples"] == 128 == stats["samples/web"] + stats["samples/curated"]
    assert stats["samples/curated"] == sum(k in cur_keys for k in keys)
    assert stats["skipped"] == stats["skipped/curated"] >= 1 and stats["skipped/web"] == 0
    # Per-dataset reader pools: the same batches, bit for bit, as in the loader thread.
    _same(ref, list(itertools.islice(make(2), 8)))
    # A state saved under 2 workers resumes under 0 with the uninterrupted run's batches and counters.
    first = make(2)
    it = iter(first)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))
    it.close()
    resumed = make(0)
    resumed.load_state_dict(state)
    _same(ref[3:], list(itertools.islice(resumed, 5)))
    assert {k: v for k, v in resumed.stats().items() if k != "pipeline_rebuilds"} == \
        {k: v for k, v in stats.items() if k != "pipeline_rebuilds"}


# --------------------------------------------------------------------------- the trainer, kill -9

_SCRIPT = """
import sys, warnings
sys.path[:0] = [{tests!r}]
from tulip_mega.parallel.spawn import run_distributed

def worker(overrides):
    warnings.filterwarnings("ignore")
    from tulip_mega.config import load_config
    from tulip_mega.training.loop import train
    return train(load_config({recipe!r}, overrides))

if __name__ == "__main__":
    run_distributed(worker, 2, {overrides!r})
"""


def _overrides(shapes_data, out: Path, name: str, *extra: str) -> list[str]:
    shards = expand_shards(shapes_data["train"])
    web, curated = ",".join(shards[:6]), ",".join(shards[6:])
    return [
        f"data.mixture=[{{shards: '{web}', weight: 3, name: web}}, {{shards: '{curated}', weight: 1, name: curated}}]",
        f"data.tokenizer={shapes_data['tokenizer']}", f"run.output_dir={out}", f"run.name={name}",
        "parallel.tensor_parallel=1", "parallel.pipeline_parallel=1", "train.global_batch_size=32",
        "train.micro_batch_size=8", "train.steps=8", "optim.warmup_steps=2", "logging.tensorboard=false",
        "eval.interval=0", "run.log_interval=1", "checkpoint.interval=1", "data.reader_workers=1", *extra,
    ]


def _run(tmp_path: Path, overrides: list[str], kill_at_step: int = 0, metrics: Path | None = None) -> None:
    script = tmp_path / f"run_{len(list(tmp_path.glob('run_*.py')))}.py"
    script.write_text(_SCRIPT.format(tests=str(REPO / "tests"), recipe=RECIPE, overrides=overrides))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script)], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if not kill_at_step:
        _, err = proc.communicate(timeout=400)
        assert proc.returncode == 0, err[-3000:]
        return
    deadline = time.monotonic() + 300
    try:
        while not (metrics is not None and metrics.exists() and any(json.loads(line)["step"] >= kill_at_step
                                            for line in metrics.read_text().splitlines() if line.strip())):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the run never reached the step to be killed at"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, 9)  # SIGKILL: the launcher, both ranks, their reader workers
        proc.wait()


@pytest.mark.multiprocess
@pytest.mark.slow
def test_kill_9_and_resume_reproduce_the_uninterrupted_mixture_run(shapes_data, tmp_path) -> None:
    _run(tmp_path, _overrides(shapes_data, tmp_path, "full"))
    full = read_metrics(tmp_path / "full" / "metrics.jsonl")
    assert [m["step"] for m in full] == list(range(1, 9))
    last = full[-1]
    drawn = {name: last[f"data/samples/{name}"] for name in ("web", "curated")}
    assert sum(drawn.values()) == last["data/samples"] == 8 * 32
    n = last["data/samples"]  # 256 draws: the web share is 3/4 within 4 standard deviations
    assert abs(drawn["web"] / n - 0.75) < 4 * math.sqrt(0.75 * 0.25 / n), drawn

    _run(tmp_path, _overrides(shapes_data, tmp_path, "cut"), kill_at_step=5,
         metrics=tmp_path / "cut" / "metrics.jsonl")
    latest = (tmp_path / "cut" / "checkpoints" / "latest").read_text().strip()
    start = int(latest.split("_")[1])
    assert 4 <= start < 8, latest
    _run(tmp_path, _overrides(shapes_data, tmp_path, "cut", "checkpoint.resume=true"))
    resumed = [m for m in read_metrics(tmp_path / "cut" / "metrics.jsonl") if m["step"] > start]
    assert [m["step"] for m in resumed] == list(range(start + 1, 9))
    for a, b in zip(resumed, full[start:]):
        for key in ("loss", "grad_norm", "lr", "data/samples", "data/samples/web", "data/samples/curated"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), (a["step"], key)
