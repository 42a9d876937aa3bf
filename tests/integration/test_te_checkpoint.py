"""A checkpoint written with Transformer Engine layer names resumes, evaluates and reshards on CPU.

Transformer Engine does not import here, so TE's checkpoint is made the way TE layers make it,
through megatron's own sharded state dict: `fake_te` gives the modules the TE spec replaces
(linear_qkv, linear_proj, linear_fc1, linear_fc2, the blocks' final norm) a `get_extra_state`,
so megatron stores each one's `_extra_state` as a ShardedObject per layer exactly as it does for
TE modules, and renames the pre-norm LayerNorms to the fused names TE stores
(`self_attention.linear_qkv.layer_norm_*`, `mlp.linear_fc1.layer_norm_*`, the renames of
megatron's own local GPT spec `sharded_state_dict_keys_map`). The same trained state is saved
once with local and once with TE names, and the run config beside both is a GPU run's
(`transformer_impl: te`, `fp8: hybrid`, `distributed_optimizer: true`).

- resume: the TE checkpoint continues with exactly the losses of the local one, into local
  layers and into (fake) TE layers; TE layers get their own layer's saved `_extra_state` back;
  from a local checkpoint, TE linears read the local linears' empty one and TE final norms,
  which have none there, keep their own;
- eval: `eval_config` + `load_weights` give the same embeddings from both;
- reshard: both reshard (TP=2 x PP=1 from PP=2) to bit-identical tensors, model and optimizer;
- an optimizer state written by megatron's DistributedOptimizer is refused by reshard on CPU.
"""

from __future__ import annotations

import contextlib
import pickle
from pathlib import Path

import pytest
import torch

from harness import build_train_step, global_batches, make_cfg, rank_microbatches
from tulip_mega.parallel.spawn import run_distributed

LAYOUT = ["parallel.tensor_parallel=1", "parallel.pipeline_parallel=2"]
EXTRA = ["train.global_batch_size=16", "train.micro_batch_size=4"]  # 4 micro-batches
# What a GPU run's config.yaml says; eval and reshard must read its checkpoints on CPU.
GPU_RUN = ["model.transformer_impl=te", "precision.fp8=hybrid", "parallel.distributed_optimizer=true"]
STEP = "checkpoints/step_0000002"
# Local name -> the name TE layers store (the LayerNorm is fused into the next linear).
FUSED = {"layers.input_layernorm.": "layers.self_attention.linear_qkv.layer_norm_",
         "layers.pre_mlp_layernorm.": "layers.mlp.linear_fc1.layer_norm_"}
TE_MODULES = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")


class _ExtraState:
    """TE 2.x's extra state: pickled FP8 metadata in a uint8 tensor. Here it encodes the
    module's weights, so a test can tell which layer's state a module received."""

    def get_extra_state(self) -> torch.Tensor:
        meta = {"scale_fwd": self.weight.detach().double().sum().item(), "recipe": "DelayedScaling(HYBRID)"}
        return torch.frombuffer(bytearray(pickle.dumps(meta)), dtype=torch.uint8)

    def set_extra_state(self, state) -> None:
        self.received_extra_state = state


def _te_modules(module: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    return [(n, m) for n, m in module.named_modules()
            if n.endswith(TE_MODULES) or n.endswith("final_layernorm")]


@contextlib.contextmanager
def fake_te(module: torch.nn.Module):
    """`module` (a TulipModel) checkpoints as the TE spec does: `_extra_state` on TE's modules,
    fused LayerNorm names."""
    swapped = []
    for _, m in _te_modules(module):
        swapped.append((m, m.__class__))
        m.__class__ = type("TE" + m.__class__.__name__, (_ExtraState, m.__class__), {})
    original = module.sharded_state_dict

    def renamed(*args, **kwargs):
        state = original(*args, **kwargs)
        for item in state.values():
            for local, te in FUSED.items():
                if local in getattr(item, "key", ""):
                    item.key = item.key.replace(local, te)
        return state

    module.sharded_state_dict = renamed
    try:
        yield
    finally:
        del module.sharded_state_dict
        for m, cls in swapped:
            m.__class__ = cls


def _received(module) -> str:
    """What a (fake) TE module got on load: 'saved' its own layer's state from the checkpoint
    (the weights are loaded, so it encodes them), 'none' a local linear's empty state, 'own'
    the state it had before loading (put back where the checkpoint has none)."""
    state = getattr(module, "received_extra_state", "not called")
    if state is None:
        return "none"
    if isinstance(state, torch.Tensor):
        saved, now = (pickle.loads(bytes(t.numpy())) for t in (state, module.get_extra_state()))
        return "saved" if saved == now else "own"
    return str(state)


def _batches(cfg, first: int, last: int):
    return rank_microbatches(cfg, global_batches(cfg, last)[first:last], 0, 1)


def write_worker(root: str) -> dict:
    """Train 2 steps at PP=2; save the state with local names and with TE names; continue 2 steps."""
    import warnings

    warnings.filterwarnings("ignore")
    import torch.distributed as dist

    from tulip_mega.config.load import save_config
    from tulip_mega.training.checkpoint import model_shape, save_checkpoint

    cfg, model, opt, sch, step = build_train_step(LAYOUT + EXTRA)
    it = _batches(cfg, 0, 2)
    for _ in range(2):
        step(it)
    for name in ("local", "te"):
        with fake_te(model[0].module) if name == "te" else contextlib.nullcontext():
            save_checkpoint(Path(root) / name / "checkpoints", 2, model, opt, sch, None, model_shape(cfg))
        if dist.get_rank() == 0:
            save_config(make_cfg(LAYOUT + EXTRA + GPU_RUN), Path(root) / name / "config.yaml")
    it = _batches(cfg, 2, 4)
    return {"continued": [step(it)["loss"] for _ in range(2)]}


def resume_worker(root: str) -> dict:
    """Each checkpoint resumed into local layers and into (fake) TE layers, 2 more steps each."""
    import warnings

    warnings.filterwarnings("ignore")
    from tulip_mega.training.checkpoint import load_checkpoint, model_shape

    out = {}
    for ckpt in ("local", "te"):
        for layers in ("local", "te"):
            cfg, model, opt, sch, step = build_train_step(LAYOUT + EXTRA)
            with fake_te(model[0].module) if layers == "te" else contextlib.nullcontext():
                restored = load_checkpoint(Path(root) / ckpt / STEP, model, opt, sch, None, model_shape(cfg))
                modules = _te_modules(model[0].module) if layers == "te" else []
                got = {n: _received(m) for n, m in modules}
                it = _batches(cfg, 2, 4)
                losses = [step(it)["loss"] for _ in range(2)]
            out[f"{ckpt}->{layers}"] = {"step": restored["step"], "losses": losses, "extra_state_carried": got,
                                        "te_modules": len(modules)}
    return out


def eval_worker(root: str) -> dict:
    """`tulip-mega eval`'s config and weight loading (single process) for both checkpoints."""
    import warnings

    warnings.filterwarnings("ignore")
    from tulip_mega.evaluate import eval_config, load_weights
    from tulip_mega.launch import resolve_layout
    from tulip_mega.models.build import build_model_chunks
    from tulip_mega.models.specs import check_layer_support
    from tulip_mega.parallel.init import check_runtime_support, init_parallel
    from tulip_mega.training.checkpoint import model_shape

    out = {}
    for name in ("local", "te"):
        checkpoint = Path(root) / name / STEP
        cfg = eval_config(checkpoint, "retrieval", str(root))
        check_runtime_support(cfg)
        check_layer_support(cfg.model, cfg.precision)
        if name == "local":
            init_parallel(1, 1, cfg.run.seed)
        model, = build_model_chunks(cfg, resolve_layout(cfg, torch.distributed.get_world_size()))
        load_weights(checkpoint, [model], model_shape(cfg))
        g = torch.Generator().manual_seed(5)
        images = torch.randn(6, 3, cfg.model.vision.image_size, cfg.model.vision.image_size, generator=g)
        tokens = torch.randint(3, 200, (6, cfg.model.text.context_length), generator=g)
        tokens[:3, 20:] = 0  # padded captions of mixed length
        model.eval()
        with torch.no_grad():
            emb = model(images, tokens)
        out[name] = {"image_emb": emb.image_emb, "text_emb": emb.text_emb,
                     "config": (cfg.parallel.distributed_optimizer, cfg.precision.fp8, cfg.model.transformer_impl)}
    return out


def metadata_worker(*checkpoints: str) -> list[dict]:
    """Per checkpoint: its tensors (full) and the keys of its sharded objects."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    out = []
    for c in checkpoints:
        meta = load_sharded_metadata(c)
        shards = sorted(k for k, v in meta.items() if v.key.endswith("_extra_state"))
        tensors = {k: v for k, v in dist_checkpointing.load_plain_tensors(c).items() if torch.is_tensor(v)}
        out.append({"tensors": tensors, "extra_state_shards": shards})
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("te_ckpt")
    written = run_distributed(write_worker, 2, str(root))
    return {"root": root, "continued": written[-1]["continued"]}  # the last PP stage reports the loss


@pytest.mark.multiprocess
@pytest.mark.slow
def test_te_checkpoint_is_stored_as_te_layers_store_it(runs):
    local, te = run_distributed(metadata_worker, 1, str(runs["root"] / "local" / STEP),
                                str(runs["root"] / "te" / STEP))[0]
    layer_norm = "vision_block.layers.self_attention.linear_qkv.layer_norm_weight"
    assert layer_norm in te["tensors"] and "vision_block.layers.input_layernorm.weight" not in te["tensors"]
    assert f"optimizer.state.exp_avg.{layer_norm}" in te["tensors"]
    assert "text_block.layers.mlp.linear_fc1.layer_norm_bias" in te["tensors"]
    # One ShardedObject per layer and TE module (2 layers per tower), one per final norm; local
    # linears store (empty) ones too, local norms none.
    assert "vision_block.layers.mlp.linear_fc2._extra_state/shard_1_2" in local["extra_state_shards"]
    assert set(te["extra_state_shards"]) - set(local["extra_state_shards"]) == {
        f"{tower}_block.final_layernorm._extra_state/shard_0_1" for tower in ("vision", "text")}
    assert "vision_block.layers.mlp.linear_fc2._extra_state/shard_1_2" in te["extra_state_shards"]
    assert "text_block.final_layernorm._extra_state/shard_0_1" in te["extra_state_shards"]
    assert len([s for s in te["extra_state_shards"] if "vision_block.layers." in s]) == 4 * 2
    # The same values under the other names.
    from tulip_mega.models.te_names import canonical_key

    assert {canonical_key(k) for k in te["tensors"]} == set(local["tensors"])
    for k, v in te["tensors"].items():
        assert torch.equal(v, local["tensors"][canonical_key(k)]), k


@pytest.mark.multiprocess
@pytest.mark.slow
def test_te_checkpoint_resumes_into_local_and_te_layers(runs):
    out = run_distributed(resume_worker, 2, str(runs["root"]))[-1]
    reference = out["local->local"]
    assert reference["step"] == 2 and reference["losses"] == runs["continued"]
    for name in ("te->local", "te->te", "local->te"):
        assert out[name]["step"] == 2
        assert out[name]["losses"] == reference["losses"], name  # exact
    carried = out["te->te"]["extra_state_carried"]
    assert len(carried) == out["te->te"]["te_modules"] >= 2 * 4 + 2  # last stage: a layer per tower, final norms
    assert set(carried.values()) == {"saved"}, carried
    # From a local checkpoint: linears read the local layers' empty state (TE ignores None),
    # final norms, which have none there, keep their own.
    local = out["local->te"]["extra_state_carried"]
    assert {n: k for n, k in local.items() if n.endswith("final_layernorm")} == {
        n: "own" for n in local if n.endswith("final_layernorm")}
    assert {k for n, k in local.items() if not n.endswith("final_layernorm")} == {"none"}


@pytest.mark.multiprocess
@pytest.mark.slow
def test_te_checkpoint_evaluates_on_cpu(runs):
    out = run_distributed(eval_worker, 1, str(runs["root"]))[0]
    assert out["te"]["config"] == (False, None, "local")  # a GPU run's recipe, read on CPU
    for key in ("image_emb", "text_emb"):
        assert torch.equal(out["te"][key], out["local"][key]), key


@pytest.mark.multiprocess
@pytest.mark.slow
def test_te_checkpoint_reshards_on_cpu(runs, capsys):
    from tulip_mega.training.reshard import main

    root = runs["root"]
    for name in ("local", "te"):
        assert main(str(root / name / STEP), 2, 1, str(root / f"{name}_tp2")) == 0
    printed = capsys.readouterr().out
    assert "parallel.distributed_optimizer=false model.transformer_impl=local precision.fp8=null" in printed
    original, local, te = run_distributed(metadata_worker, 1, str(root / "local" / STEP),
                                          str(root / "local_tp2" / "step_0000002"),
                                          str(root / "te_tp2" / "step_0000002"))[0]
    assert set(te["tensors"]) == set(local["tensors"]) == set(original["tensors"])
    assert any(k.startswith("optimizer.state.exp_avg.") for k in te["tensors"])
    for k, v in local["tensors"].items():
        assert torch.equal(te["tensors"][k], v) and torch.equal(original["tensors"][k], v), k


def distopt_worker(path: str) -> None:
    from megatron.core import dist_checkpointing

    from tulip_mega.parallel import cpu_compat

    cpu_compat.apply()
    dist_checkpointing.save({"model_config": {}, "optimizer": {"param_state_sharding_type": "fully_sharded_model_space"}},
                            path)


@pytest.mark.multiprocess
def test_reshard_refuses_distributed_optimizer_state_without_cuda(tmp_path):
    from tulip_mega.convert.common import ConversionError
    from tulip_mega.training.reshard import reshard

    (tmp_path / "ckpt").mkdir()
    run_distributed(distopt_worker, 1, str(tmp_path / "ckpt"))
    with pytest.raises(ConversionError, match=r"written by megatron's DistributedOptimizer "
                                              r"\(fully_sharded_model_space\), which runs only with CUDA"):
        reshard(tmp_path / "ckpt", 1, 1, tmp_path / "out")
