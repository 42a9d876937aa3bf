"""What the EMA teacher of the self-distillation terms costs: FLOPs (forward only), its float32
weights per stage in `plan`, and the plan's teacher line.

The FLOPs are checked against a hand count written out here, independently of
tulip_mega.flops; the teacher's parameter count against the built model.
"""

from __future__ import annotations

import pytest

from harness import make_cfg
from tulip_mega.config.streams import input_streams
from tulip_mega.flops import count_flops, model_flops_between
from tulip_mega.launch import resolve_layout
from tulip_mega.plan import format_plan, make_plan

DISTILL = ["loss.weights.self_distill=1", "loss.weights.masked_prediction=0.25", "data.views.global_crops=2",
           "data.views.local_crops=2", "data.views.local_size=16", "loss.distill.prototypes=64",
           "loss.distill.head_hidden=32", "loss.distill.head_bottleneck=16"]


def _layer(s: int, h: int, f: int) -> int:
    """One transformer layer, every matmul: Q, K, V, scores, AV, out proj, fc1, fc2."""
    return 3 * 2 * s * h * h + 2 * s * s * h + 2 * s * s * h + 2 * s * h * h + 2 * 2 * s * h * f


def _map_head(s: int, h: int, f: int) -> int:
    """Probe query, K/V over s tokens, scores and AV of one query, out proj, MLP on one token."""
    return 2 * h * h + 2 * 2 * s * h * h + 2 * s * h + 2 * s * h + 2 * h * h + 2 * 2 * h * f


def _head(e: int, hidden: int, bottleneck: int, k: int) -> int:
    """DINO head on one row: Linear(e, H), Linear(H, H), Linear(H, B), prototypes Linear(B, K)."""
    return 2 * e * hidden + 2 * hidden * hidden + 2 * hidden * bottleneck + 2 * bottleneck * k


def test_teacher_flops_match_a_hand_count_and_count_once_in_training():
    cfg = make_cfg(DISTILL)
    v = cfg.model.vision
    h, f, layers, p = v.hidden_size, v.ffn_hidden_size, v.num_layers, v.patch_size
    patches = (v.image_size // p) ** 2  # 16: the teacher's one full-resolution view
    masked = int(patches * 0.5)
    head = _head(h, 32, 16, 64)
    tower = layers * _layer(patches, h, f) + 2 * patches * 3 * p * p * h + _map_head(patches, h, f)
    teacher_hand = tower + head + masked * head  # + its distill head + its patch head on the masked patches

    count = count_flops(cfg, input_streams(cfg))
    assert count.teacher == teacher_hand
    assert count.parts["distill_head"] == 2 * head  # one per local crop
    assert count.parts["patch_head"] == masked * head
    assert count.training == 3 * (count.forward - count.teacher) + count.teacher
    # selective recompute re-runs the student's attention scores only
    assert count.attention == count.parts["vision_layers_attention"] + count.parts["text_layers_attention"]

    # The masked view is student tower work without a MAP head: the same layers and patch
    # embedding as the global view, and the MAP head only on the global and local views.
    off_cfg = make_cfg(DISTILL[2:])  # both terms off (and so no local crops: image_image is off)
    off = count_flops(off_cfg, input_streams(off_cfg))
    local = (16 // p) ** 2
    assert count.parts["vision_map_head"] == _map_head(patches, h, f) + 2 * _map_head(local, h, f)

    def matmul(s: int) -> int:
        return layers * (_layer(s, h, f) - 4 * s * s * h)

    # the masked view (one, full resolution) and the two local crops of self_distill
    assert count.parts["vision_layers_matmul"] - off.parts["vision_layers_matmul"] == matmul(patches) + 2 * matmul(local)

    # Switched off, nothing carries a teacher or distillation key and the other keys are
    # those of a recipe that never had the terms.
    base = make_cfg(["data.views.global_crops=2", "data.views.local_crops=2", "data.views.local_size=16"])
    assert count_flops(base, input_streams(base)).parts == off.parts
    assert not [k for k in off.parts if k.startswith("teacher_") or k in ("distill_head", "patch_head")]
    assert off.training == 3 * off.forward


def test_mfu_flops_follow_the_streams_of_each_step():
    cfg = make_cfg(DISTILL)
    layout = resolve_layout(cfg, 1)
    start = layout.distill_start
    assert start == 3  # train.steps 4 x start_fraction 0.8
    before = count_flops(cfg, layout.streams_at(0), layout.contrastive_batch).training
    after = count_flops(cfg, layout.streams, layout.contrastive_batch).training
    assert before < after
    assert model_flops_between(cfg, layout, 0, start) == before
    assert model_flops_between(cfg, layout, start, start + 1) == after
    assert model_flops_between(cfg, layout, 1, start + 1) == pytest.approx((2 * before + after) / 3)


def _teacher_params_worker(overrides: list[str]) -> int:
    """Parameters of the built model (one process, one stage) whose names start with teacher_."""
    from harness import build_train_step

    _, model, *_ = build_train_step(overrides)
    total = 0
    for chunk in model:
        for name, param in chunk.named_parameters():
            if name.split("module.")[-1].startswith("teacher_"):
                total += param.numel()
    return total


@pytest.mark.multiprocess
def test_plan_teacher_params_match_the_built_model():
    from tulip_mega.parallel.spawn import run_distributed

    cfg = make_cfg(DISTILL)
    plan = make_plan(cfg, nodes=1, gpus_per_node=1)
    (stage,) = plan.pipeline.stages
    built = run_distributed(_teacher_params_worker, 1, DISTILL, timeout=300)[0]
    assert built > 0
    assert stage.teacher_params == built
    assert stage.memory_gib["teacher"] == pytest.approx(built * 4 / 1024**3)
    # no gradient or optimizer bytes for it: the other kinds are the student's
    assert stage.memory_gib["total"] == pytest.approx(sum(x for k, x in stage.memory_gib.items() if k != "total"))


def test_plan_prints_the_teacher_line_only_with_the_teacher():
    cfg = make_cfg(DISTILL)
    plan = make_plan(cfg, nodes=1, gpus_per_node=1)
    text = format_plan(cfg, plan)
    assert "EMA teacher (self_distill, masked_prediction) from step 3 of 4:" in text
    assert "forward-only" in text and "GiB of float32 weights on the fullest stage" in text
    assert f"{plan.flops_model_before_teacher / 1e9:.2f} GFLOP before step 3" in text
    assert plan.flops_model_per_sample == count_flops(cfg, input_streams(cfg)).training
    base = make_cfg([])
    plain = format_plan(base, make_plan(base, nodes=1, gpus_per_node=1))
    assert "EMA teacher" not in plain and "teacher" not in make_plan(base, 1, 1).memory_gib
