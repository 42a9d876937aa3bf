"""`tulip-mega plan` per pipeline stage: FLOPs, memory, the bubble, the split and a suggestion
(tulip_mega/plan_stages.py), and the tulip_6b recipe at 128 and 512 nodes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tulip_mega.config import load_config
from tulip_mega.plan import main, make_plan
from tulip_mega.plan_stages import bubble_fraction, in_flight

REPO = Path(__file__).resolve().parents[2]
DEBUG = ["model.size=debug", "model.vision.image_size=32", "model.vision.patch_size=8",
         "train.global_batch_size=32", "train.micro_batch_size=4"]


def test_bubble_and_in_flight_formulas():
    assert bubble_fraction(4, 12) == pytest.approx(3 / 15)  # 1F1B: (p-1)/(m+p-1)
    assert bubble_fraction(4, 12, 2) == pytest.approx(3 / 27)  # interleaved: (p-1)/(vm+p-1)
    assert bubble_fraction(1, 8) == 0
    assert [in_flight(i, 4, 12) for i in range(4)] == [4, 3, 2, 1]
    assert [in_flight(i, 4, 2) for i in range(4)] == [2, 2, 2, 1]  # fewer micro-batches than stages
    # megatron's interleaved warm-up: 2 (p - i - 1) + (v - 1) p, plus the one in steady state
    assert [in_flight(i, 4, 12, 2) for i in range(4)] == [11, 9, 7, 5]


def test_stages_sum_to_the_model_and_pp1_is_one_stage():
    cfg = load_config(None, DEBUG + ["model.vision.num_layers=3", "parallel.pipeline_parallel=2"])
    plan = make_plan(cfg, nodes=1, gpus_per_node=2)
    pipe = plan.pipeline
    assert [(s.vision_layers, s.text_layers) for s in pipe.stages] == [(1, 1), (2, 1)]
    # The stages' training FLOPs add up to the hardware FLOPs of one pair (no recompute here).
    assert sum(s.flops for s in pipe.stages) == pytest.approx(plan.flops_hardware_per_sample)
    assert pipe.bubble_1f1b == pytest.approx(1 / (8 + 1))  # 8 micro-batches per DP rank
    assert plan.memory_gib == pipe.fullest.memory_gib
    one = make_plan(load_config(None, DEBUG), nodes=1, gpus_per_node=1).pipeline
    assert len(one.stages) == 1 and one.suggestion is None


def test_plan_prints_stages_and_suggests_a_better_split(capsys):
    # Text layers at 64 tokens cost ~4x a vision layer at 16 patches: that makes [[1, 1], [2, 1]]
    # the balanced split (at the recipe's 16 tokens every layer costs the same).
    text64 = "model.text.context_length=64"
    rc = main([str(REPO / "recipes" / "tiny_cpu.yaml"), "--nodes", "1", "--gpus-per-node", "4",
               "model.vision.num_layers=3", "parallel.pipeline_split=[[3,0],[0,2]]", text64])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "parallel.pipeline_split=explicit -> [[3, 0], [0, 2]]" in out
    assert "bubble with" in out and "1F1B" in out and "interleaved" in out
    assert re.search(r"suggestion: parallel.pipeline_split=\[\[1, 1\], \[2, 1\]\]", out), out
    rc = main([str(REPO / "recipes" / "tiny_cpu.yaml"), "--nodes", "1", "--gpus-per-node", "4",
               "model.vision.num_layers=3", text64])
    out = capsys.readouterr().out
    assert rc == 0 and "balanced -> [[1, 1], [2, 1]]" in out and "suggestion" not in out


@pytest.mark.parametrize("nodes,accumulation", [(128, 128), (512, 32)])
def test_6b_recipe_fits_on_h100s(nodes, accumulation, capsys):
    cfg = load_config(REPO / "recipes" / "tulip_6b.yaml", ["precision.fp8=null"])
    plan = make_plan(cfg, nodes=nodes)
    assert (plan.layout.tensor_parallel, plan.layout.pipeline_parallel, plan.layout.data_parallel) == (8, 4, nodes * 8 // 32)
    assert plan.layout.microbatches == accumulation
    assert plan.params_total > 6.5e9
    for stage in plan.pipeline.stages:
        assert stage.memory_gib["total"] * 1024**3 < 80e9, stage
    assert plan.memory_gib["total"] * 1024**3 < 80e9
    assert plan.pipeline.imbalance < 1.01 and plan.pipeline.suggestion is None
    assert main([str(REPO / "recipes" / "tulip_6b.yaml"), "--nodes", str(nodes)]) == 0
    out = capsys.readouterr().out
    assert f"{nodes * 8} GPUs = TP 8 x PP 4 x DP {nodes // 4}" in out
    # Interleaved: 8 chunks in megatron's order; per stage the same layers as the 1F1B split.
    assert plan.pipeline.virtual == 2
    assert "balanced -> [[6, 2], [6, 3], [6, 3], [6, 3], [6, 3], [6, 3], [6, 3], [6, 0]]" in out
    assert [(s.vision_layers, s.text_layers) for s in plan.pipeline.stages] == [(12, 5), (12, 6), (12, 6), (12, 3)]
    assert f"bubble with {accumulation} micro-batches per step: 1F1B" in out
    assert plan.pipeline.bubble == pytest.approx(bubble_fraction(4, accumulation, 2))
    assert f"this recipe (v=2) {plan.pipeline.bubble:.1%}" in out
    assert "warning" not in out
    # The recipe's comment states plan's numbers.
    text = (REPO / "recipes" / "tulip_6b.yaml").read_text()
    assert f"{plan.memory_gib['total']:.2f}" in text
    assert f"{plan.pipeline.bubble:.1%}" in text and f"{plan.pipeline.bubble_1f1b:.1%}" in text


def test_interleaved_plan_sums_chunks_per_stage():
    """Under parallel.virtual_pipeline the split lists PP x v chunks; a stage is the sum of its
    chunks (chunk c of stage i is entry c * PP + i), its in-flight count megatron's interleaved one."""
    cfg = load_config(None, DEBUG + ["model.vision.num_layers=3", "parallel.pipeline_parallel=2",
                                     "parallel.virtual_pipeline=2",
                                     "parallel.pipeline_split=[[1,0],[0,1],[1,1],[1,0]]"])
    plan = make_plan(cfg, nodes=1, gpus_per_node=2)
    pipe = plan.pipeline
    assert [(s.vision_layers, s.text_layers) for s in pipe.stages] == [(2, 1), (1, 1)]
    assert [s.in_flight for s in pipe.stages] == [in_flight(i, 2, 8, 2) for i in range(2)]
    assert pipe.bubble == pytest.approx(bubble_fraction(2, 8, 2))
    assert sum(s.flops for s in pipe.stages) == pytest.approx(plan.flops_hardware_per_sample)
