"""`resolve_layout`: the recipe's layout worked out once, its refusals naming the recipe key,
and megatron's per-tower pipeline layout derived from it (`RunLayout.tower_layout`)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from tulip_mega.config import ConfigError, load_config
from tulip_mega.config.streams import input_streams
from tulip_mega.launch import check_launch, resolve_layout

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "recipes" / "tiny_cpu.yaml")
TULIP_1B = str(REPO / "recipes" / "tulip_1b.yaml")


def test_tiny_recipe_on_eight_processes():
    layout = resolve_layout(load_config(TINY), 8)
    assert (layout.world_size, layout.tensor_parallel, layout.pipeline_parallel, layout.virtual_pipeline,
            layout.data_parallel) == (8, 2, 2, 1, 2)
    assert (layout.micro_batch_size, layout.global_batch_size, layout.microbatches) == (32, 64, 1)
    # loss.contrastive_batch=global over one micro-batch per step: no cache pass is needed.
    assert layout.contrastive_batch == 64 and not layout.embedding_cache
    assert layout.split == ((1, 1), (1, 1)) and layout.model_parts == 1
    assert layout.streams == input_streams(load_config(TINY))


def test_tulip_1b_interleaved_on_64_gpus():
    cfg = load_config(TULIP_1B, ["parallel.pipeline_parallel=4", "parallel.virtual_pipeline=2"])
    layout = resolve_layout(cfg, 64)
    assert (layout.tensor_parallel, layout.pipeline_parallel, layout.data_parallel) == (2, 4, 8)
    assert (layout.microbatches, layout.contrastive_batch, layout.embedding_cache) == (256, 32768, True)
    assert layout.model_parts == 2
    assert layout.split == ((5, 4),) * 6 + ((5, 3), (5, 0))  # balanced over PP x virtual = 8 chunks
    assert [sum(col) for col in zip(*layout.split)] == [cfg.model.vision.num_layers, cfg.model.text.num_layers]


def test_micro_contrastive_batch_needs_no_cache():
    cfg = load_config(TINY, ["loss.contrastive_batch=micro", "parallel.tensor_parallel=1",
                             "parallel.pipeline_parallel=1", "train.micro_batch_size=8"])
    layout = resolve_layout(cfg, 2)
    assert (layout.data_parallel, layout.microbatches) == (2, 4)
    assert layout.contrastive_batch == 16 and not layout.embedding_cache
    cached = resolve_layout(load_config(TINY, ["parallel.tensor_parallel=1", "parallel.pipeline_parallel=1",
                                               "train.micro_batch_size=8"]), 2)
    assert cached.contrastive_batch == 64 and cached.embedding_cache


@pytest.mark.parametrize("overrides,world,key", [
    ([], 3, "world size 3 is not divisible by parallel.tensor_parallel=2"),
    (["parallel.tensor_parallel=1"], 6, "train.global_batch_size=64 is not divisible by train.micro_batch_size=32"),
    (["parallel.tensor_parallel=1", "parallel.virtual_pipeline=2", "train.global_batch_size=24",
      "train.micro_batch_size=8"], 2, "parallel.virtual_pipeline=2 needs the micro-batches per step"),
    # A balanced split is only known with the FLOP model: refused here, not when the recipe loads.
    (["parallel.tensor_parallel=1", "recompute.granularity=full", "recompute.num_layers=2"], 2,
     "recompute.num_layers=2 exceeds the 1 layers of the fullest pipeline stage"),
])
def test_refusals_name_the_recipe_key(overrides, world, key):
    cfg = load_config(TINY, overrides)
    with pytest.raises(ConfigError, match=key.replace("[", r"\[")):
        resolve_layout(cfg, world)


def test_check_launch_adds_what_the_machine_must_support():
    from tulip_mega.parallel.init import use_cuda

    cfg = load_config(TINY, ["parallel.distributed_optimizer=true"])
    assert resolve_layout(cfg, 4).data_parallel == 1  # the arithmetic alone accepts it
    if use_cuda():
        assert check_launch(cfg, 4) == resolve_layout(cfg, 4)
    else:
        with pytest.raises(ConfigError, match="parallel.distributed_optimizer=true needs CUDA"):
            check_launch(cfg, 4)
    with pytest.raises(ConfigError, match="world size 3"):  # the batch arithmetic is checked first
        check_launch(cfg, 3)


def test_tower_layout():
    one = resolve_layout(load_config(TINY, ["parallel.pipeline_parallel=1"]), 2)
    assert one.tower_layout("vision") is None and one.tower_layout("text") is None
    even = resolve_layout(load_config(TINY), 4)  # PP 2 divides both towers: megatron's default split
    assert even.split == ((1, 1), (1, 1)) and even.tower_layout("vision") is None
    uneven = dataclasses.replace(even, split=((2, 0), (0, 2)))
    assert uneven.tower_layout("vision") == [["embedding", "decoder", "decoder"], ["loss"]]
    assert uneven.tower_layout("text") == [["embedding"], ["decoder", "decoder", "loss"]]
    # Under interleaving a layout is always set: it is how megatron learns the chunks.
    chunks = dataclasses.replace(even, virtual_pipeline=2, split=((1, 0), (0, 1), (0, 1), (1, 0)))
    assert chunks.tower_layout("vision") == [["embedding", "decoder"], [], [], ["decoder", "loss"]]


def test_resolve_layout_imports_no_torch():
    """`plan` resolves layouts for hypothetical worlds and must answer at once."""
    code = ("import sys; from tulip_mega.config import load_config; from tulip_mega.launch import resolve_layout; "
            f"resolve_layout(load_config({TULIP_1B!r}), 64); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
