"""SDPACoreAttention (tulip_mega/models/attention.py) against megatron's DotProductAttention.

In-process tests check the module against a softmax written out in the test and its error
paths (a one-rank stand-in TP group is enough: the module only asks the group's size). The
comparisons with megatron's DotProductAttention need megatron's parallel state (its global
memory buffer, its RNG tracker), so one 1-rank gloo job (module fixture) runs them all and
returns the tensors; the tests below compare them.
Tolerances (float32): max |x - x_ref| <= 1e-5 (core attention), <= 1e-5 * max |x_ref| (block).
"""

from __future__ import annotations

import math
import types

import pytest
import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from tulip_mega.models.attention import SDPACoreAttention
from tulip_mega.parallel.spawn import run_distributed

ATOL = 1e-5
SEED = 1234
S, B, HEADS, HN = 12, 3, 4, 8  # core-attention test shapes: [s, b, np, hn]

# name -> (num_query_groups, mask type, layer_number, softmax_scale, apply_query_key_layer_scaling)
CASES = {
    "no_mask": (HEADS, AttnMaskType.no_mask, 1, None, False),
    "causal": (HEADS, AttnMaskType.causal, 1, None, False),
    "gqa_causal": (2, AttnMaskType.causal, 1, None, False),
    "scale_and_layer_scaling": (HEADS, AttnMaskType.no_mask, 3, 0.3, True),
}


def _config(groups: int = HEADS, dropout: float = 0.0, layer_scaling: bool = False) -> TransformerConfig:
    return TransformerConfig(
        num_layers=1, hidden_size=HEADS * HN, num_attention_heads=HEADS, num_query_groups=groups,
        kv_channels=HN, attention_dropout=dropout, apply_query_key_layer_scaling=layer_scaling,
        attention_softmax_in_fp32=True, masked_softmax_fusion=False,
    )


def _qkv(groups: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(S, B, HEADS, HN, generator=g)
    k, v = (torch.randn(S, B, groups, HN, generator=g) for _ in range(2))
    return q, k, v


def _fwd_bwd(module, q, k, v, mask_type) -> tuple[torch.Tensor, ...]:
    """(output, dq, dk, dv) for a fixed random output weighting."""
    q, k, v = (t.clone().requires_grad_(True) for t in (q, k, v))
    out = module(q, k, v, None, attn_mask_type=mask_type)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(99))
    (out * w).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


# --------------------------------------------------------------------------------------------
# In-process: explicit reference and error paths
# --------------------------------------------------------------------------------------------
class _OneRank:
    def size(self) -> int:
        return 1


def _module(config: TransformerConfig, mask_type=AttnMaskType.no_mask, **kw) -> SDPACoreAttention:
    return SDPACoreAttention(config=config, layer_number=1, attn_mask_type=mask_type, attention_type="self",
                             pg_collection=types.SimpleNamespace(tp=_OneRank()), **kw)


def _explicit_attention(q, k, v, causal: bool, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale [+ causal -inf]) v per head, written out; GQA by repeating groups."""
    rep = q.size(2) // k.size(2)
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("sbnd,tbnd->bnst", q, k) * scale  # [b, n, sq, sk]
    if causal:
        s = q.size(0)
        scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    ctx = torch.einsum("bnst,tbnd->sbnd", scores.softmax(-1), v)  # [sq, b, n, hn]
    return ctx.reshape(q.size(0), q.size(1), -1)


@pytest.mark.parametrize("groups,causal", [(HEADS, False), (HEADS, True), (1, True), (2, False)])
def test_matches_explicit_softmax_attention(groups, causal):
    q, k, v = _qkv(groups)
    mask = AttnMaskType.causal if causal else AttnMaskType.no_mask
    out = _module(_config(groups), mask)(q, k, v, None)  # mask type from the constructor
    assert out.shape == (S, B, HEADS * HN)
    torch.testing.assert_close(out, _explicit_attention(q, k, v, causal, 1 / math.sqrt(HN)), rtol=0, atol=ATOL)


def test_forward_mask_type_overrides_constructor():
    q, k, v = _qkv(HEADS)
    module = _module(_config(), AttnMaskType.no_mask)
    out = module(q, k, v, None, attn_mask_type=AttnMaskType.causal)
    torch.testing.assert_close(out, _explicit_attention(q, k, v, True, 1 / math.sqrt(HN)), rtol=0, atol=ATOL)


def test_unsupported_inputs_raise():
    q, k, v = _qkv(HEADS)
    module = _module(_config())
    with pytest.raises(NotImplementedError, match="attention_mask"):
        module(q, k, v, torch.zeros(B, 1, S, S, dtype=torch.bool))
    with pytest.raises(NotImplementedError, match="attention_bias"):
        module(q, k, v, None, attention_bias=torch.zeros(1, HEADS, S, S))
    with pytest.raises(NotImplementedError, match="packed"):
        module(q, k, v, None, packed_seq_params=object())
    with pytest.raises(NotImplementedError, match="padding"):
        module(q, k, v, None, attn_mask_type=AttnMaskType.padding)
    with pytest.raises(NotImplementedError, match="padding"):
        _module(_config(), AttnMaskType.padding)
    with pytest.raises(NotImplementedError, match="sliding-window"):
        _module(TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, window_size=(4, 0)))
    with pytest.raises(ValueError, match="sq=2, sk=12"):
        _module(_config(), AttnMaskType.causal)(q[:2], k, v, None)


# --------------------------------------------------------------------------------------------
# Against megatron's DotProductAttention (one 1-rank gloo job)
# --------------------------------------------------------------------------------------------
def _block(config, causal: bool, core_attention):
    """A TransformerBlock of the local spec, with its core attention swapped for `core_attention`."""
    from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules

    from tulip_mega.models.specs import SequenceParallelLayerNorm, local_layer_spec

    layer = local_layer_spec(causal)  # a fresh spec object per call: safe to edit
    assert layer.submodules.self_attention.submodules.core_attention is SDPACoreAttention
    layer.submodules.self_attention.submodules.core_attention = core_attention
    spec = TransformerBlockSubmodules(layer_specs=[layer] * config.num_layers, layer_norm=SequenceParallelLayerNorm)
    return TransformerBlock(config, spec, pre_process=True, post_process=True)


def _run_block(block, x: torch.Tensor, w: torch.Tensor, train: bool) -> dict[str, torch.Tensor]:
    block.train(train)
    block.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out = block(x, attention_mask=None)
    (out * w).sum().backward()
    grads = {f"grad.{n}": p.grad.detach().clone() for n, p in block.named_parameters()}
    return {"out": out.detach(), "grad.input": x.grad, **grads}


def _reference_job() -> dict:
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from harness import make_cfg
    from tulip_mega.models.megatron_config import tower_config
    from tulip_mega.parallel.init import init_parallel

    init_parallel(1, 1, SEED)
    res: dict = {}

    # (1) core attention alone, every case, both modules.
    for name, (groups, mask, layer, scale, layer_scaling) in CASES.items():
        config = _config(groups, layer_scaling=layer_scaling)
        kw = dict(config=config, layer_number=layer, attn_mask_type=mask, attention_type="self", softmax_scale=scale)
        q, k, v = _qkv(groups, seed=len(res))
        res[name] = {"dpa": _fwd_bwd(DotProductAttention(**kw), q, k, v, mask),
                     "sdpa": _fwd_bwd(SDPACoreAttention(**kw), q, k, v, mask)}

    # Dropout: drawn from megatron's model-parallel RNG tracker, off in eval mode.
    module = SDPACoreAttention(config=_config(dropout=0.5), layer_number=1, attn_mask_type=AttnMaskType.no_mask,
                               attention_type="self")
    q, k, v = _qkv(HEADS)
    module.eval()
    res["dropout_eval"] = module(q, k, v, None)
    module.train()
    default_state = torch.get_rng_state()
    train_outs = []
    for _ in range(2):
        model_parallel_cuda_manual_seed(SEED)
        train_outs.append(module(q, k, v, None))
    res["dropout_train"] = train_outs
    res["dropout_default_rng_untouched"] = torch.equal(default_state, torch.get_rng_state())

    # (2) whole blocks (the text tower's config), SDPA spec vs DotProductAttention, same weights.
    for causal in (False, True):
        for granularity in (None, "selective"):
            extra = [f"recompute.granularity={granularity}"] if granularity else []
            config = tower_config(make_cfg(extra), "text")
            sdpa = _block(config, causal, SDPACoreAttention)
            g = torch.Generator().manual_seed(SEED)
            with torch.no_grad():
                for p in sdpa.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            dpa = _block(config, causal, DotProductAttention)
            dpa.load_state_dict(sdpa.state_dict(), strict=True)
            x = torch.randn(16, B, config.hidden_size, generator=g)
            w = torch.randn(16, B, config.hidden_size, generator=g)
            calls = []
            hook = sdpa.layers[0].self_attention.core_attention.register_forward_hook(lambda *a: calls.append(1))
            key = f"block_causal{int(causal)}_{granularity}"
            res[key] = {"sdpa": _run_block(sdpa, x, w, train=True), "dpa": _run_block(dpa, x, w, train=True),
                        "core_attention_calls": len(calls),
                        "checkpoint_core_attention": sdpa.layers[0].self_attention.checkpoint_core_attention}
            hook.remove()
    return res


@pytest.fixture(scope="module")
def reference() -> dict:
    return run_distributed(_reference_job, 1, timeout=300)[0]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("case", list(CASES))
def test_core_attention_matches_dot_product_attention(reference, case):
    names = ("output", "dq", "dk", "dv")
    dpa, sdpa = reference[case]["dpa"], reference[case]["sdpa"]
    for name, ref, got in zip(names, dpa, sdpa):
        assert got.shape == ref.shape, name
        assert ref.abs().max() > 0.01, f"{case}: {name} of the reference is ~0; the comparison is void"
        assert _max_diff(got, ref) <= ATOL, f"{case}: {name} max |diff| = {_max_diff(got, ref):.3g}"


def test_dropout_uses_tracker_and_is_off_in_eval(reference):
    ref = reference["no_mask"]["sdpa"][0]  # same q/k/v (seed 0), no dropout
    torch.testing.assert_close(reference["dropout_eval"], ref, rtol=0, atol=ATOL)
    first, second = reference["dropout_train"]
    assert _max_diff(first, ref) > 0.1  # dropout acted
    torch.testing.assert_close(first, second, rtol=0, atol=0)  # reproducible from the tracker seed
    assert reference["dropout_default_rng_untouched"]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("granularity", [None, "selective"])
def test_block_with_sdpa_spec_matches_dot_product_attention(reference, causal, granularity):
    r = reference[f"block_causal{int(causal)}_{granularity}"]
    sdpa, dpa = r["sdpa"], r["dpa"]
    assert set(sdpa) == set(dpa) and len(sdpa) > 10
    for name, ref in dpa.items():
        assert ref.abs().max() > 0, f"{name} of the reference is 0"
        err = _max_diff(sdpa[name], ref)
        assert err <= ATOL * ref.abs().max().item(), f"{name}: max |diff| = {err:.3g}"
    # Selective recompute wraps core attention in a checkpoint: run again in the backward.
    assert r["checkpoint_core_attention"] == (granularity == "selective")
    assert r["core_attention_calls"] == (2 if granularity == "selective" else 1)


def test_selective_recompute_gives_the_same_gradients(reference):
    for causal in (0, 1):
        plain, recomputed = (reference[f"block_causal{causal}_{g}"]["sdpa"] for g in (None, "selective"))
        for name, ref in plain.items():
            torch.testing.assert_close(recomputed[name], ref, rtol=0, atol=0)
