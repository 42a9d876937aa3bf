"""parallel.pipeline_split: uneven per-stage layer counts of both towers (balanced by FLOPs,
even, or explicit) give the loss and every gradient of the unpipelined run.

Unit tests (no processes) check the split arithmetic, megatron's layout and the config
errors; multi-process tests run one training step at PP=2 on a vision 3 + text 2 layer model
(PP=2 does not divide the vision tower) and compare it with PP=1, like tests/integration/test_parallel.py;
sequence parallel x PP with the full stack; and checkpoints resharded between splits.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from harness import assert_same_step, make_cfg, step_worker
from test_stack import TULIP
from tulip_mega.config import ConfigError
from tulip_mega.config.streams import input_streams
from tulip_mega.launch import resolve_layout
from tulip_mega.models.pipeline_split import StageCosts, balanced_split, even_split
from tulip_mega.models.pipeline_split import resolve_split as _resolve_split
from tulip_mega.models.pipeline_split import stage_costs as _stage_costs
from tulip_mega.parallel.spawn import run_distributed

BASE = ["train.global_batch_size=16", "train.micro_batch_size=8"]
UNEVEN = BASE + ["model.vision.num_layers=3"]  # vision 3 + text 2 layers
GRAD_RTOL = 1e-4
LOSS_RTOL = 1e-5


def resolve_split(cfg):
    return _resolve_split(cfg, input_streams(cfg))


def stage_costs(cfg):
    return _stage_costs(cfg, input_streams(cfg))


# --- arithmetic ------------------------------------------------------------------------------
def test_even_split_is_megatrons_default_when_pp_divides():
    cfg = make_cfg(BASE + ["parallel.pipeline_parallel=2", "parallel.pipeline_split=even"])
    assert resolve_split(cfg) == ((1, 1), (1, 1))
    layout = resolve_layout(cfg, 2)
    assert layout.tower_layout("vision") is None and layout.tower_layout("text") is None
    assert even_split(5, 2, 3) == ((2, 1), (2, 1), (1, 0))


def test_balanced_minimises_the_slowest_stage():
    costs = StageCosts(vision_layer=10, text_layer=3, first=4, last=20)
    split = balanced_split(costs, 6, 6, 3)
    assert sum(v for v, _ in split) == 6 and sum(t for _, t in split) == 6
    best = max(costs.stages(split))
    # Brute force over every split of 6 + 6 layers into 3 stages with a layer each.
    brute = min(max(costs.stages(((a, x), (b, y), (6 - a - b, 6 - x - y))))
                for a in range(7) for b in range(7 - a) for x in range(7) for y in range(7 - x)
                if all(n > 0 for n in (a + x, b + y, 12 - a - b - x - y)))
    assert best == brute
    assert best < max(costs.stages(even_split(6, 6, 3)))


def test_balanced_is_optimal_on_random_instances():
    import itertools
    import random

    def compositions(n, k):
        return [c for c in itertools.product(range(n + 1), repeat=k) if sum(c) == n]

    rng = random.Random(0)
    for _ in range(60):
        vision, text, stages = rng.randint(1, 6), rng.randint(1, 5), rng.randint(2, 4)
        if vision + text < stages:
            continue
        costs = StageCosts(rng.uniform(1, 10), rng.uniform(1, 10), rng.uniform(0, 20), rng.uniform(0, 40))
        brute = min(max(costs.stages(tuple(zip(a, b)))) for a in compositions(vision, stages)
                    for b in compositions(text, stages) if all(x + y for x, y in zip(a, b)))
        split = balanced_split(costs, vision, text, stages)
        assert [sum(col) for col in zip(*split)] == [vision, text] and all(v + t for v, t in split)
        assert max(costs.stages(split)) == pytest.approx(brute, rel=1e-9), (costs, vision, text, stages, split)


def test_balanced_stage_costs_come_from_flops():
    from tulip_mega.flops import count_flops

    cfg = make_cfg(UNEVEN + ["parallel.pipeline_parallel=2", "loss.contrastive_batch=micro"])
    costs, parts = stage_costs(cfg), count_flops(cfg, input_streams(cfg)).parts
    assert costs.vision_layer == 3 * (parts["vision_layers_matmul"] + parts["vision_layers_attention"]) / 3
    assert costs.first == 3 * parts["vision_patch_embed"]
    assert costs.last == 3 * (parts["vision_map_head"] + parts["text_head"])
    split = resolve_split(cfg)
    assert split == ((1, 1), (2, 1))  # text layers (64 tokens) outweigh vision (16 patches)
    layout = resolve_layout(cfg, 2)
    assert layout.split == split
    assert layout.tower_layout("vision") == [["embedding", "decoder"], ["decoder", "decoder", "loss"]]
    other = dataclasses.replace(layout, split=((3, 0), (0, 2)))
    assert other.tower_layout("text") == [["embedding"], ["decoder", "decoder", "loss"]]


@pytest.mark.parametrize("split,message", [
    ("[[2,0],[0,2]]", "the vision counts sum to 2, but model.vision.num_layers=3"),
    ("[[3,1],[0,0]]", "the text counts sum to 1, but model.text.num_layers=2"),
    ("[[3,2]]", "lists 1 stages, but parallel.pipeline_parallel=2"),
])
def test_bad_explicit_split_names_the_key(split, message):
    with pytest.raises(ConfigError, match="parallel.pipeline_split") as e:
        make_cfg(UNEVEN + ["parallel.pipeline_parallel=2", f"parallel.pipeline_split={split}"])
    assert message in str(e.value)


def test_stage_empty_of_both_towers_is_refused():
    with pytest.raises(ConfigError, match=r"parallel.pipeline_split=.*stage 2 would hold no layer of either tower"):
        make_cfg(UNEVEN + ["parallel.pipeline_parallel=3", "parallel.pipeline_split=[[3,0],[0,2],[0,0]]"])
    with pytest.raises(ConfigError, match="cannot fill parallel.pipeline_parallel=8 stages"):
        make_cfg(UNEVEN + ["parallel.pipeline_parallel=8"])


# --- equivalence with PP=1 ----------------------------------------------------------------------
def _compare(out: list[dict], ref: list[dict], third_vision_layer: bool = True) -> None:
    R = assert_same_step(out, ref, LOSS_RTOL, GRAD_RTOL)
    if third_vision_layer:
        assert any("vision_block.layers" in k and "[2]" in k for k in R), "the third vision layer is missing"


@pytest.mark.multiprocess
@pytest.mark.parametrize("stack", ["plain", "tulip"])
@pytest.mark.parametrize("split", ["balanced", "[[3,0],[0,2]]", "[[0,1],[3,1]]"],
                         ids=["balanced", "text_absent_from_stage0", "vision_absent_from_stage0"])
def test_uneven_split_matches_pp1(stack, split):
    overrides = UNEVEN + (TULIP if stack == "tulip" else [])
    ref = run_distributed(step_worker, 1, overrides)
    out = run_distributed(step_worker, 2, overrides + ["parallel.pipeline_parallel=2",
                                                       f"parallel.pipeline_split={split}"])
    _compare(out, ref)


@pytest.mark.multiprocess
@pytest.mark.parametrize("split", ["even", "[[3,0],[0,2]]"], ids=["even_2x2", "uneven_explicit"])
def test_sequence_parallel_with_pipeline_matches_tp1_pp1(split):
    """TP=2 x PP=2 with sequence parallel, the full TULIP stack: every stream's activations
    cross the stage boundary split along the sequence (half the rows each)."""
    model = BASE if split == "even" else UNEVEN
    ref = run_distributed(step_worker, 1, model + TULIP)
    out = run_distributed(step_worker, 4, model + TULIP + [
        "parallel.tensor_parallel=2", "parallel.pipeline_parallel=2", "parallel.sequence_parallel=true",
        f"parallel.pipeline_split={split}"])
    _compare(out, ref, third_vision_layer=split != "even")


# --- checkpoints across splits ------------------------------------------------------------------
def save_after_one_step_worker(overrides: list[str], root: str) -> str:
    import warnings

    warnings.filterwarnings("ignore")
    from pathlib import Path

    from megatron.core import parallel_state

    from harness import build_train_step, global_batches, rank_microbatches
    from tulip_mega.training.checkpoint import save_checkpoint
    from tulip_mega.training.loop import model_shape

    cfg, model, opt, sched, step = build_train_step(overrides)
    step(rank_microbatches(cfg, global_batches(cfg, 1), parallel_state.get_data_parallel_rank(), 1))
    return str(save_checkpoint(Path(root), 1, model, opt, sched, None, model_shape(cfg)))


def _tensors_worker(checkpoint: str) -> dict:
    import torch
    from megatron.core import dist_checkpointing

    return {k: v for k, v in dist_checkpointing.load_plain_tensors(checkpoint).items() if torch.is_tensor(v)}


@pytest.mark.multiprocess
def test_reshard_between_balanced_explicit_and_even_splits_keeps_every_tensor(tmp_path):
    """A checkpoint saved under the balanced split [[1,1],[2,1]] is rewritten by
    `tulip-mega reshard` for the split [[3,0],[0,2]], then for `even` and for PP=1: every
    weight and optimizer moment survives bit for bit."""
    from tulip_mega.training.reshard import reshard

    src = run_distributed(save_after_one_step_worker, 2, UNEVEN + ["parallel.pipeline_parallel=2"],
                          str(tmp_path / "balanced"))[0]
    ref = run_distributed(_tensors_worker, 1, src)[0]
    assert any("exp_avg" in k for k in ref) and any("vision_block" in k for k in ref)
    current = src
    for name, pp, split in (("explicit", 2, "[[3,0],[0,2]]"), ("even", 2, "even"), ("single", 1, "balanced")):
        current = str(reshard(current, 1, pp, tmp_path / name, [f"parallel.pipeline_split={split}"]))
        got = run_distributed(_tensors_worker, 1, current)[0]
        assert set(got) == set(ref), name
        for k in ref:
            assert torch.equal(got[k], ref[k]), (name, k)


def test_balanced_keeps_the_even_split_on_a_tie():
    # Equal vision and text layer costs: [[0, 2], [2, 0]] is as fast as [[1, 1], [1, 1]], and
    # the even split (megatron's default, no layout) is kept.
    cfg = make_cfg(BASE + ["parallel.pipeline_parallel=2", "model.text.context_length=16"])
    costs = stage_costs(cfg)
    assert costs.vision_layer == costs.text_layer
    assert resolve_split(cfg) == ((1, 1), (1, 1))
