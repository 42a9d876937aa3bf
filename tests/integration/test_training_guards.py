"""What keeps a long run healthy: AdamW's parameter groups, the non-finite step guard, the
pipeline lockstep check, and recipe keys that are either honoured or refused."""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import pytest
import torch

from harness import build_train_step, global_batches, make_cfg, rank_microbatches
from test_stack import CLIP_ROCKET, TULIP
from tulip_mega.config import ConfigError
from tulip_mega.config.streams import input_streams
from tulip_mega.parallel.spawn import run_distributed

REPO = Path(__file__).resolve().parents[2]
PLAIN = ["train.global_batch_size=16", "train.micro_batch_size=8"]
EVERY_HEAD = TULIP + ["loss.weights.aug_contrastive=1", "data.views.eda=true", "model.aug_projector_hidden=32"]


# --- parameter groups ---------------------------------------------------------------------------
def _decay_worker(overrides):
    import warnings

    warnings.filterwarnings("ignore")
    from tulip_mega.training.optimizer import weight_decay_table

    cfg, model, optimizer, _, _ = build_train_step(overrides)
    return {"wd": weight_decay_table(model, optimizer), "configured": cfg.optim.weight_decay,
            "shapes": {n: tuple(p.shape) for part in model for n, p in part.named_parameters()}}


@pytest.mark.multiprocess
def test_weight_decay_only_on_kernels():
    """Every parameter's decay, listed: kernels (>= 2-dim weights of linear/conv layers) get
    optim.weight_decay; logit scales/biases, norms, biases, position/token embeddings, the MAP
    probe and the MAE mask token get none (big_vision's rule, docs/training.md)."""
    out = run_distributed(_decay_worker, 1, EVERY_HEAD + ["optim.weight_decay=0.1"])[0]
    wd, shapes = out["wd"], out["shapes"]
    table = "\n".join(f"{wd[n]:5.2f}  {n} {shapes[n]}" for n in sorted(wd))
    assert not any(v != v for v in wd.values()), f"parameters outside the optimizer:\n{table}"
    scalars = [n for n in wd if re.search(r"logit_(scale|bias)$", n)]
    assert len(scalars) == 7, scalars  # it, ii, tt scale+bias and the aug scale
    for name, value in wd.items():
        short = name.removeprefix("module.")
        no_decay = (len(shapes[name]) <= 1 or "position_embedding" in short or "word_embeddings" in short
                    or short.endswith("probe") or short.endswith("mask_token"))
        expected = 0.0 if no_decay else 0.1
        assert value == pytest.approx(expected), f"{name}: decay {value}, expected {expected}\n{table}"
    for kernel in ("vision_block.layers.0.self_attention.linear_qkv.weight", "text_head.weight",
                   "vision_embed.patch_embedding.weight", "mae_decoder.decoder_pred.weight"):
        assert wd[f"module.{kernel}"] == pytest.approx(0.1), kernel


# --- non-finite guard ---------------------------------------------------------------------------
def _snapshot(model, optimizer) -> dict:
    """Every weight and every Adam state tensor (moments, step), copied."""
    state = {f"param/{n}": p.detach().clone() for part in model for n, p in part.named_parameters()}
    for j, sub in enumerate(getattr(optimizer, "chained_optimizers", [optimizer])):
        for i, s in enumerate(sub.optimizer.state.values()):
            for k, v in s.items():
                state[f"adam/{j}/{i}/{k}"] = v.detach().clone() if torch.is_tensor(v) else v
    assert any(k.endswith("exp_avg") for k in state), "no Adam moments to compare"
    return state


def _assert_identical(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        if torch.is_tensor(a[k]):
            assert torch.equal(a[k], b[k]), f"{k} changed"
        else:
            assert a[k] == b[k], f"{k} changed"


def _poison(batch, value=float("nan")):
    bad = dataclasses.replace(batch, images=batch.images.clone())
    bad.images[0, 0, 0, 0] = value
    return bad


def _nan_worker(overrides):
    import warnings

    warnings.filterwarnings("ignore")
    from megatron.core import parallel_state

    from tulip_mega.training.errors import NonFiniteTraining

    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("tulip_mega").addHandler(handler)
    cfg, model, optimizer, scheduler, step = build_train_step(overrides)
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    good = list(rank_microbatches(cfg, global_batches(cfg, 6), dp_rank, dp))
    per_step = len(good) // 6
    step(iter(good[:per_step]))  # one real step: Adam moments exist
    before = _snapshot(model, optimizer)
    lr_steps = scheduler.num_steps
    # Step 2: one rank's micro-batch holds a NaN pixel.
    batches = good[per_step:2 * per_step]
    if dp_rank == dp - 1:
        batches[-1] = _poison(batches[-1])
    skipped = step(iter(batches))
    after = _snapshot(model, optimizer)
    result = {"skipped": skipped, "lr_steps": (lr_steps, scheduler.num_steps), "messages": list(messages)}
    _assert_identical(before, after)
    ok = step(iter(good[2 * per_step:3 * per_step]))  # a finite step updates again
    result["ok"] = ok
    result["changed"] = any(not torch.equal(before[k], v) for k, v in _snapshot(model, optimizer).items()
                            if k.startswith("param/"))
    try:  # max_skipped_steps (2) consecutive inf steps stop the run
        for i in range(3, 6):
            step(iter([_poison(b, float("inf")) for b in good[i * per_step:(i + 1) * per_step]]))
        result["halted"] = None
    except NonFiniteTraining as e:
        result["halted"] = (str(e), e.exit_code, step.completed_steps)
    return result


@pytest.mark.multiprocess
def test_non_finite_step_changes_nothing_and_repeats_stop_the_run():
    """DP=2, global contrastive batch: a NaN on one rank skips the step on every rank, leaving
    every weight and Adam moment bit-identical and the LR schedule where it was; it is logged
    and counted; the next finite step trains; 2 consecutive bad steps halt with exit code 4."""
    out = run_distributed(_nan_worker, 2, PLAIN + ["train.micro_batch_size=4", "train.max_skipped_steps=2"])
    for r in out:
        assert r["skipped"]["train/skipped_steps"] == 1.0 and r["skipped"]["loss"] != r["skipped"]["loss"]
        assert r["lr_steps"][0] == r["lr_steps"][1], "the LR schedule advanced on a skipped step"
        assert r["ok"]["train/skipped_steps"] == 1.0 and r["changed"]
        message, code, halted_at = r["halted"]
        assert code == 4 and halted_at == 5, r["halted"]
        assert "2 consecutive steps" in message and "non-finite" in message
    logged = [m for m in out[0]["messages"] if "skipped" in m]
    assert logged and "step 2 skipped: non-finite loss=nan" in logged[0], logged
    assert "loss/image_text=nan" in logged[0] and "no weight or optimizer state changed" in logged[0]


def _halt_run_worker(recipe, overrides):
    """The real trainer on shards whose images are NaN: returns tulip_mega.train's exit code."""
    import warnings

    warnings.filterwarnings("ignore")
    import tulip_mega.training.loop as loop
    from tulip_mega import train

    real = loop.build_train_loader

    class Poisoned:
        def __init__(self, inner):
            self.inner = inner

        def __iter__(self):
            for b in self.inner:
                yield _poison(b)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    loop.build_train_loader = lambda *a, **k: Poisoned(real(*a, **k))
    return train.main([recipe, *overrides])


@pytest.mark.multiprocess
def test_trainer_exits_4_after_max_skipped_steps(shapes_data, tmp_path):
    from tulip_mega.train import EXIT_NON_FINITE
    from tulip_mega.training.metrics import read_metrics

    overrides = [f"data.train_shards={shapes_data['train']}", f"data.tokenizer={shapes_data['tokenizer']}",
                 f"run.output_dir={tmp_path}", "run.name=nan", "train.steps=10", "train.max_skipped_steps=3",
                 "optim.warmup_steps=0", "parallel.tensor_parallel=1", "parallel.pipeline_parallel=1",
                 "logging.tensorboard=false", "checkpoint.interval=1", "eval.interval=0"]
    codes = run_distributed(_halt_run_worker, 1, str(REPO / "recipes" / "tiny_cpu.yaml"), overrides)
    assert codes == [EXIT_NON_FINITE] == [4]
    metrics = read_metrics(tmp_path / "nan" / "metrics.jsonl")
    assert [m["train/skipped_steps"] for m in metrics] == [1.0, 2.0]  # the third raised before logging
    assert 'exit 4' in (REPO / "slurm" / "common.sh").read_text()  # common.sh names it and does not requeue


# --- pipeline lockstep --------------------------------------------------------------------------
def _lockstep_worker(overrides):
    import warnings

    warnings.filterwarnings("ignore")
    from megatron.core import parallel_state

    from tulip_mega.training.errors import PipelineDataMismatch

    cfg, model, optimizer, scheduler, step = build_train_step(overrides)
    assert step.needs_input, "both stages must read batches for this test"
    batches = list(rank_microbatches(cfg, global_batches(cfg, 1), 0, 1))
    if parallel_state.is_pipeline_last_stage():  # the last stage's loader dropped one sample
        b = batches[1]
        batches[1] = dataclasses.replace(b, keys=[b.keys[0], "s0-extra", *b.keys[2:]])
    try:
        step(iter(batches))
    except PipelineDataMismatch as e:
        return (str(e), e.exit_code)
    return None


@pytest.mark.multiprocess
@pytest.mark.parametrize("mode", ["global", "micro"])
def test_pipeline_stages_that_disagree_stop_the_step(mode):
    overrides = TULIP + ["train.micro_batch_size=4", "parallel.pipeline_parallel=2", f"loss.contrastive_batch={mode}"]
    out = run_distributed(_lockstep_worker, 2, overrides)
    for r in out:
        assert r is not None, "the mismatch was not detected"
        message, code = r
        assert code == 5
        assert ("step 1: pipeline stages read different samples: micro-batch 1, sample 1: "
                "stage 0 has key 's0-5', stage 1 has 's0-extra'") in message


# --- recipe keys --------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,fragment", [
    (["data.views.negatives=2", "loss.sigmoid_impl=ring"], "loss.sigmoid_impl=ring cannot be honoured: loss.hard_neg"),
    (TULIP + ["loss.sigmoid_impl=ring", "loss.hard_negatives=false"], "loss.weights.image_image, loss.weights.text"),
    (CLIP_ROCKET + ["loss.sigmoid_impl=gather"], "loss.sigmoid_impl=gather has no effect: no sigmoid term"),
])
def test_sigmoid_impl_that_nothing_honours_is_refused(overrides, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        make_cfg(overrides)
    make_cfg([o for o in overrides if not o.startswith("loss.sigmoid_impl")])  # auto is fine
    if overrides[-1].endswith("ring"):
        make_cfg(overrides[:-1] + ["loss.sigmoid_impl=gather"])  # the weighted terms' own implementation


def _schema_leaves(cls, prefix=""):
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.type) or (f.default_factory is not dataclasses.MISSING
                                                and dataclasses.is_dataclass(f.default_factory)):
            yield from _schema_leaves(f.default_factory, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f.name


def test_every_recipe_key_is_read_somewhere():
    """A key that no code reads would be silently ignored: every schema field must be read (as an
    attribute or by name) by code outside the schema itself."""
    from tulip_mega.config.schema import Config

    sources = [p for d in ("tulip_mega",) for p in (REPO / d).rglob("*.py")
               if p.name != "schema.py"]
    text = "\n".join(p.read_text() for p in sources)
    unread = [path for path, name in _schema_leaves(Config)
              if not re.search(rf"\.{name}\b|[\"']{name}[\"']", text)]
    assert not unread, f"recipe keys nothing reads: {unread}"


def test_infonce_scale_is_clamped_at_100():
    """open_clip clamps the InfoNCE temperature at 100; the stack does so for both InfoNCE terms,
    and a scale above the clamp gets no gradient."""
    from tulip_mega.losses.infonce import infonce_loss
    from tulip_mega.losses.outputs import ModelOutputs
    from tulip_mega.losses.stack import TulipLossStack

    cfg = make_cfg(CLIP_ROCKET)
    stack = TulipLossStack(cfg, input_streams(cfg), group=None, pad_id=0)
    g = torch.Generator().manual_seed(0)
    emb = [torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1) for _ in range(4)]
    scale = torch.tensor(300.0, requires_grad=True)
    aug_scale = torch.tensor(50.0, requires_grad=True)
    zero = torch.zeros(())
    out = ModelOutputs(image_emb=emb[0], text_emb=emb[1], aug_image=emb[2], aug_text=emb[3], logit_scale=scale,
                       logit_bias=zero, ii_logit_scale=scale, ii_logit_bias=zero, tt_logit_scale=scale,
                       tt_logit_bias=zero, aug_logit_scale=aug_scale)
    total, terms = stack(out)
    assert terms["image_text"].item() == pytest.approx(infonce_loss(emb[0], emb[1], 100.0).item())
    assert terms["aug_contrastive"].item() == pytest.approx(
        infonce_loss(emb[2], emb[3], 50.0, label_smoothing=0.1).item())
    total.backward()
    assert scale.grad.item() == 0.0 and aug_scale.grad.item() != 0.0
