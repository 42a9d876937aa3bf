"""kill -9 while the EMA teacher runs, then resume: the run killed during step 4's (unpublished)
save resumes from step 3, where the teacher has run for a step, and reproduces the uninterrupted
run's step 4 and every tensor of its checkpoint: student, optimizer, the teacher's float32 weights
and both centres, and the LocCa decoder (TP=2 on 2 ranks, sequence parallel off)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from harness import KILL_SCRIPT, load_tensors_worker, run_script_and_kill_at_marker, train_and_save_worker
from tulip_mega.parallel.spawn import run_distributed

pytestmark = pytest.mark.multiprocess

REPO = Path(__file__).resolve().parents[2]
# 4 steps; the teacher starts after 2 (start_fraction 0.5); TP=2 across the 2 ranks.
RUN = ["parallel.tensor_parallel=2", "train.global_batch_size=16", "train.micro_batch_size=8", "train.steps=4",
       "loss.weights.self_distill=1", "loss.weights.masked_prediction=0.25", "data.views.global_crops=2",
       "data.views.local_crops=2", "data.views.local_size=16", "loss.distill.start_fraction=0.5",
       "loss.distill.prototypes=64", "loss.distill.head_hidden=32", "loss.distill.head_bottleneck=16",
       "loss.weights.locca=1", "loss.locca.box_bins=32", "model.locca_decoder.num_layers=1"]


@pytest.mark.slow
def test_sigkill_while_the_teacher_runs_resumes_exactly(tmp_path):
    root, marker = tmp_path / "ckpt", tmp_path / "killed_at"
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT.format(tests=str(REPO / "tests"), overrides=RUN, root=str(root), steps=4,
                                         marker=str(marker)))
    run_script_and_kill_at_marker(script, marker)
    assert (root / "latest").read_text().strip() == "step_0000003"  # step 4's save never published

    reference = run_distributed(train_and_save_worker, 2, RUN, str(tmp_path / "ref"), 4, "", "")
    resumed = run_distributed(train_and_save_worker, 2, RUN, str(root), 4, "", str(root / "step_0000003"))
    ref_step, got_step = reference[0]["metrics"][3], resumed[0]["metrics"][0]
    for key in ("loss", "loss/self_distill", "loss/masked_prediction", "loss/locca", "teacher_momentum"):
        assert got_step[key] == pytest.approx(ref_step[key], rel=1e-6), key
    ref = run_distributed(load_tensors_worker, 1, str(tmp_path / "ref" / "step_0000004"))[0]
    got = run_distributed(load_tensors_worker, 1, str(root / "step_0000004"))[0]
    assert set(ref) == set(got)
    assert any(k.startswith("teacher_vision_block") for k in ref) and "distill_center" in ref, sorted(ref)[:8]
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-6, atol=1e-7, msg=k)
