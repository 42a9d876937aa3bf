"""The TULIP loss stack and the clip-rocket baseline inside the real training step.

Layout equivalence for the whole stack: every term and every gradient (towers, heads, both
decoders, projectors, per-term logit scales) under TP=2 x PP=2 and under DP=2 equals the
single-process run from the same initial weights. The terms themselves are checked against
independent references in test_loss_terms.py; here the question is the wiring: views, GeCo
masks, pipeline packing of several tower calls, decoders on the last stage.
"""

from __future__ import annotations

import pytest
import torch

from harness import assemble, make_cfg, step_worker
from tulip_mega.config.streams import input_streams
from tulip_mega.losses.stack import pair_weights
from tulip_mega.parallel.spawn import run_distributed

BASE = ["train.global_batch_size=16", "train.micro_batch_size=8"]
TULIP = BASE + [
    "loss.weights.image_image=1", "loss.weights.text_text=0.5", "loss.weights.mae=2", "loss.weights.text_recon=0.7",
    "data.views.global_crops=2", "data.views.local_crops=2", "data.views.local_size=16",
    "data.views.geco_images=true", "data.views.paraphrases=2", "data.views.negatives=2",
    "model.mae_decoder.num_layers=1", "model.text_decoder.num_layers=1",
]
CLIP_ROCKET = BASE + [
    "loss.contrastive=infonce", "loss.weights.aug_contrastive=1", "loss.aug_label_smoothing=0.1",
    "data.views.global_crops=2", "data.views.eda=true", "model.aug_projector_hidden=32",
]
TULIP_TERMS = ("image_text", "image_image", "text_text", "mae", "text_recon")
GRAD_RTOL = 1e-4


def _compare(out: list[dict], ref: list[dict], terms: tuple[str, ...], unused: tuple[str, ...] = ()) -> None:
    for name in ("loss", *(f"loss/{t}" for t in terms)):
        assert out[0]["metrics"][name] == pytest.approx(ref[0]["metrics"][name], rel=1e-5), name
    R = assemble([r["entries"] for r in ref])
    G = assemble([r["entries"] for r in out])
    assert set(G) == set(R), f"parameter sets differ: {sorted(set(G) ^ set(R))}"
    worst = {k: ((G[k] - R[k]).abs().max() / R[k].abs().max().clamp_min(1e-8)).item() for k in R}
    bad = {k: v for k, v in worst.items() if v > GRAD_RTOL}
    assert not bad, f"gradients differ from the reference: {bad}"
    dead = [k for k in R if R[k].abs().max() == 0 and k not in unused]
    assert not dead, f"parameters without gradient: {dead}"


def test_pair_weights_match_the_rules():
    """+1 / -1 / 0 semantics written out pair by pair."""
    b = 3
    same = torch.tensor([[0.0, 0, 0], [1, 1, 0], [-1, 0, -1]])  # view 0 = the rows themselves
    valid = torch.tensor([[True] * 3, [True, True, False], [True, False, True]])
    local, remote = pair_weights(same, valid, [0])
    for a in range(b):
        for j in range(3):
            for d in range(b):
                if a == d:
                    expected = 0.0 if j == 0 else same[j, d].item()
                else:
                    expected = -1.0 if valid[j, d] else 0.0
                assert local[a, j * b + d].item() == expected, (a, j, d)
    assert remote.tolist() == [-1.0 if v else 0.0 for v in valid.reshape(-1).tolist()]


def test_zero_weight_terms_have_no_inputs():
    """Views asked for but whose loss weight is 0 are neither loaded nor encoded."""
    cfg = make_cfg(["data.views.global_crops=2", "data.views.local_crops=4", "data.views.local_size=16",
                    "data.views.paraphrases=2", "data.views.negatives=2", "data.views.eda=true",
                    "loss.hard_negatives=false"])
    s = input_streams(cfg)
    assert [v.name for v in s.vision] == ["global"] and s.global_views == 1 and s.texts == 1
    assert not s.mae_visible and not s.text_recon
    full = input_streams(make_cfg(TULIP))
    assert [(v.name, v.views, v.seq) for v in full.vision] == [("global", 4, 16), ("local", 2, 4), ("mae", 1, 4)]
    assert full.texts == 5 and full.text_recon


@pytest.mark.multiprocess
def test_full_tulip_stack_tp2_pp2_matches_single_process():
    ref = run_distributed(step_worker, 1, TULIP)
    assert set(ref[0]["metrics"]) >= {f"loss/{t}" for t in TULIP_TERMS}
    out = run_distributed(step_worker, 4, TULIP + ["parallel.tensor_parallel=2", "parallel.pipeline_parallel=2"])
    _compare(out, ref, TULIP_TERMS)


@pytest.mark.multiprocess
def test_full_tulip_stack_data_parallel_equals_dense_batch():
    """DP=2 x micro 8: every contrastive term sees the other rank's 8 samples as negatives,
    exactly like DP=1 with micro 16."""
    ref = run_distributed(step_worker, 1, [*TULIP, "train.micro_batch_size=16"])
    out = run_distributed(step_worker, 2, TULIP)
    _compare(out, ref, TULIP_TERMS)


@pytest.mark.multiprocess
def test_clip_rocket_stack_layouts_match():
    """InfoNCE + aug InfoNCE (label smoothing) under DP=2 and under TP=2 x PP=2. InfoNCE has no
    bias: the (exported) sigmoid logit_bias gets no gradient."""
    terms, unused = ("image_text", "aug_contrastive"), ("logit_bias",)
    ref = run_distributed(step_worker, 1, [*CLIP_ROCKET, "train.micro_batch_size=16"])
    _compare(run_distributed(step_worker, 2, CLIP_ROCKET), ref, terms, unused)
    ref8 = run_distributed(step_worker, 1, CLIP_ROCKET)
    _compare(run_distributed(step_worker, 4, CLIP_ROCKET + ["parallel.tensor_parallel=2",
                                                            "parallel.pipeline_parallel=2"]), ref8, terms, unused)


TEXT_RECON = ["train.global_batch_size=4", "loss.weights.text_recon=1", "model.text_decoder.num_layers=1"]


@pytest.mark.multiprocess
def test_text_recon_is_the_token_mean_of_the_step_whatever_the_split():
    """Captions of 2, 3, 8 and 8 tokens (eos included, then padding): split into 2 + 2
    micro-batches, over DP=2 x 1 micro-batch and DP=2 x 2 micro-batches of one, the loss and
    every gradient equal the dense batch's, whose text_recon is the mean over its 21 tokens."""
    captions = (2, 3, 8, 8)
    ref = run_distributed(step_worker, 1, [*TEXT_RECON, "train.micro_batch_size=4"], 1, False, captions)
    for world, micro in ((1, 2), (2, 2), (2, 1)):
        out = run_distributed(step_worker, world, [*TEXT_RECON, f"train.micro_batch_size={micro}"], 1, False,
                              captions)
        _compare(out, ref, ("image_text", "text_recon"))


def _train_worker(recipe: str, overrides: list[str]) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    from tulip_mega.config import load_config
    from tulip_mega.training.loop import train

    return train(load_config(recipe, overrides))


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("recipe,terms", [
    ("tiny_tulip_cpu.yaml", TULIP_TERMS),
    ("clip_rocket_tiny_cpu.yaml", ("image_text", "aug_contrastive")),
], ids=["tulip", "clip_rocket"])
def test_tiny_recipe_every_term_decreases(shapes_data, tmp_path, recipe, terms):
    """The shipped tiny recipes on the synthetic shapes shards (with their GeCo fields): every
    term's mean over the last 10 steps is below its mean over the first 10. One process
    (TP=PP=DP=1) to keep CI time down; the layouts are checked against it above."""
    from pathlib import Path

    from tulip_mega.training.metrics import read_metrics

    repo = Path(__file__).resolve().parents[2]
    steps = 60
    overrides = [f"data.train_shards={shapes_data['train']}", f"data.tokenizer={shapes_data['tokenizer']}",
                 f"run.output_dir={tmp_path}", "run.name=tiny", f"train.steps={steps}", "optim.warmup_steps=6",
                 "parallel.tensor_parallel=1", "parallel.pipeline_parallel=1", "logging.tensorboard=false",
                 "checkpoint.interval=0"]
    if recipe.startswith("clip_rocket"):
        # The 10% bar was set with 16 text tokens; at the debug size's 64 the text-aug InfoNCE falls
        # more slowly in 60 steps (measured 2.25 -> 2.08, -7.5%), the image-text term as before.
        overrides.append("model.text.context_length=16")
    run_distributed(_train_worker, 1, str(repo / "recipes" / recipe), overrides)
    metrics = read_metrics(tmp_path / "tiny" / "metrics.jsonl")
    assert len(metrics) == steps
    for term in terms:
        values = [m[f"loss/{term}"] for m in metrics]
        first, last = sum(values[:10]) / 10, sum(values[-10:]) / 10
        assert last < 0.9 * first, f"loss/{term} did not fall: first 10 steps {first:.4f}, last 10 {last:.4f}"
