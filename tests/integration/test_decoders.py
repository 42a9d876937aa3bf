"""Multi-resolution / MAE patch embedding, the reconstruction decoders and their layouts.

PatchEmbedding is checked in-process against independent re-implementations (the fixed-size
forward it replaced, torch's F.interpolate, plain indexing). The decoders need megatron's
process groups: one 2-rank gloo job (module fixture) builds them under TP=1, TP=2, TP=2 with
sequence parallel and PP=2 from the same layout-invariant init and reports outputs, full
gradients and checkpoint layouts, which the tests below compare.
Tolerances (float32): outputs and gradients max |x - x_ref| <= 1e-5 * max |x_ref|.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from harness import make_cfg
from tulip_mega.launch import resolve_layout
from tulip_mega.models.decoders import AugProjector
from tulip_mega.models.vision import PatchEmbedding
from tulip_mega.parallel.spawn import run_distributed

RTOL = 1e-5
SEED, STD = 1234, 0.05
B = 3  # micro batch of the decoder tests


# --------------------------------------------------------------------------------------------
# PatchEmbedding (in-process)
# --------------------------------------------------------------------------------------------
def _patch_embedding(image_size: int = 32, patch: int = 8, hidden: int = 16, **parallel) -> PatchEmbedding:
    config = TransformerConfig(num_layers=1, hidden_size=hidden, num_attention_heads=2, **parallel)
    emb = PatchEmbedding(config, image_size, patch)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in emb.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return emb


def _reference_tokens(emb: PatchEmbedding, images: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """conv patchify + position embedding, written out independently: [s, b, h]."""
    w, b = emb.patch_embedding.weight, emb.patch_embedding.bias
    x = F.conv2d(images, w, b, stride=emb.patch_size)  # [b, h, g, g]
    return x.flatten(2).permute(2, 0, 1) + pos.unsqueeze(1)


def test_native_size_is_bit_identical_to_fixed_size_embedding():
    emb = _patch_embedding()
    images = torch.randn(2, 3, 32, 32)
    # The forward before multi-resolution support, verbatim.
    old = emb.patch_embedding(images).flatten(2).permute(2, 0, 1) + emb.position_embedding.unsqueeze(1)
    out = emb(images)
    assert out.shape == (16, 2, 16)
    assert torch.equal(out, old.contiguous())


@pytest.mark.parametrize("size", [16, 48])  # 2x2 (down-sampled) and 6x6 (up-sampled) grids
def test_other_sizes_use_bicubic_resized_positions_with_gradient(size):
    emb = _patch_embedding()
    images = torch.randn(2, 3, size, size)
    grid, h = size // 8, 16
    pos = emb.position_embedding.detach().clone().requires_grad_(True)
    grid_pos = pos.view(1, 4, 4, h).permute(0, 3, 1, 2)  # [1, h, 4, 4] row-major patches
    resized = F.interpolate(grid_pos, size=(grid, grid), mode="bicubic", align_corners=False)
    ref = _reference_tokens(emb, images, resized.permute(0, 2, 3, 1).reshape(grid * grid, h))
    out = emb(images)
    assert out.shape == (grid * grid, 2, h)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    # Gradients flow into the learned (native-grid) position embedding, and are the ones of
    # the interpolation itself.
    weights = torch.randn_like(ref)
    (out * weights).sum().backward()
    (ref * weights).sum().backward()
    assert emb.position_embedding.grad is not None and emb.position_embedding.grad.abs().max() > 0
    torch.testing.assert_close(emb.position_embedding.grad, pos.grad, rtol=0, atol=1e-5)
    # Nothing was added to the module's state.
    assert set(dict(emb.named_parameters())) == {"patch_embedding.weight", "patch_embedding.bias",
                                                 "position_embedding"}
    assert set(emb.state_dict()) == {"patch_embedding.weight", "patch_embedding.bias", "position_embedding"}


def test_resized_positions_follow_parameter_updates():
    """The cache holds the resize operator, not the resized embedding: an update shows up."""
    emb = _patch_embedding()
    images = torch.randn(1, 3, 16, 16)
    first = emb(images)
    with torch.no_grad():
        emb.position_embedding.add_(1.0)
    second = emb(images)
    # Bicubic weights of each output position sum to 1, so +1 everywhere shifts every token by 1.
    torch.testing.assert_close(second - first, torch.ones_like(first), rtol=0, atol=1e-5)


def test_keep_idx_selects_those_tokens_per_sample():
    emb = _patch_embedding()
    images = torch.randn(3, 3, 32, 32)
    g = torch.Generator().manual_seed(1)
    keep = torch.stack([torch.randperm(16, generator=g)[:4].sort().values for _ in range(3)])  # [b, 4]
    full = emb(images)  # [16, b, h]
    out = emb(images, keep_idx=keep)
    assert out.shape == (4, 3, 16)
    for i in range(3):
        for j in range(4):
            assert torch.equal(out[j, i], full[keep[i, j], i])


@pytest.mark.parametrize("shape,match", [((1, 3, 32, 24), "square"), ((1, 3, 20, 20), "multiple"),
                                         ((1, 1, 32, 32), r"\[b, 3, H, W\]")])
def test_bad_image_shapes_raise(shape, match):
    with pytest.raises(ValueError, match=match):
        _patch_embedding()(torch.randn(shape))


def test_keep_idx_not_divisible_by_tp_under_sequence_parallel_raises():
    emb = _patch_embedding(tensor_model_parallel_size=2, sequence_parallel=True)
    keep = torch.tensor([[0, 1, 2]])
    with pytest.raises(ValueError, match="3 kept .* tensor_parallel=2"):
        emb(torch.randn(1, 3, 32, 32), keep_idx=keep)


def test_aug_projector_is_linear_gelu_linear():
    proj = AugProjector(8, 32)
    x = torch.randn(5, 8)
    ref = F.linear(F.gelu(F.linear(x, proj.fc1.weight, proj.fc1.bias)), proj.fc2.weight, proj.fc2.bias)
    torch.testing.assert_close(proj(x), ref)
    assert proj.fc1.weight.shape == (32, 8) and proj.fc2.weight.shape == (8, 32)


def test_decoder_config_has_decoder_sizes_tower_parallelism_and_one_stage():
    from tulip_mega.models.megatron_config import decoder_config, tower_config

    cfg = make_cfg(["parallel.tensor_parallel=2", "parallel.pipeline_parallel=2", "parallel.sequence_parallel=true",
                    "recompute.granularity=full", "model.mae_decoder.num_layers=3",
                    "model.mae_decoder.hidden_size=32", "model.mae_decoder.num_heads=2",
                    "model.mae_decoder.ffn_hidden_size=64"])
    layout = resolve_layout(cfg, 4)
    tower, mae, text = tower_config(cfg, "vision", layout=layout), decoder_config(cfg, "mae"), decoder_config(cfg, "text")
    assert (mae.num_layers, mae.hidden_size, mae.num_attention_heads, mae.ffn_hidden_size, mae.kv_channels) == \
        (3, 32, 2, 64, 16)
    # Unset decoder widths default to the decoded tower's.
    t = cfg.model.text
    assert (text.hidden_size, text.num_attention_heads, text.ffn_hidden_size) == \
        (t.hidden_size, t.num_heads, t.ffn_hidden_size)
    for dec in (mae, text):
        assert dec.pipeline_model_parallel_size == 1 and tower.pipeline_model_parallel_size == 2
        assert dec.recompute_granularity is None and tower.recompute_granularity == "full"
        for field in ("tensor_model_parallel_size", "sequence_parallel", "params_dtype", "bf16", "fp8",
                      "layernorm_epsilon", "add_bias_linear", "use_cpu_initialization", "perform_initialization"):
            assert getattr(dec, field) == getattr(tower, field), field
    with pytest.raises(ValueError, match="expected 'mae', 'text' or 'locca'"):
        decoder_config(cfg, "vision")


# --------------------------------------------------------------------------------------------
# Decoders under TP / SP / PP (one 2-rank job)
# --------------------------------------------------------------------------------------------
def _inputs(cfg) -> dict:
    """Deterministic decoder inputs, identical on every rank."""
    g = torch.Generator().manual_seed(7)
    P, hv = (cfg.model.vision.image_size // cfg.model.vision.patch_size) ** 2, cfg.model.vision.hidden_size
    k = P // 4
    order = torch.stack([torch.randperm(P, generator=g) for _ in range(B)])
    visible_idx, masked_idx = order[:, :k].sort(dim=1).values, order[:, k:].sort(dim=1).values
    L, V = cfg.model.text.context_length, cfg.model.text.vocab_size
    patch_dim = cfg.model.vision.patch_size ** 2 * 3
    return {
        "visible": torch.randn(k, B, hv, generator=g),
        "visible_idx": visible_idx,
        "masked_idx": masked_idx,
        "pixels": torch.randn(B, P - k, patch_dim, generator=g),
        "text_emb": torch.randn(B, cfg.model.vision.hidden_size, generator=g),
        "tokens": torch.randint(0, V, (B, L), generator=g),
    }


def _layout(module) -> list[tuple]:
    """(key, global shape, global offset, prepend axes) of every sharded tensor, sorted."""
    from megatron.core.dist_checkpointing.utils import extract_sharded_tensors

    from tulip_mega.models.init import _iter_sharded

    return sorted((sh.key, tuple(sh.global_shape), tuple(sh.global_offset), sh.prepend_axis_num)
                  for sh in _iter_sharded(extract_sharded_tensors(module.sharded_state_dict())[0]))


def _grad_entries(module, prefix: str) -> list[tuple]:
    """(name, offsets, full shape, local grad) for every parameter, located by its sharded
    state dict entry (layers stacked on a leading axis)."""
    from megatron.core.dist_checkpointing.utils import extract_sharded_tensors

    from tulip_mega.models.init import _iter_sharded

    params = {p.data_ptr(): p for p in module.parameters()}
    out = []
    for sh in _iter_sharded(extract_sharded_tensors(module.sharded_state_dict(prefix=prefix))[0]):
        p = params[sh.data.data_ptr()]
        k = sh.prepend_axis_num
        out.append((f"{sh.key}{list(sh.global_offset[:k]) if k else ''}", tuple(sh.global_offset[k:]),
                    tuple(sh.global_shape[k:]), p.grad.detach().clone().reshape(sh.local_shape)))
    return out


def _build_and_run(overrides: list[str], tp: int, pp: int) -> dict:
    """Initialise megatron's groups for (tp, pp), build both decoders on the last stage, run a
    forward + backward of a reconstruction loss and report everything the tests compare."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region
    from megatron.core.transformer.transformer_block import TransformerBlock

    from tulip_mega.models.decoders import CausalTextDecoder, MAEDecoder
    from tulip_mega.models.init import initialize_parameters
    from tulip_mega.models.megatron_config import decoder_config, tower_config
    from tulip_mega.models.specs import block_spec
    from tulip_mega.parallel.init import init_parallel

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    cfg = make_cfg(overrides)
    init_parallel(tp, pp, cfg.run.seed)
    v, t = cfg.model.vision, cfg.model.text
    out: dict = {"pp_rank": ps.get_pipeline_model_parallel_rank()}
    if pp > 1:
        # Control: a tower block under the same state really is split over the stages.
        config = tower_config(cfg, "vision", layout=resolve_layout(cfg, torch.distributed.get_world_size()))
        tower = TransformerBlock(config, block_spec(config), pre_process=False, post_process=ps.is_pipeline_last_stage())
        out["tower_layer_numbers"] = [layer.layer_number for layer in tower.layers]
    if not ps.is_pipeline_last_stage():
        return out
    mae = MAEDecoder(decoder_config(cfg, "mae"), v.hidden_size, (v.image_size // v.patch_size) ** 2, v.patch_size)
    text = CausalTextDecoder(decoder_config(cfg, "text"), v.hidden_size, t.vocab_size, t.context_length)
    for name, module in (("mae", mae), ("text", text)):
        initialize_parameters(module, SEED, STD, {"decoder": getattr(cfg.model, f"{name}_decoder").num_layers})
        out[f"{name}_layer_numbers"] = [layer.layer_number for layer in module.decoder.layers]
        out[f"{name}_layout"] = _layout(module)
    seq = {}  # tokens entering each decoder's first layer on this rank (shows the SP split)

    def record(name):
        def hook(_module, args, kwargs):
            seq.setdefault(name, (args[0] if args else kwargs["hidden_states"]).shape[0])
        return hook

    for name, module in (("mae", mae), ("text", text)):
        module.decoder.layers[0].register_forward_pre_hook(record(name), with_kwargs=True)
    x = _inputs(cfg)
    visible = x["visible"].clone().requires_grad_(True)
    text_emb = x["text_emb"].clone().requires_grad_(True)
    pred = mae(visible, x["visible_idx"], x["masked_idx"])  # [b, m, p*p*3]
    logits = text(text_emb, x["tokens"])  # [L, b, V/tp]
    full_logits = gather_from_tensor_model_parallel_region(logits).detach().clone()  # [L, b, V]
    # megatron's cross entropy works in place on the logits it is given (hence the clone above).
    loss = F.mse_loss(pred, x["pixels"]) + vocab_parallel_cross_entropy(logits, x["tokens"].t().contiguous()).mean()
    loss.backward()
    if cfg.parallel.sequence_parallel:
        # What megatron's finalize_model_grads does: LayerNorm weights saw a slice of the sequence.
        for p in list(mae.parameters()) + list(text.parameters()):
            if getattr(p, "sequence_parallel", False):
                torch.distributed.all_reduce(p.grad, group=ps.get_tensor_model_parallel_group())
    out.update(
        loss=loss.item(),
        logits_local_shape=tuple(logits.shape),
        pred=pred.detach(),
        logits=full_logits,
        layer_input_seq=seq,
        grads=_grad_entries(mae, "mae_decoder.") + _grad_entries(text, "text_decoder."),
        input_grads={"visible": visible.grad.clone(), "text_emb": text_emb.grad.clone()},
    )
    if tp == 1 and pp == 1:
        # Causality probe: change token j, recompute the logits.
        j = cfg.model.text.context_length // 2
        changed = x["tokens"].clone()
        changed[:, j] = (changed[:, j] + 1) % t.vocab_size
        with torch.no_grad():
            out["causal"] = {"j": j, "logits": text(text_emb, changed)}
    return out


def _decoder_job() -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    return {
        "tp1": _build_and_run([], 1, 1),
        "tp2": _build_and_run(["parallel.tensor_parallel=2"], 2, 1),
        "tp2_sp": _build_and_run(["parallel.tensor_parallel=2", "parallel.sequence_parallel=true"], 2, 1),
        "pp2": _build_and_run(["parallel.pipeline_parallel=2"], 1, 2),
    }


@pytest.fixture(scope="module")
def job() -> list[dict]:
    return run_distributed(_decoder_job, 2, timeout=300)


def _assemble(per_rank: list[list[tuple]]) -> dict[str, torch.Tensor]:
    """Full gradients from every rank's shards; replicated pieces must agree across ranks."""
    full: dict[str, torch.Tensor] = {}
    for entries in per_rank:
        for name, offsets, shape, local in entries:
            t = full.setdefault(name, torch.full(shape, float("nan")))
            region = tuple(slice(o, o + n) for o, n in zip(offsets, local.shape))
            seen = t[region]
            if not torch.isnan(seen).all():
                torch.testing.assert_close(local, seen, rtol=0, atol=1e-7, msg=f"{name} differs across ranks")
            t[region] = local
    for name, t in full.items():
        assert not torch.isnan(t).any(), f"{name} not fully covered by the shards"
    return full


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()




@pytest.mark.multiprocess
@pytest.mark.slow
def test_decoder_output_shapes(job):
    ref = job[0]["tp1"]
    cfg = make_cfg([])
    P = (cfg.model.vision.image_size // cfg.model.vision.patch_size) ** 2
    assert ref["pred"].shape == (B, P - P // 4, cfg.model.vision.patch_size ** 2 * 3)
    assert ref["logits"].shape == (cfg.model.text.context_length, B, cfg.model.text.vocab_size)
    assert job[0]["tp2"]["logits_local_shape"] == (cfg.model.text.context_length, B, cfg.model.text.vocab_size // 2)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_text_decoder_is_causal(job):
    ref = job[0]["tp1"]
    j, changed = ref["causal"]["j"], ref["causal"]["logits"]
    # Position i predicts token i from tokens < i: logits up to j cannot see token j ...
    assert torch.equal(changed[: j + 1], ref["logits"][: j + 1])
    # ... and every later position does.
    diff = (changed[j + 1 :] - ref["logits"][j + 1 :]).abs().amax(dim=(1, 2))
    assert (diff > 1e-6).all(), diff


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2", "tp2_sp"])
def test_tensor_parallel_matches_single_rank(job, layout):
    ref, out = job[0]["tp1"], [r[layout] for r in job]
    for r in out:
        assert r["loss"] == pytest.approx(ref["loss"], rel=1e-6)
        assert _rel_err(r["pred"], ref["pred"]) <= RTOL
        assert _rel_err(r["logits"], ref["logits"]) <= RTOL
        for name in ("visible", "text_emb"):
            assert _rel_err(r["input_grads"][name], ref["input_grads"][name]) <= RTOL, name
    # Under sequence parallel each rank's decoder layers really saw half of the sequence.
    cfg = make_cfg([])
    split = 2 if layout == "tp2_sp" else 1
    P, L = (cfg.model.vision.image_size // cfg.model.vision.patch_size) ** 2, cfg.model.text.context_length
    assert out[0]["layer_input_seq"] == {"mae": P // split, "text": L // split}
    R = _assemble([ref["grads"]])
    G = _assemble([r["grads"] for r in out])
    assert set(G) == set(R)
    bad = {k: _rel_err(G[k], R[k]) for k in R if _rel_err(G[k], R[k]) > RTOL}
    assert not bad, f"gradients differ from TP=1: {bad}"
    # Every parameter got a gradient (a vanished one would only agree with itself).
    assert all(R[k].abs().max() > 0 for k in R)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_decoders_live_whole_on_the_last_pipeline_stage(job):
    first, last = job[0]["pp2"], job[1]["pp2"]
    assert (first["pp_rank"], last["pp_rank"]) == (0, 1)
    cfg = make_cfg([])
    # The control tower block is split: one of its two layers per stage.
    assert first["tower_layer_numbers"] == [1] and last["tower_layer_numbers"] == [2]
    n = cfg.model.mae_decoder.num_layers
    assert last["mae_layer_numbers"] == list(range(1, n + 1))
    assert last["text_layer_numbers"] == list(range(1, cfg.model.text_decoder.num_layers + 1))
    # Checkpoint keys, shapes and layer offsets are those of the single-stage model.
    ref = job[0]["tp1"]
    assert last["mae_layout"] == ref["mae_layout"]
    assert last["text_layout"] == ref["text_layout"]
    assert any(key.startswith("decoder.layers.") for key, *_ in ref["mae_layout"])
