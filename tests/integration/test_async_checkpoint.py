"""checkpoint.async_save: the background write gives the synchronous checkpoint, training goes
on meanwhile, and publishing (`latest`) happens only after the write, so a SIGKILL during an
async save leaves the previous checkpoint loadable and the resume exact."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from harness import (KILL_SCRIPT, build_train_step, global_batches, load_tensors_worker, rank_microbatches,
                     run_script_and_kill_at_marker, train_and_save_worker)
from tulip_mega.parallel.spawn import run_distributed

pytestmark = pytest.mark.multiprocess

REPO = Path(__file__).resolve().parents[2]
LAYOUT = ["parallel.pipeline_parallel=2", "train.global_batch_size=16", "train.micro_batch_size=8"]
SHAPE = {"test": 1}


def _iterator(cfg, steps: int):
    from megatron.core import parallel_state

    return rank_microbatches(cfg, global_batches(cfg, steps), parallel_state.get_data_parallel_rank(),
                             parallel_state.get_data_parallel_world_size())


def sync_vs_async_worker(root: str) -> dict:
    """One step; save synchronously and asynchronously; train one more step while the async
    write may still run; publish. Both checkpoints must hold the state after step 1."""
    import warnings

    warnings.filterwarnings("ignore")
    from tulip_mega.training.async_checkpoint import CheckpointWriter

    cfg, model, opt, sched, step = build_train_step(LAYOUT)
    it = _iterator(cfg, 3)
    step(it)
    CheckpointWriter(False).save(Path(root) / "sync", 1, model, opt, sched, None, SHAPE, 2)
    writer = CheckpointWriter(True)
    path = writer.save(Path(root) / "async", 1, model, opt, sched, None, SHAPE, 2)
    unpublished = not (Path(root) / "async" / "latest").exists()
    step(it)  # training continues (and changes every weight) before the save is published
    report = writer.close()
    return {"path": str(path), "unpublished_at_first": unpublished, "report": report}


def test_async_checkpoint_equals_sync_one(tmp_path):
    out = run_distributed(sync_vs_async_worker, 2, str(tmp_path))
    assert all(r["unpublished_at_first"] for r in out), "latest was written before the async write finished"
    assert (tmp_path / "async" / "latest").read_text().strip() == "step_0000001"
    assert not list((tmp_path / "async").glob("*.partial"))
    report = out[0]["report"]
    assert report["checkpoint/save_s"] > 0 and 0 <= report["checkpoint/wait_s"] <= report["checkpoint/save_s"] + 1
    sync = run_distributed(load_tensors_worker, 1, str(tmp_path / "sync" / "step_0000001"))[0]
    asyn = run_distributed(load_tensors_worker, 1, str(tmp_path / "async" / "step_0000001"))[0]
    assert set(sync) == set(asyn) and any("exp_avg" in k for k in sync)
    for k in sync:
        assert torch.equal(sync[k], asyn[k]), k


# --- SIGKILL during an async save --------------------------------------------------------------
def test_sigkill_during_async_save_keeps_previous_latest_and_resume_is_exact(tmp_path):
    root, marker = tmp_path / "ckpt", tmp_path / "killed_at"
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT.format(tests=str(REPO / "tests"), overrides=LAYOUT, root=str(root), steps=3,
                                         marker=str(marker)))
    run_script_and_kill_at_marker(script, marker)
    # Step 3's save was started but never published; step 2's is the newest complete one.
    assert (root / "latest").read_text().strip() == "step_0000002"
    assert not (root / "step_0000003").exists()

    reference = run_distributed(train_and_save_worker, 2, LAYOUT, str(tmp_path / "ref"), 3, "", "")
    resumed = run_distributed(train_and_save_worker, 2, LAYOUT, str(root), 3, "", str(root / "step_0000002"))
    assert resumed[0]["losses"] == [pytest.approx(reference[0]["losses"][2], rel=1e-6)]
    ref = run_distributed(load_tensors_worker, 1, str(tmp_path / "ref" / "step_0000003"))[0]
    got = run_distributed(load_tensors_worker, 1, str(root / "step_0000003"))[0]
    assert set(ref) == set(got)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-6, atol=1e-7, msg=k)


# --- the training loop -------------------------------------------------------------------------
@pytest.mark.slow
def test_training_loop_with_async_save_matches_sync_saves(shapes_data, tmp_path):
    """The trainer with checkpoint.async_save=true: every interval's checkpoint is published, the
    run's losses and final checkpoint equal those of synchronous saving, and the save timings
    reach the metrics."""
    from test_train import _overrides, train_worker
    from tulip_mega.training.metrics import read_metrics

    common = ("parallel.tensor_parallel=1", "train.steps=6", "optim.warmup_steps=2", "checkpoint.interval=2",
              "checkpoint.keep_last=5", "run.log_interval=1")
    runs = {}
    for mode in ("sync", "async"):
        out = run_distributed(train_worker, 2, _overrides(shapes_data, tmp_path, mode, *common,
                                                          f"checkpoint.async_save={mode == 'async'}"))
        assert out[0]["finished"]
        ckpts = tmp_path / mode / "checkpoints"
        assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_0000002", "step_0000004", "step_0000006"]
        assert (ckpts / "latest").read_text().strip() == "step_0000006"
        runs[mode] = (read_metrics(tmp_path / mode / "metrics.jsonl"), out[0]["checkpoint"])
    (sync_metrics, sync_ckpt), (async_metrics, async_ckpt) = runs["sync"], runs["async"]
    assert [m["loss"] for m in async_metrics] == [m["loss"] for m in sync_metrics]
    assert any("checkpoint/save_s" in m and "checkpoint/wait_s" in m for m in async_metrics)
    a = run_distributed(load_tensors_worker, 1, async_ckpt)[0]
    b = run_distributed(load_tensors_worker, 1, sync_ckpt)[0]
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
