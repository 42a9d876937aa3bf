"""The embedding cache's replay (training/embedding_cache.py, loss.contrastive_batch=global):
the gradient pass must reproduce the cached contrastive outputs.

  * train.check_cache passes on CPU for every recipe family (plain SigLIP, the full TULIP
    stack, clip-rocket) over several micro-batches, and stops the run on every rank (exit code
    6, naming the output, the difference and the tolerance) when a tower's replay differs;
  * a model with a random layer (dropout) is refused when the cache would replay it;
  * FP8 delayed scaling (training/fp8_replay.py), with stand-ins that hold Transformer Engine's
    `fp8_meta["scaling_fwd"]` state and update it as TE does (TE cannot run here): the replay
    reproduces the cache pass only with the guard, both in isolation and wired into TrainStep.
"""

from __future__ import annotations

import types

import pytest
import torch

from harness import build_train_step, global_batches, rank_microbatches
from test_stack import CLIP_ROCKET, TULIP
from tulip_mega.parallel.spawn import run_distributed

GB = ["train.global_batch_size=16", "train.micro_batch_size=4", "train.check_cache=true"]
FAMILIES = {"plain": GB, "tulip": TULIP + GB, "clip_rocket": CLIP_ROCKET + GB}
CONTRASTIVE_KEYS = {
    "plain": {"image_emb", "text_emb", "logit_scale", "logit_bias"},
    "tulip": {"image_emb", "text_emb", "view_emb", "texts_emb", "ii_logit_scale", "tt_logit_bias"},
    "clip_rocket": {"image_emb", "text_emb", "aug_image", "aug_text", "aug_logit_scale"},
}


def _record_comparisons(step) -> list:
    """Wrap the step's CacheCheck.compare to record (micro, keys, worst relative difference)."""
    seen = []
    check = step.cache.check
    real = check.compare

    def compare(output, micro):
        real(output, micro)
        seen.append((micro, sorted(check.cached[micro]),
                     max(float((output.tensors()[k].detach() - v).abs().max()) for k, v in check.cached[micro].items())))
    check.compare = compare
    return seen


def _check_worker(overrides, steps, perturb_rank=None):
    import warnings

    warnings.filterwarnings("ignore")
    from megatron.core import parallel_state

    from tulip_mega.training.errors import CacheReplayMismatch

    cfg, model, optimizer, scheduler, step = build_train_step(overrides)
    seen = _record_comparisons(step) if parallel_state.is_pipeline_last_stage() else []
    dp, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    if rank == perturb_rank:  # the text head adds noise when grad is on: only the replay differs
        head = step.modules[0].text_head
        clean = head.forward
        head.forward = lambda x: clean(x) + (1e-3 * torch.randn_like(x[..., :1]) if torch.is_grad_enabled() else 0)
    it = rank_microbatches(cfg, global_batches(cfg, steps), rank, dp)
    try:
        for _ in range(steps):
            step(it)
    except CacheReplayMismatch as e:
        return {"error": (str(e), e.exit_code), "seen": seen, "steps": step.completed_steps}
    return {"error": None, "seen": seen, "steps": step.completed_steps,
            "micro": step.num_microbatches}


@pytest.mark.multiprocess
@pytest.mark.parametrize("family", list(FAMILIES))
def test_check_cache_passes_for_every_family(family):
    """4 micro-batches, 2 optimizer steps: every micro-batch's replay is compared (each
    contrastive output of the family) and equals the cache (CPU float32: bit-identical)."""
    out = run_distributed(_check_worker, 1, FAMILIES[family], 2)[0]
    assert out["error"] is None and out["steps"] == 2
    assert [m for m, _, _ in out["seen"]] == [0, 1, 2, 3] * 2
    for _, keys, worst in out["seen"]:
        assert CONTRASTIVE_KEYS[family] <= set(keys), keys
        assert "mae_pred" not in keys and "text_logits" not in keys
        assert worst == 0.0


@pytest.mark.multiprocess
@pytest.mark.slow
def test_check_cache_passes_under_pipeline_parallel():
    """PP=2, full stack, 4 micro-batches: the last stage compares, every stage agrees."""
    out = run_distributed(_check_worker, 2, TULIP + GB + ["parallel.pipeline_parallel=2"], 1)
    assert all(r["error"] is None and r["steps"] == 1 for r in out)
    first, last = out
    assert first["seen"] == [] and [m for m, _, _ in last["seen"]] == [0, 1, 2, 3]
    assert all(worst == 0.0 for _, _, worst in last["seen"])


@pytest.mark.multiprocess
@pytest.mark.slow
def test_check_cache_fires_on_every_rank_when_one_replay_differs():
    """DP=2 (2 micro-batches per rank), full stack: rank 1's replay of the caption embedding
    differs; both ranks stop in step 1 with the same message (exit code 6)."""
    out = run_distributed(_check_worker, 2, TULIP + GB, 2, 1)
    messages = set()
    for r in out:
        assert r["error"] is not None and r["steps"] == 0, r
        message, code = r["error"]
        assert code == 6
        messages.add(message)
    assert len(messages) == 1, messages
    message = messages.pop()
    assert message.startswith("step 1: train.check_cache: the gradient pass's contrastive outputs differ from the "
                              "cached ones beyond the tolerance 1e-05 (relative to the largest cached value): ")
    assert "text_emb: max abs diff " in message and "in micro-batch " in message
    assert "image_emb" not in message  # the vision tower replays exactly


def test_trainer_maps_cache_mismatch_to_exit_6():
    from tulip_mega.train import EXIT_CACHE_MISMATCH
    from tulip_mega.training.errors import CacheReplayMismatch, TrainingHalted

    assert issubclass(CacheReplayMismatch, TrainingHalted) and CacheReplayMismatch.exit_code == EXIT_CACHE_MISMATCH == 6


# --- random layers ------------------------------------------------------------------------------
def _dropout_worker(overrides):
    import warnings

    warnings.filterwarnings("ignore")
    from tulip_mega.training.cache_check import stochastic_layers
    from tulip_mega.training.data import caption_pad_id
    from tulip_mega.training.errors import TrainingHalted
    from tulip_mega.training.step import TrainStep

    cfg, model, optimizer, scheduler, step = build_train_step(overrides)
    clean = stochastic_layers(step.modules)
    step.modules[0].vision_block.layers[0].mlp.add_module("dropout", torch.nn.Dropout(0.1))
    try:
        TrainStep(cfg, step.layout, model, optimizer, scheduler, pad_id=caption_pad_id(cfg))
        return clean, None
    except TrainingHalted as e:
        return clean, str(e)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_random_layers_are_refused_only_when_the_cache_replays_them():
    clean, refused = run_distributed(_dropout_worker, 1, GB)[0]
    assert clean == [], clean  # the model as built has no random layer
    assert refused is not None and "loss.contrastive_batch=global" in refused
    assert "vision_block.layers.0.mlp.dropout.p=0.1" in refused and "loss.contrastive_batch=micro" in refused
    _, accepted = run_distributed(_dropout_worker, 1, GB + ["loss.contrastive_batch=micro"])[0]
    assert accepted is None


def test_stochastic_layers_finds_rates_and_configs():
    from tulip_mega.training.cache_check import stochastic_layers

    m = torch.nn.Module()
    m.attn = types.SimpleNamespace()  # not a module: ignored
    m.drop = torch.nn.Dropout(0.0)
    m.core = torch.nn.Module()
    m.core.dropout_p = 0.2
    m.block = torch.nn.Module()
    m.block.config = types.SimpleNamespace(hidden_dropout=0.1, attention_dropout=0.0)
    assert stochastic_layers([m]) == ["block.config.hidden_dropout=0.1", "core.dropout_p=0.2"]


def test_tolerance_by_precision():
    from tulip_mega.config import load_config
    from tulip_mega.training.cache_check import tolerance

    assert tolerance(load_config(None, ["precision.dtype=fp32"]).precision) == 1e-5
    assert tolerance(load_config(None, ["precision.dtype=bf16"]).precision) == 1e-2
    assert tolerance(load_config(None, ["precision.fp8=hybrid"]).precision) == 2e-2
    assert tolerance(load_config(None).precision, 3e-4) == 3e-4


# --- FP8 delayed scaling ------------------------------------------------------------------------
class FakeScalingState:
    """TE's DelayedScalingRecipeState: `scale` [n] and `amax_history` [len, n]."""

    def __init__(self, n: int = 1, history: int = 4) -> None:
        self.scale = torch.ones(n)
        self.amax_history = torch.zeros(history, n)


class FakeFp8Linear(torch.nn.Module):
    """A delayed-scaling FP8 linear as TE runs it: the state is created at the first forward;
    the input is cast with the current scale (here to 3 bits of precision, so a scale change
    shows); the cast records its amax in `amax_history[0]`. `fake_autocast_exit` is TE's update."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.linear = linear
        self.fp8_meta = {"fp8_checkpoint": False}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if "scaling_fwd" not in self.fp8_meta:
            self.fp8_meta["scaling_fwd"] = FakeScalingState()
        state = self.fp8_meta["scaling_fwd"]
        state.amax_history[0] = torch.maximum(state.amax_history[0], x.detach().abs().max())
        step = 8.0 / state.scale  # 8 levels per unit of scaled input
        q = x + (torch.round(x.detach() * step) / step - x.detach())  # straight-through cast
        return self.linear(q)


def fake_autocast_exit(modules, under_no_grad: bool = False) -> None:
    """TE's FP8GlobalStateManager.autocast_exit + reduce_and_update_fp8_tensors(forward=True):
    only with grad enabled (TE 2.x); `under_no_grad` plays a TE that also updates without grad."""
    if not (torch.is_grad_enabled() or under_no_grad):
        return
    for m in modules:
        state = m.fp8_meta.get("scaling_fwd")
        if state is None:
            continue
        amax = state.amax_history.max(dim=0).values
        state.amax_history.copy_(torch.roll(state.amax_history, -1, 0))
        state.amax_history[0].zero_()
        state.scale.copy_(torch.where(amax > 0, 1.0 / amax, state.scale))


class FakeTower(torch.nn.Module):
    """Two FP8 linears in one 'block call' (one autocast, as megatron's TransformerBlock)."""

    def __init__(self, under_no_grad: bool = False) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = FakeFp8Linear(torch.nn.Linear(8, 8))
        self.b = FakeFp8Linear(torch.nn.Linear(8, 4))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        self.under_no_grad = under_no_grad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.b(torch.relu(self.a(x)))
        fake_autocast_exit([self.a, self.b], self.under_no_grad)
        return y


def _two_passes(tower, guard, micro: list[torch.Tensor], other: torch.Tensor):
    """The cache pass (no_grad, contrastive streams only) and the gradient pass (another
    stream first, e.g. MAE, then the contrastive one), as TrainStep runs them."""
    with guard.cache_pass(), torch.no_grad():
        cached = [tower(x) for x in micro]
    return cached, _replay(tower, guard, micro, other)


def _replay(tower, guard, micro: list[torch.Tensor], other: torch.Tensor) -> list[torch.Tensor]:
    """The gradient pass of `_two_passes` alone."""
    replayed = []
    with guard.replay_pass():
        for x in micro:
            tower(other).sum().backward()
            out = tower(x)
            out.sum().backward()
            replayed.append(out.detach())
    return replayed


def _state(tower, name):
    return tower.get_submodule(name).fp8_meta["scaling_fwd"]


@pytest.mark.parametrize("under_no_grad", [False, True])
def test_fp8_replay_uses_the_cache_pass_scales(under_no_grad):
    import copy

    from tulip_mega.training.fp8_replay import Fp8ReplayScales, _NoReplayGuard

    g = torch.Generator().manual_seed(1)
    micro = [torch.randn(4, 8, generator=g) * s for s in (1.0, 3.0, 0.5, 2.0)]  # amaxes differ
    other = torch.randn(4, 8, generator=g) * 5
    tower = FakeTower(under_no_grad)
    tower(torch.randn(4, 8, generator=g) * 2).sum().backward()  # a previous step: S is not the initial 1
    start = {n: (_state(tower, n).scale.clone(), _state(tower, n).amax_history.clone()) for n in ("a", "b")}
    with torch.no_grad():
        at_start = [copy.deepcopy(tower)(x) for x in micro]  # every micro-batch cast with S

    # Without the guard the replay casts with the scales every earlier tower call updated.
    cached, replayed = _two_passes(copy.deepcopy(tower), _NoReplayGuard(), micro, other)
    assert not all(torch.equal(c, r) for c, r in zip(cached, replayed)), "the stand-in does not move its scales"

    guard = Fp8ReplayScales([tower])
    with guard.cache_pass(), torch.no_grad():
        cached = [tower(x) for x in micro]
    for n in ("a", "b"):  # the cache pass leaves no trace, also where TE updated without grad
        assert torch.equal(_state(tower, n).scale, start[n][0]), n
        assert torch.equal(_state(tower, n).amax_history, start[n][1]), n
    assert all(torch.equal(c, s) for c, s in zip(cached, at_start))
    replayed = _replay(tower, guard, micro, other)
    for m, (c, r) in enumerate(zip(cached, replayed)):
        assert torch.equal(c, r), f"micro-batch {m}: the replay differs from the cache"
    # TE still updates in the replay (the scales move once per step), and the hooks are gone.
    for n in ("a", "b"):
        assert not torch.equal(_state(tower, n).scale, start[n][0]), n
    assert not tower.a._forward_pre_hooks and not tower.b._forward_pre_hooks


def test_fp8_replay_first_step_and_selection():
    """The state TE creates during the cache pass (first step) is what the replay uses; the
    guard is chosen only for precision.fp8 with the delayed recipe."""
    from tulip_mega.config import load_config
    from tulip_mega.training.fp8_replay import Fp8ReplayScales, _NoReplayGuard, replay_guard

    tower = FakeTower()
    micro = [torch.full((2, 8), v) for v in (0.3, 2.0, 0.7)]
    cached, replayed = _two_passes(tower, Fp8ReplayScales([tower]), micro, torch.full((2, 8), 4.0))
    assert all(torch.equal(c, r) for c, r in zip(cached, replayed))
    assert isinstance(replay_guard(load_config(None, ["precision.fp8=hybrid"]).precision, [tower]), Fp8ReplayScales)
    for overrides in ([], ["precision.fp8=hybrid", "precision.fp8_recipe=tensorwise"]):
        assert isinstance(replay_guard(load_config(None, overrides).precision, [tower]), _NoReplayGuard)


def test_one_restore_per_transformer_block():
    """Modules inside a megatron TransformerBlock are restored by one hook on the block (TE
    updates only when the block's autocast exits); a module outside any block by its own."""
    from megatron.core.transformer.transformer_block import TransformerBlock

    from tulip_mega.training.fp8_replay import Fp8ReplayScales

    block = TransformerBlock.__new__(TransformerBlock)  # a block's place in the tree; never run
    torch.nn.Module.__init__(block)
    block.tower = FakeTower()
    root = torch.nn.Module()
    root.block, root.head = block, FakeFp8Linear(torch.nn.Linear(4, 4))
    root.head(block.tower(torch.randn(2, 8))).sum().backward()  # creates the FP8 state
    guard = Fp8ReplayScales([root])
    with guard.cache_pass():
        pass
    with guard.replay_pass():
        assert len(block._forward_pre_hooks) == 1 and len(root.head._forward_pre_hooks) == 1
        assert not block.tower.a._forward_pre_hooks and not block.tower.b._forward_pre_hooks
        for m in (block.tower.a, block.tower.b, root.head):
            m.fp8_meta["scaling_fwd"].scale.fill_(7.0)
        block._forward_pre_hooks[next(iter(block._forward_pre_hooks))](block, ())
        assert float(block.tower.a.fp8_meta["scaling_fwd"].scale) != 7.0
        assert float(block.tower.b.fp8_meta["scaling_fwd"].scale) != 7.0
        assert float(root.head.fp8_meta["scaling_fwd"].scale) == 7.0  # its own hook runs with it
    assert not block._forward_pre_hooks and not root.head._forward_pre_hooks


def test_cache_pass_switches_full_recompute_off():
    from tulip_mega.training.fp8_replay import Fp8ReplayScales

    root = torch.nn.Module()
    root.block = torch.nn.Module()
    root.block.config = types.SimpleNamespace(recompute_granularity="full")
    seen = []
    with Fp8ReplayScales([root]).cache_pass():
        seen.append(root.block.config.recompute_granularity)
    assert seen == [None] and root.block.config.recompute_granularity == "full"


# --- wired into TrainStep -------------------------------------------------------------------------
def _fp8_step_worker(overrides, guarded):
    """The real step with the caption head replaced by the FP8 stand-in (same parameters) whose
    scales TE-style update after each call with grad on: check_cache fires unless the step's
    replay guard holds the cache pass's scales."""
    import warnings

    warnings.filterwarnings("ignore")
    from megatron.core import parallel_state

    from tulip_mega.training.fp8_replay import Fp8ReplayScales
    from tulip_mega.training.errors import CacheReplayMismatch

    cfg, model, optimizer, scheduler, step = build_train_step(overrides)
    fake = FakeFp8Linear(step.modules[0].text_head)
    real_forward = fake.forward

    def forward(x):
        y = real_forward(x)
        fake_autocast_exit([fake])
        return y
    fake.forward = forward
    step.modules[0].text_head = fake
    if guarded:
        step.cache.fp8 = Fp8ReplayScales(step.model_parts)  # what replay_guard gives a recipe with precision.fp8
    it = rank_microbatches(cfg, global_batches(cfg, 2), parallel_state.get_data_parallel_rank(), 1)
    try:
        for _ in range(2):
            step(it)
    except CacheReplayMismatch as e:
        return str(e)
    return None


@pytest.mark.multiprocess
@pytest.mark.slow
def test_train_step_replays_fp8_scales_of_the_cache_pass():
    unguarded = run_distributed(_fp8_step_worker, 1, GB, False)[0]
    assert unguarded is not None and "text_emb: max abs diff" in unguarded
    assert run_distributed(_fp8_step_worker, 1, GB, True)[0] is None
