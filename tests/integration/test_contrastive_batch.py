"""loss.contrastive_batch: the contrastive terms see the whole global batch (micro x DP x
accumulation), as SigLIP / TULIP define the loss, under any layout.

References:
  * plain SigLIP: an independent float64 plain-PyTorch computation (tulip_mega.convert's plain
    towers, which share no code with the megatron model, + the sigmoid loss written out here)
    over the whole global batch, from the same initial weights; gradients mapped back to
    megatron's names with the converter;
  * the full TULIP stack and clip-rocket: the same recipe in ONE process with ONE micro-batch
    holding the whole global batch (no accumulation, no cache: the dense loss stack, whose
    terms test_loss_terms.py checks against independent references).
The layouts: TP=2 x PP=2 with 4 micro-batches, and DP=2 with 2 micro-batches per rank.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from harness import assemble, assert_same_training, global_batches, make_cfg, stack_layers, step_worker
from test_stack import CLIP_ROCKET, TULIP
from tulip_mega.parallel.spawn import run_distributed

pytestmark = pytest.mark.multiprocess

GB = ["train.global_batch_size=16"]
PLAIN = GB + ["train.micro_batch_size=4"]
STACKS = {
    "plain": (PLAIN, ("image_text",), ()),
    "tulip": (TULIP + ["train.micro_batch_size=4"], ("image_text", "image_image", "text_text", "mae", "text_recon"),
              ()),
    "clip_rocket": (CLIP_ROCKET + ["train.micro_batch_size=4"], ("image_text", "aug_contrastive"), ("logit_bias",)),
}
LAYOUTS = {
    "tp2xpp2": (4, ["parallel.tensor_parallel=2", "parallel.pipeline_parallel=2"]),  # 4 micro-batches
    "dp2": (2, []),  # 2 micro-batches per rank
}
RTOL = 1e-5


@functools.lru_cache(maxsize=None)
def _run(world: int, overrides: tuple[str, ...], steps: int = 1, optimizer_steps: bool = False) -> list[dict]:
    return run_distributed(step_worker, world, list(overrides), steps, optimizer_steps)


def _dense_reference(overrides: list[str], steps: int = 1, optimizer_steps: bool = False) -> list[dict]:
    """One process, one micro-batch = the whole global batch: the dense loss, no cache."""
    return _run(1, tuple(overrides + ["train.micro_batch_size=16"]), steps, optimizer_steps)


def _relative_errors(got: dict, ref: dict) -> dict[str, float]:
    assert set(got) == set(ref), f"parameter sets differ: {sorted(set(got) ^ set(ref))}"
    return {k: ((got[k].double() - ref[k].double()).abs().max() / ref[k].double().abs().max().clamp_min(1e-12)).item()
            for k in ref}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("stack", list(STACKS))
def test_global_contrastive_batch_equals_dense_global_loss(stack, layout):
    overrides, terms, no_grad = STACKS[stack]
    world, extra = LAYOUTS[layout]
    out = _run(world, tuple(overrides + extra))
    ref = _dense_reference(overrides)
    for name in ("loss", *(f"loss/{t}" for t in terms)):
        assert out[0]["metrics"][name] == pytest.approx(ref[0]["metrics"][name], rel=RTOL), name
    R = assemble([r["entries"] for r in ref])
    errors = _relative_errors(assemble([r["entries"] for r in out]), R)
    bad = {k: v for k, v in errors.items() if v > RTOL}
    assert not bad, f"gradients differ from the dense global-batch reference: {bad}"
    dead = [k for k in R if R[k].abs().max() == 0 and k not in no_grad]
    assert not dead, f"parameters without gradient: {dead}"


def _plain_float64_reference(ref_run: list[dict], chunks: int) -> tuple[float, dict[str, torch.Tensor]]:
    """Plain SigLIP in float64 from the run's initial weights: mean over `chunks` equal parts of
    the global batch of the dense sigmoid loss (chunks=1: the global-batch loss). Returns the
    loss and its gradients in megatron's (layer-stacked) key space."""
    from tulip_mega.convert.plain import megatron_key_to_plain, plain_to_megatron
    from tulip_mega.convert.plain_model import PlainConfig, TulipPlainModel

    cfg = make_cfg(PLAIN)
    v, t = cfg.model.vision, cfg.model.text
    weights = stack_layers(assemble([r["initial"] for r in ref_run]))
    heads = {"vision": v.num_heads, "text": t.num_heads}
    plain = {name: tensor for key, w in weights.items() for name, tensor in megatron_key_to_plain(key, w, heads)}
    arch = ("image_size", "patch_size", "num_layers", "hidden_size", "num_heads", "ffn_hidden_size")
    config = PlainConfig(vision={k: getattr(v, k) for k in arch},
                         text={k: getattr(t, k) for k in ("vocab_size", "context_length", *arch[2:])},
                         layernorm_eps=cfg.model.layernorm_eps)
    model = TulipPlainModel(config).double()
    model.load_state_dict({k: w.double() for k, w in plain.items()}, strict=True)
    batch = global_batches(cfg, 1)[0]
    image = F.normalize(model.vision_model(batch.images.double()), dim=-1)  # [B, e]
    text = F.normalize(model.text_model(batch.tokens), dim=-1)
    logits = model.logit_scale.exp() * image @ text.T + model.logit_bias  # [B, B]
    n = logits.shape[0] // chunks
    losses = []
    for c in range(chunks):
        block = logits[c * n:(c + 1) * n, c * n:(c + 1) * n]
        labels = 2 * torch.eye(n, dtype=torch.float64) - 1  # +1 on the diagonal, -1 elsewhere
        losses.append(-F.logsigmoid(labels * block).sum() / n)
    loss = torch.stack(losses).mean()
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    num_layers = {"vision": v.num_layers, "text": t.num_layers}
    return loss.item(), plain_to_megatron(grads, num_layers, heads)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_plain_siglip_global_batch_equals_float64_plain_pytorch(layout):
    world, extra = LAYOUTS[layout]
    out = _run(world, tuple(PLAIN + extra))
    loss, grads = _plain_float64_reference(out, chunks=1)
    assert out[0]["metrics"]["loss"] == pytest.approx(loss, rel=RTOL)
    errors = _relative_errors(stack_layers(assemble([r["entries"] for r in out])), grads)
    bad = {k: v for k, v in errors.items() if v > RTOL}
    assert not bad, f"gradients differ from the float64 plain-PyTorch global-batch loss: {bad}"


def test_micro_mode_equals_per_micro_batch_reference():
    """loss.contrastive_batch=micro keeps the old definition: the mean over the 4 micro-batches
    of the dense loss on each (micro x DP = 4 pairs); and it is really a different loss."""
    out = _run(4, tuple(PLAIN + LAYOUTS["tp2xpp2"][1] + ["loss.contrastive_batch=micro"]))
    loss, grads = _plain_float64_reference(out, chunks=4)
    assert out[0]["metrics"]["loss"] == pytest.approx(loss, rel=RTOL)
    errors = _relative_errors(stack_layers(assemble([r["entries"] for r in out])), grads)
    bad = {k: v for k, v in errors.items() if v > RTOL}
    assert not bad, f"gradients differ from the per-micro-batch reference: {bad}"
    # At init (bias -10) the losses differ little (1e-4 relative: the positives dominate), the
    # gradients clearly: the two modes train different objectives.
    _, global_grads = _plain_float64_reference(out, chunks=1)
    assert max(_relative_errors(grads, global_grads).values()) > 100 * RTOL


def test_three_adamw_steps_match_dense_reference():
    """The full TULIP stack, global contrastive batch, TP=2 x PP=2 with 4 micro-batches: three
    AdamW steps end at the weights of one process training on the whole global batch at once.
    Float32 reduction-order differences grow through Adam (see test_parallel): 1e-4 absolute."""
    overrides = STACKS["tulip"][0]
    ref = _dense_reference(overrides, 3, True)
    out = _run(4, tuple(overrides + LAYOUTS["tp2xpp2"][1]), 3, True)
    assert_same_training(out, ref)
