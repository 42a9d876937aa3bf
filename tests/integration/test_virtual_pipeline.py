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

from pathlib import Path
from typing import Optional

import pytest
import torch

from harness import assemble, assert_same_step, make_cfg, step_worker
from test_stack import TULIP
from tulip_mega.config import ConfigError
from tulip_mega.config.streams import input_streams
from tulip_mega.launch import resolve_layout
from tulip_mega.models.pipeline_split import resolve_split as _resolve_split
from tulip_mega.parallel.spawn import run_distributed

# 4 micro-batches of 4 per step: the interleaved schedule needs a multiple of PP.
BASE = ["train.global_batch_size=16", "train.micro_batch_size=4"]
EVEN = BASE + ["model.vision.num_layers=4", "model.text.num_layers=4"]  # one layer of each tower per chunk
UNEVEN = BASE + ["model.vision.num_layers=3"]  # vision 3 + text 2 layers over 4 chunks
VIRTUAL = ["parallel.pipeline_parallel=2", "parallel.virtual_pipeline=2"]
GRAD_RTOL = 1e-4
LOSS_RTOL = 1e-5


def resolve_split(cfg):
    return _resolve_split(cfg, input_streams(cfg))


# --- arithmetic and config errors --------------------------------------------------------------
def test_split_has_one_pair_per_chunk_in_megatrons_order():
    cfg = make_cfg(EVEN + VIRTUAL + ["parallel.pipeline_split=even"])
    assert resolve_split(cfg) == ((1, 1),) * 4
    # Chunk-major: rank 0 chunk 0, rank 1 chunk 0, rank 0 chunk 1, rank 1 chunk 1.
    cfg = make_cfg(UNEVEN + VIRTUAL + ["parallel.pipeline_split=[[1,0],[1,0],[0,1],[1,1]]"])
    split = resolve_split(cfg)
    run_layout = resolve_layout(cfg, 2)
    assert run_layout.split == split
    assert run_layout.tower_layout("vision") == [["embedding", "decoder"], ["decoder"], [], ["decoder", "loss"]]
    from megatron.core.transformer.pipeline_parallel_layer_layout import PipelineParallelLayerLayout

    layout = PipelineParallelLayerLayout(run_layout.tower_layout("text"), 2)
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
    assert_same_step(out, ref, LOSS_RTOL, GRAD_RTOL)


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
def test_reshard_between_interleaved_balanced_and_single_keeps_every_tensor(tmp_path):
    """A PP=2 x virtual=2 checkpoint (uneven model: 3 vision + 2 text layers over 4 chunks)
    rewritten by `tulip-mega reshard` for PP=1 and for PP=2 balanced, and the PP=1 checkpoint
    back to PP=2 x virtual=2: every weight and optimizer moment survives bit for bit (even <->
    balanced <-> explicit without interleaving: tests/integration/test_pipeline_split.py)."""
    from tulip_mega.training.reshard import reshard

    src = run_distributed(train_worker, 2, UNEVEN + VIRTUAL, 1, str(tmp_path / "interleaved"))[0]["checkpoint"]
    single = str(reshard(src, 1, 1, tmp_path / "single"))
    paths = {
        "single": single,
        "balanced": str(reshard(src, 1, 2, tmp_path / "balanced", ["parallel.pipeline_split=balanced"])),
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


# --- evaluation through the interleaved schedule -----------------------------------------------
def embed_worker(overrides: list[str]) -> Optional[dict]:
    """Embeddings of 19 samples (4 full micro-batches of 4 and a short one: 5 micro-batches,
    topped up to 6 under interleaving) by eval.embed.Embedder; the last stage's result."""
    import warnings

    warnings.filterwarnings("ignore")
    from megatron.core import parallel_state

    from tulip_mega.eval.embed import Embedder
    from tulip_mega.models.build import build_model_chunks
    from tulip_mega.parallel.init import init_parallel

    cfg = make_cfg(overrides)
    init_parallel(1, cfg.parallel.pipeline_parallel, cfg.run.seed, virtual_pipeline=cfg.parallel.virtual_pipeline)
    chunks = build_model_chunks(cfg, resolve_layout(cfg, cfg.parallel.pipeline_parallel))
    g = torch.Generator().manual_seed(1)
    n, size, L = 19, cfg.model.vision.image_size, cfg.model.text.context_length
    images, tokens = torch.randn(n, 3, size, size, generator=g), torch.randint(3, 200, (n, L), generator=g)
    source = [(images[i:i + 4], tokens[i:i + 4], torch.arange(i, min(i + 4, n))) for i in range(0, n, 4)]
    out = Embedder(chunks, 4, size, L, chunk=8).embed(source)
    return out if parallel_state.is_pipeline_last_stage() else None


@pytest.mark.multiprocess
def test_eval_embeddings_under_interleaving_match_pp1():
    ref = run_distributed(embed_worker, 1, EVEN)[0]
    out = run_distributed(embed_worker, 2, EVEN + VIRTUAL)[1]
    assert out["labels"].tolist() == list(range(19))  # the padding micro-batch's rows were dropped
    for key in ("image_emb", "text_emb"):
        torch.testing.assert_close(out[key], ref[key], rtol=1e-5, atol=1e-6, msg=key)


# --- the real trainer ---------------------------------------------------------------------------
def trainer_worker(overrides: list[str]) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    from pathlib import Path

    from tulip_mega.config import load_config
    from tulip_mega.training.loop import train

    recipe = Path(__file__).resolve().parents[2] / "recipes" / "tiny_cpu.yaml"
    return train(load_config(str(recipe), overrides))


@pytest.mark.multiprocess
@pytest.mark.slow
def test_trainer_runs_interleaved_with_eval_and_resumes_at_pp1(shapes_data, tmp_path):
    """tulip_mega.training.loop.train at TP=1 x PP=2 x virtual=2 on the tiny recipe (real shards,
    loader, eval hook through the interleaved schedule, checkpoints), then the same run resumed
    from its step-2 checkpoint at PP=1: steps 3-4 repeat (losses within float32 rounding)."""
    from tulip_mega.training.metrics import read_metrics

    data_dir = str(tmp_path / "runs")
    common = [f"data.train_shards={shapes_data['train']}", f"data.tokenizer={shapes_data['tokenizer']}",
              f"run.output_dir={data_dir}", "train.steps=4", "optim.warmup_steps=1", "logging.tensorboard=false",
              "parallel.tensor_parallel=1", "checkpoint.interval=2", "eval.zeroshot_shards=null",
              "eval.linear_probe_shards=null",
              f"eval.retrieval_shards={str(Path(shapes_data['train']).parent / 'val-{000000..000000}.tar')}",
              "eval.interval=4"]
    run_distributed(trainer_worker, 2, common + ["run.name=interleaved", "parallel.pipeline_parallel=2",
                                                 "parallel.virtual_pipeline=2"])
    first = read_metrics(tmp_path / "runs" / "interleaved" / "metrics.jsonl")
    assert [m["step"] for m in first] == [1, 2, 3, 4]
    assert first[-1]["eval/retrieval/samples"] == 128
    step2 = tmp_path / "runs" / "interleaved" / "checkpoints" / "step_0000002"
    run_distributed(trainer_worker, 1, common + ["run.name=single", "parallel.pipeline_parallel=1",
                                                 f"checkpoint.load={step2}"])
    again = read_metrics(tmp_path / "runs" / "single" / "metrics.jsonl")
    assert [m["step"] for m in again] == [3, 4]
    for a, b in zip(again, first[2:]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), a["step"]
