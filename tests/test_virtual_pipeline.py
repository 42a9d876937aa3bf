"""parallel.virtual_pipeline: interleaved virtual pipeline stages (megatron's interleaved
schedule, one TulipModel chunk per virtual stage) give the loss and every gradient of the
unpipelined run; checkpoints reshard between interleaved and non-interleaved layouts and a run
resumes exactly across them.

Unit tests (no processes) check the chunk arithmetic and the config errors. Multi-process
tests: PP=2 x virtual=2 (2 gloo ranks, 4 chunks) against PP=1 with 4 micro-batches and the
global contrastive batch (the embedding cache's two schedule passes), plain SigLIP and the
full TULIP stack, an even and an uneven (balanced) split.
"""

from __future__ import annotations

import pytest
import torch

from harness import assemble, make_cfg, step_worker
from test_stack import TULIP
from tulip_mega.config import ConfigError
from tulip_mega.models.pipeline_split import resolve_split, tower_layout
from tulip_mega.parallel.spawn import run_distributed

# 4 micro-batches of 4 per step: the interleaved schedule needs a multiple of PP.
BASE = ["train.global_batch_size=16", "train.micro_batch_size=4"]
EVEN = BASE + ["model.vision.num_layers=4", "model.text.num_layers=4"]  # one layer of each tower per chunk
UNEVEN = BASE + ["model.vision.num_layers=3"]  # vision 3 + text 2 layers over 4 chunks
VIRTUAL = ["parallel.pipeline_parallel=2", "parallel.virtual_pipeline=2"]
GRAD_RTOL = 1e-4
LOSS_RTOL = 1e-5


# --- arithmetic and config errors --------------------------------------------------------------
def test_split_has_one_pair_per_chunk_in_megatrons_order():
    cfg = make_cfg(EVEN + VIRTUAL + ["parallel.pipeline_split=even"])
    assert resolve_split(cfg) == ((1, 1),) * 4
    # Chunk-major: rank 0 chunk 0, rank 1 chunk 0, rank 0 chunk 1, rank 1 chunk 1.
    cfg = make_cfg(UNEVEN + VIRTUAL + ["parallel.pipeline_split=[[1,0],[1,0],[0,1],[1,1]]"])
    split = resolve_split(cfg)
    assert tower_layout(split, "vision", 2) == [["embedding", "decoder"], ["decoder"], [], ["decoder", "loss"]]
    from megatron.core.transformer.pipeline_parallel_layer_layout import PipelineParallelLayerLayout

    layout = PipelineParallelLayerLayout(tower_layout(split, "text", 2), 2)
    assert layout.virtual_pipeline_model_parallel_size == 2
    assert [[row.count(layout.layout[0][0][0].__class__.decoder) for row in rank] for rank in layout.layout] == \
        [[0, 1], [0, 1]]


def test_balanced_splits_the_chunks():
    cfg = make_cfg(UNEVEN + VIRTUAL)
    split = resolve_split(cfg)
    assert len(split) == 4 and all(v + t for v, t in split)
    assert [sum(c) for c in zip(*split)] == [3, 2]


@pytest.mark.parametrize("overrides,message", [
    (["parallel.virtual_pipeline=2"], "parallel.virtual_pipeline=2 needs parallel.pipeline_parallel > 1"),
    (["parallel.virtual_pipeline=0"], "parallel.virtual_pipeline"),
    (["parallel.pipeline_parallel=2", "parallel.virtual_pipeline=3"],
     "cannot fill parallel.pipeline_parallel=2 x parallel.virtual_pipeline=3 = 6 chunks"),
    (VIRTUAL + ["parallel.pipeline_split=even", "model.vision.num_layers=3"],
     "parallel.pipeline_split=even: chunk 3 would hold no layer of either tower"),
    (VIRTUAL + ["parallel.pipeline_split=[[1,1],[1,1]]"], "lists 2 pairs, but parallel.pipeline_parallel=2 x "
                                                          "parallel.virtual_pipeline=2 = 4 chunks"),
])
def test_bad_virtual_layout_names_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        make_cfg(BASE + overrides)
    assert message in str(e.value)


def test_microbatches_must_be_a_multiple_of_pp():
    from tulip_mega.config import validate_layout

    cfg = make_cfg(["train.global_batch_size=12", "train.micro_batch_size=4"] + VIRTUAL)
    with pytest.raises(ConfigError, match="parallel.virtual_pipeline=2 needs the micro-batches per step .* = 3"):
        validate_layout(cfg, 2)
    assert validate_layout(make_cfg(BASE + VIRTUAL), 2) == 1


# --- equivalence with PP=1 ----------------------------------------------------------------------
def _compare(out: list[dict], ref: list[dict]) -> None:
    for name in ref[0]["metrics"]:
        if name.startswith("loss"):
            assert out[0]["metrics"][name] == pytest.approx(ref[0]["metrics"][name], rel=LOSS_RTOL), name
    R = assemble([r["entries"] for r in ref])
    G = assemble([r["entries"] for r in out])
    assert set(G) == set(R), f"parameter sets differ: {sorted(set(G) ^ set(R))}"
    bad = {}
    for k in R:
        assert G[k].shape == R[k].shape, k
        err = ((G[k] - R[k]).abs().max() / R[k].abs().max().clamp_min(1e-8)).item()
        if err > GRAD_RTOL:
            bad[k] = err
    assert not bad, f"gradients differ from PP=1: {bad}"


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("stack,model", [("plain", "even"), ("plain", "uneven"), ("tulip", "even")])
def test_pp2_virtual2_matches_pp1(stack, model):
    overrides = (EVEN if model == "even" else UNEVEN) + (TULIP if stack == "tulip" else []) + BASE[1:]
    ref = run_distributed(step_worker, 1, overrides)
    out = run_distributed(step_worker, 2, overrides + VIRTUAL)
    assert len(out[0]["entries"]) and len(out[1]["entries"])
    _compare(out, ref)


# --- checkpoints across interleaved and non-interleaved layouts ---------------------------------
def train_worker(overrides: list[str], steps: int, root: str, load: str = "", start: int = 0) -> dict:
    """`steps` optimizer steps on global batches start.. (after loading `load` when given), then
    a checkpoint under `root`; returns the losses, the checkpoint and the weight shards."""
    import warnings

    warnings.filterwarnings("ignore")
    from pathlib import Path

    from megatron.core import parallel_state

    from harness import _chunk_entries, build_train_step, global_batches, rank_microbatches
    from tulip_mega.training.checkpoint import load_checkpoint, model_shape, save_checkpoint

    cfg, model, opt, sched, step = build_train_step(overrides)
    if load:
        assert load_checkpoint(Path(load), model, opt, sched, None, model_shape(cfg))["step"] == start
        step.completed_steps = start
    batches = global_batches(cfg, start + steps)[start:]
    it = rank_microbatches(cfg, batches, parallel_state.get_data_parallel_rank(),
                           parallel_state.get_data_parallel_world_size())
    losses = [step(it)["loss"] for _ in range(steps)]
    path = save_checkpoint(Path(root), start + steps, model, opt, sched, None, model_shape(cfg))
    return {"losses": losses, "checkpoint": str(path), "entries": _chunk_entries(step.modules, "data")}


def _tensors_worker(checkpoints: list[str]) -> list[dict]:
    """Every tensor (weights and optimizer moments) of each checkpoint, unsharded."""
    from megatron.core import dist_checkpointing

    return [{k: v for k, v in dist_checkpointing.load_plain_tensors(c).items() if torch.is_tensor(v)}
            for c in checkpoints]


def _world(layout: list[str]) -> int:
    return 2 if "parallel.pipeline_parallel=2" in layout else 1


@pytest.mark.multiprocess
@pytest.mark.slow
def test_reshard_between_interleaved_even_balanced_and_single_keeps_every_tensor(tmp_path):
    """A PP=2 x virtual=2 checkpoint (uneven model: 3 vision + 2 text layers over 4 chunks)
    rewritten by `tulip-mega reshard` for PP=1, for PP=2 balanced and PP=2 even, and a PP=1
    checkpoint back to PP=2 x virtual=2: every weight and optimizer moment survives bit for bit."""
    from tulip_mega.training.reshard import reshard

    src = run_distributed(train_worker, 2, UNEVEN + VIRTUAL, 1, str(tmp_path / "interleaved"))[0]["checkpoint"]
    single = str(reshard(src, 1, 1, tmp_path / "single"))
    paths = {
        "single": single,
        "balanced": str(reshard(src, 1, 2, tmp_path / "balanced", ["parallel.pipeline_split=balanced"])),
        "even": str(reshard(src, 1, 2, tmp_path / "even", ["parallel.pipeline_split=even"])),
        "back": str(reshard(single, 1, 2, tmp_path / "back", ["parallel.pipeline_split=balanced"], virtual=2)),
    }
    ref, *loaded = run_distributed(_tensors_worker, 1, [src, *paths.values()])[0]
    assert any("exp_avg" in k for k in ref) and any("vision_block" in k for k in ref)
    for name, got in zip(paths, loaded):
        assert set(got) == set(ref), (name, sorted(set(got) ^ set(ref)))
        for k in ref:
            assert torch.equal(got[k], ref[k]), (name, k)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_resume_across_interleaved_and_plain_layouts(tmp_path):
    """2 steps under one layout, a checkpoint, 2 more steps under the other from it, both ways
    (PP=2 x virtual=2 -> PP=1 and PP=1 -> PP=2 x virtual=2): the losses and final weights of an
    uninterrupted 4-step PP=1 run (float32 reduction order differs between layouts, hence the
    tolerances of harness.assert_same_training)."""
    ref = run_distributed(train_worker, 1, UNEVEN, 4, str(tmp_path / "ref"))
    R = assemble([r["entries"] for r in ref])
    assert ref[0]["losses"][-1] < ref[0]["losses"][0], "the reference did not train"
    for name, first, second in (("interleaved_then_single", VIRTUAL, []), ("single_then_interleaved", [], VIRTUAL)):
        a = run_distributed(train_worker, _world(first), UNEVEN + first, 2, str(tmp_path / name / "a"))
        b = run_distributed(train_worker, _world(second), UNEVEN + second, 2, str(tmp_path / name / "b"),
                            a[0]["checkpoint"], 2)
        assert a[0]["losses"] + b[0]["losses"] == pytest.approx(ref[0]["losses"], rel=1e-4), name
        W = assemble([r["entries"] for r in b])
        assert set(W) == set(R), name
        for k in R:
            torch.testing.assert_close(W[k], R[k], rtol=0, atol=1e-4, msg=f"{name}: {k}")
