"""SigLIP 2's EMA-teacher terms (self_distill, masked_prediction) inside the real training step.

- the terms equal an independent plain-PyTorch reference written here from the papers'
  definitions (DINO's centred, sharpened cross-entropy; SILC's local crops against the
  teacher's global crop; TIPS's masked patches against the teacher's unmasked patches), at the
  step where the teacher starts as a copy of the student;
- TP=2 x PP=2 and DP=2 equal the single-process run step by step (losses, gradients), and the
  EMA teacher's weights are the same after several steps on every layout;
- before `loss.distill.start_fraction` the teacher's views cost nothing and its terms are off;
- resume: a run restarted from a checkpoint taken while the teacher runs reproduces the
  uninterrupted run (losses, teacher weights and centres, the LocCa decoder, student weights,
  optimizer), and the exports leave the teacher, heads and decoder out, saying so.
"""

from __future__ import annotations

import functools

import pytest
import torch

from harness import (assemble, assert_same_training, build_train_step, global_batches, make_cfg, rank_microbatches,
                     step_worker)
from tulip_mega.parallel.spawn import run_distributed

# 4 steps; the teacher starts before step 3 (start_fraction 0.5); tiny heads (K = 64).
DISTILL = [
    "train.global_batch_size=16", "train.micro_batch_size=4", "train.steps=4", "optim.lr=3e-3",
    "loss.weights.self_distill=1", "loss.weights.masked_prediction=0.25",
    "data.views.global_crops=2", "data.views.local_crops=2", "data.views.local_size=16",
    "loss.distill.start_fraction=0.5", "loss.distill.prototypes=64", "loss.distill.head_hidden=32",
    "loss.distill.head_bottleneck=16", "loss.distill.teacher_momentum=0.9",
]
TERMS = ("loss/image_text", "loss/self_distill", "loss/masked_prediction")


def _reference_ce(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, ts: float, tt: float) -> torch.Tensor:
    """DINO's loss written out: for each student row r and its teacher row,
    -sum_k p_t[k] * log p_s[k], p_t = exp((t - c)/tt) / sum exp(...), p_s = exp(s/ts) / sum exp(...)."""
    t = (teacher.double() - center.double()) / tt
    p_t = torch.exp(t - t.max(-1, keepdim=True).values)
    p_t = p_t / p_t.sum(-1, keepdim=True)
    s = student.double() / ts
    log_p_s = s - s.max(-1, keepdim=True).values
    log_p_s = log_p_s - torch.log(torch.exp(log_p_s).sum(-1, keepdim=True))
    return -(p_t * log_p_s).sum(-1).mean()


def _encode(model, images: torch.Tensor, mask=None) -> torch.Tensor:
    """The student tower (one process, PP=1): patch embedding (optionally masked) -> layers."""
    x = model.vision_embed(images, mask=mask)
    return model.vision_block(x, attention_mask=None)  # [s, b, h], final-normed


def reference_worker(overrides: list[str]) -> dict:
    """Train up to the teacher's start, then compute both terms of the next step by hand from
    the model's modules (the teacher is a copy of the student at that step; centres are 0)."""
    import warnings

    warnings.filterwarnings("ignore")
    from tulip_mega.losses.reconstruction import mae_mask
    from tulip_mega.training.step import MASKED_PREDICTION_SALT

    cfg, model, optimizer, scheduler, step = build_train_step(overrides)
    start = step.layout.distill_start
    batches = global_batches(cfg, start + 1)
    it = rank_microbatches(cfg, batches, 0, 1)
    for _ in range(start):
        metrics = step(it)
        assert "loss/self_distill" not in metrics  # off before the start
    m = step.modules[0]
    d, s = cfg.loss.distill, step.layout.streams
    batch = batches[start]
    crop, locals_ = batch.crops[:, 0], batch.local_crops
    with torch.no_grad():
        teacher_tokens = _encode(m, crop)  # the student's weights ARE the teacher's at the start
        teacher_pooled = m.vision_head(teacher_tokens.transpose(0, 1))
        t_global = m.distill_head(teacher_pooled)  # [B, K]
        s_local = torch.stack([m.distill_head(m.vision_head(_encode(m, locals_[:, j]).transpose(0, 1)))
                               for j in range(s.local_crops)])  # [n_local, B, K]
        masked = mae_mask(batch.keys, start, cfg.run.seed, s.patches, s.patches - s.masked_patches,
                          salt=MASKED_PREDICTION_SALT)[1]  # [B, m]
        student_tokens = _encode(m, crop, mask=(masked, m.distill_mask_token))
        rows = masked.t()  # [m, B]
        pick = lambda tokens: tokens[rows, torch.arange(rows.shape[1])]  # noqa: E731  [m, B, h]
        s_patch, t_patch = m.patch_head(pick(student_tokens)), m.patch_head(pick(teacher_tokens))
    zero = torch.zeros(d.prototypes)
    temps = (d.student_temperature, d.teacher_temperature)
    reference = {
        "loss/self_distill": _reference_ce(s_local, t_global, zero, *temps).item(),
        "loss/masked_prediction": _reference_ce(s_patch, t_patch, zero, *temps).item(),
    }
    metrics = step(it)
    return {"reference": reference, "metrics": metrics,
            "teacher_moved": not all(torch.equal(t, st) for _, t, st in m.teacher.pairs())}


@pytest.mark.multiprocess
def test_terms_equal_an_independent_reference_at_the_teachers_start():
    out = run_distributed(reference_worker, 1, DISTILL)[0]
    for key, value in out["reference"].items():
        assert out["metrics"][key] == pytest.approx(value, rel=1e-5), key
    # After the start step's update the teacher is no longer the student (it moved by 1 - 0.9).
    assert out["teacher_moved"]
    assert out["metrics"]["chance/self_distill"] == pytest.approx(float(torch.log(torch.tensor(64.0))), rel=1e-6)


@functools.lru_cache(maxsize=None)
def _single_process_training(model: tuple[str, ...]) -> list[dict]:
    """The reference run of the layout tests (4 optimizer steps, one process), once per model shape."""
    return run_distributed(step_worker, 1, DISTILL + list(model), 4, True)


def _teacher(entries: list[list[tuple]]) -> dict[str, torch.Tensor]:
    full = assemble(entries)
    return {k: v for k, v in full.items() if k.startswith("teacher_")}


@pytest.mark.multiprocess
@pytest.mark.parametrize("world,layout", [
    (4, ["parallel.tensor_parallel=2", "parallel.pipeline_parallel=2"]),
    (2, []),  # DP=2: the centres and the contrastive terms see the whole global batch
    (2, ["parallel.pipeline_parallel=2", "parallel.virtual_pipeline=2",  # one layer of each tower per chunk
         "model.vision.num_layers=4", "model.text.num_layers=4"]),
])
def test_layouts_train_the_same_student_and_teacher(world, layout):
    """TP2 x PP2, DP2 and interleaved virtual stages against one process. 4 optimizer steps (2 with the teacher). Float32 reduction-order differences grow through
    Adam (measured under TP2 x PP2: losses within 1.2e-5 relative, weights within 1.3e-4, the
    teacher's within 4.3e-5); the per-step gradients are compared tightly below."""
    model = [o for o in layout if o.startswith("model.")]
    ref = _single_process_training(tuple(model))
    out = run_distributed(step_worker, world, DISTILL + layout, 4, True)
    for key in TERMS:
        assert out[0]["metrics"][key] == pytest.approx(ref[0]["metrics"][key], rel=1e-4), key
    teacher = _teacher([r["entries"] for r in ref])
    assert any("teacher_vision_block" in k for k in teacher) and any("teacher_patch_head" in k for k in teacher)
    initial = _teacher([r["initial"] for r in ref])
    assert all(not torch.equal(teacher[k], initial[k]) for k in teacher), "the teacher did not move"
    assert_same_training(out, ref, loss_rtol=1e-4, weight_atol=4e-4)
    moved = _teacher([r["entries"] for r in out])
    for k in teacher:
        torch.testing.assert_close(moved[k], teacher[k], rtol=0, atol=1e-4, msg=k)


@pytest.mark.multiprocess
def test_layout_gradients_match_at_a_teacher_step():
    """The last step's gradients (the teacher runs) under TP2 x PP2 equal the single process's."""
    from harness import assert_same_step

    ref = run_distributed(step_worker, 1, DISTILL, 3)
    out = run_distributed(step_worker, 4, DISTILL + ["parallel.tensor_parallel=2", "parallel.pipeline_parallel=2"], 3)
    grads = assert_same_step(out, ref, loss_rtol=1e-5, grad_rtol=1e-4)
    assert any(k.startswith("distill_head") and v.abs().max() > 0 for k, v in grads.items())
    assert any(k.startswith("distill_mask_token") and v.abs().max() > 0 for k, v in grads.items())
    assert not any(k.startswith("teacher_") for k in grads), "the teacher must not be trained"


def test_teacher_views_are_off_before_the_start():
    from tulip_mega.launch import resolve_layout

    cfg = make_cfg(DISTILL)
    layout = resolve_layout(cfg, 1)
    assert layout.distill_start == 2
    early, late = layout.streams_at(1), layout.streams_at(2)
    assert [v.name for v in early.vision] == ["global"]  # local crops serve only self_distill here
    assert [v.name for v in late.vision] == ["global", "local", "teacher", "masked"]
    assert late.masked_patches == 8 and late.loader_crops == 1 and late.extra_global_crops == 0


# --- resume ---------------------------------------------------------------------------------
from test_train import _model_tensors, train_worker  # noqa: E402  (the trainer's own workers)


def _resume_overrides(data: dict, run_dir, name: str, *extra: str) -> list[str]:
    return [
        f"data.train_shards={data['train']}", f"data.tokenizer={data['tokenizer']}",
        f"run.output_dir={run_dir}", f"run.name={name}", "train.steps=12", "optim.warmup_steps=2",
        "logging.tensorboard=false", "eval.interval=0", "data.loader=dali",
        "train.global_batch_size=32", "train.micro_batch_size=8",
        "loss.weights.self_distill=1", "loss.weights.masked_prediction=0.25",
        "data.views.global_crops=2", "data.views.local_crops=2", "data.views.local_size=16",
        "loss.distill.start_fraction=0.25", "loss.distill.prototypes=64", "loss.distill.head_hidden=32",
        "loss.distill.head_bottleneck=16",
        # SigLIP 2's third term in the same run: the LocCa decoder (captioning only: shapes have no regions)
        "loss.weights.locca=1", "loss.locca.box_bins=32", "model.locca_decoder.num_layers=1", *extra,
    ]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_resume_with_the_teacher_in_the_checkpoint_is_exact(shapes_data, tmp_path):
    pytest.importorskip("nvidia.dali")
    from tulip_mega.training.metrics import read_metrics

    full = run_distributed(train_worker, 4, _resume_overrides(shapes_data, tmp_path, "full", "checkpoint.interval=6"))
    metrics = read_metrics(tmp_path / "full" / "metrics.jsonl")
    assert "loss/self_distill" not in metrics[2] and "loss/self_distill" in metrics[3]  # starts at step 4
    step6 = tmp_path / "full" / "checkpoints" / "step_0000006"
    resumed = run_distributed(train_worker, 4, _resume_overrides(shapes_data, tmp_path, "resumed",
                                                                 f"checkpoint.load={step6}"))
    again = read_metrics(tmp_path / "resumed" / "metrics.jsonl")
    assert [m["step"] for m in again] == list(range(7, 13))
    for a, b in zip(again, metrics[6:]):
        for key in ("loss", *TERMS, "loss/locca", "grad_norm", "teacher_momentum"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)
    w_full, w_resumed = _model_tensors(full[0]["checkpoint"]), _model_tensors(resumed[0]["checkpoint"])
    assert set(w_full) == set(w_resumed)
    assert any("teacher_vision_block" in k for k in w_full) and any(k.endswith("distill_center") for k in w_full)
    assert any(k.startswith("locca_decoder.") for k in w_full)
    for k in w_full:
        torch.testing.assert_close(w_resumed[k], w_full[k], rtol=1e-5, atol=1e-6, msg=k)

    # The export keeps the towers only, and says what it left out.
    from tulip_mega.convert.hf import export_hf
    from tulip_mega.convert.openclip import export_open_clip

    for export, name in ((export_hf, "hf"), (export_open_clip, "open_clip")):
        lines: list[str] = []
        export(full[0]["checkpoint"], tmp_path / name, tokenizer=shapes_data["tokenizer"], log=lines.append)
        left = [line for line in lines if line.startswith("left out")]
        assert left and all(m in left[0] for m in ("EMA teacher", "distill_head", "patch_head", "locca_decoder")), lines


@pytest.mark.multiprocess
def test_steps_before_the_start_are_plain_siglip_steps():
    """Before the teacher starts the step is SigLIP's: same loss and same gradients (bitwise) as the
    recipe without the EMA-teacher terms; the idle heads and mask token get exactly zero."""
    plain = [o for o in DISTILL if not o.startswith(("loss.weights.self_distill", "loss.weights.masked_pred"))]
    ref = run_distributed(step_worker, 1, plain, 1)
    out = run_distributed(step_worker, 1, DISTILL, 1)
    assert out[0]["losses"] == ref[0]["losses"]
    assert set(out[0]["metrics"]) == set(ref[0]["metrics"])
    R, G = assemble([r["entries"] for r in ref]), assemble([r["entries"] for r in out])
    for k in R:
        assert torch.equal(G[k], R[k]), k
    idle = set(G) - set(R)
    assert idle and all(k.startswith(("distill_head", "patch_head", "distill_mask_token")) for k in idle), idle
    assert all(G[k].abs().max() == 0 for k in idle)
