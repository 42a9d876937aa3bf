"""FP8 eligibility (config/fp8_shapes.py) and the GPU switches (models/megatron_config.py).

Transformer Engine cannot be imported here, so the GEMM shapes are built from the recipes and
checked against an independent copy of TE's rule: `assert_dim_for_fp8_exec` (rows % 8, cols %
16) on every tensor TE asserts on, the module input before the sequence-parallel all-gather
and the weight in the forward (TE 1.5 - main), and both operands of the forward, dgrad and
wgrad GEMMs (TE 1.x `fp8_gemm`). CUDA, TE and apex are monkeypatched for the switches.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tulip_mega.config import ConfigError, load_config
from tulip_mega.config.streams import input_streams, model_heads
from tulip_mega.models import megatron_config as mc
from tulip_mega.config.fp8_shapes import fp8_plan
from tulip_mega.launch import resolve_layout
from tulip_mega.plan import main as plan_main

REPO = Path(__file__).resolve().parents[2]
FP8_RECIPES = sorted(p.name for p in (REPO / "recipes").glob("*.yaml")
                     if load_config(p).precision.fp8 is not None)


def _te_asserts(rows: int, cols: int) -> bool:
    """TE's `assert_dim_for_fp8_exec` on one 2-D tensor."""
    return rows % 8 == 0 and cols % 16 == 0


def _te_tensors(tokens: int, local: int, k: int, n: int) -> list[tuple[str, int, int]]:
    """Every 2-D tensor TE checks for one FP8 linear of input width k, output width n."""
    return [("input (local)", local, k), ("weight", n, k),  # module forward, every TE version
            ("fprop input", tokens, k), ("dgrad weight^T", k, n), ("dgrad grad", tokens, n),
            ("wgrad input^T", k, tokens), ("wgrad grad^T", n, tokens)]  # TE 1.x fp8_gemm


def _block_shapes(cfg) -> dict[str, list]:
    """{block: [(layer, tokens, local, k, n)]}: every TE linear of every block per rank, for
    every tower call the recipe makes (built here from the sizes, not by fp8_shapes)."""
    tp, sp, mb = cfg.parallel.tensor_parallel, cfg.parallel.sequence_parallel, cfg.train.micro_batch_size
    streams, m = input_streams(cfg), cfg.model
    rows = {"vision": [s.seq * s.views * mb for s in streams.vision],
            "text": [m.text.context_length * streams.texts * mb]}
    if cfg.eval.zeroshot_shards or cfg.eval.retrieval_shards or cfg.eval.linear_probe_shards:
        eb = cfg.eval.batch_size or mb
        rows["vision"].append(m.vision.seq_length * eb)
        rows["text"].append(m.text.context_length * eb)
    heads = model_heads(cfg)
    if heads.mae_decoder:
        rows["mae_decoder"] = [streams.patches * mb]
    if heads.text_decoder:
        rows["text_decoder"] = [m.text.context_length * mb]
    if heads.locca_decoder:  # 3 sequences per sample of context + 4 positions (rounded to TP under SP)
        length = -(-(m.text.context_length + 4) // (tp if sp else 1)) * (tp if sp else 1)
        rows["locca_decoder"] = [length * 3 * mb]
    sizes = {"vision": m.vision, "text": m.text, "mae_decoder": m.mae_decoder, "text_decoder": m.text_decoder,
             "locca_decoder": m.locca_decoder}
    out = {}
    for block, counts in rows.items():
        h, f = sizes[block].hidden_size, sizes[block].ffn_hidden_size
        linears = [("linear_qkv", True, h, 3 * h // tp), ("linear_proj", False, h // tp, h),
                   ("linear_fc1", True, h, f // tp), ("linear_fc2", False, f // tp, h)]
        out[block] = [(name, t, t // tp if (sp and column) else t, k, n)
                      for t in counts for name, column, k, n in linears]
    return out


def _te_failures(shapes: list) -> list[str]:
    return [f"{layer} {what} [{r}, {c}]" for layer, t, local, k, n in shapes
            for what, r, c in _te_tensors(t, local, k, n) if not _te_asserts(r, c)]


@pytest.mark.parametrize("recipe", FP8_RECIPES)
def test_every_fp8_gemm_of_every_shipped_recipe_passes_te_rule(recipe):
    cfg = load_config(REPO / "recipes" / recipe)
    plan = fp8_plan(cfg)
    shapes = _block_shapes(cfg)
    assert {b.name for b in plan.blocks if b.built} == set(shapes)
    for block, gemms in shapes.items():
        failures = _te_failures(gemms)
        if plan.runs_fp8(block):
            assert not failures, (recipe, block, failures)
        else:  # a block falls back to bf16 only when TE would reject one of its weights
            assert any("weight" in f for f in failures), (recipe, block, failures)
    assert any(plan.runs_fp8(b.name) for b in plan.blocks), recipe


@pytest.mark.parametrize("recipe,bf16", [
    ("tulip_1b.yaml", {"text", "text_decoder"}),
    ("tulip_so400m.yaml", {"vision", "text", "text_decoder"}),
    ("tulip_b16.yaml", set()),
    ("tulip_6b.yaml", set()),
])
def test_4304_wide_mlps_at_tp2_fall_back_to_bf16(recipe, bf16):
    cfg = load_config(REPO / "recipes" / recipe)
    plan = fp8_plan(cfg)
    assert {b.name for b in plan.blocks if not plan.runs_fp8(b.name)} == bf16
    if bf16:
        line = plan.startup_line()
        assert "bf16 in" in line and "linear_fc1 output / linear_fc2 input width 2152" in line
        assert "model.text.ffn_hidden_size 4304 / TP 2" in line
        assert cfg.parallel.tensor_parallel == 2 and 4304 // 2 % 16 == 8
    # At TP 1 the same widths run FP8.
    tp1 = fp8_plan(load_config(REPO / "recipes" / recipe, ["parallel.tensor_parallel=1",
                                                          "parallel.sequence_parallel=false"]))
    assert all(tp1.runs_fp8(b.name) for b in tp1.blocks)


def test_ineligible_width_can_be_refused_instead():
    with pytest.raises(ConfigError) as e:
        load_config(REPO / "recipes" / "tulip_1b.yaml", ["precision.fp8_ineligible=error"])
    msg = str(e.value)
    assert "text tower cannot run FP8" in msg and "linear_fc1 output / linear_fc2 input width 2152" in msg
    assert "precision.fp8_ineligible=bf16" in msg
    # Without FP8 nothing is checked.
    load_config(REPO / "recipes" / "tulip_1b.yaml", ["precision.fp8_ineligible=error", "precision.fp8=null"])


def test_token_count_te_cannot_run_is_refused_naming_the_key():
    # b16 at micro-batch 1: the MAE stream encodes 49 visible patches per image.
    overrides = ["train.micro_batch_size=1"]
    with pytest.raises(ConfigError) as e:
        load_config(REPO / "recipes" / "tulip_b16.yaml", overrides)
    msg = str(e.value)
    assert msg.startswith("precision.fp8=hybrid: the vision tower's FP8 GEMMs (linear_qkv, linear_proj, "
                          "linear_fc1, linear_fc2) would run over"), msg
    assert "train.micro_batch_size=1" in msg and "multiple of 16" in msg and "precision.fp8=null" in msg
    need = int(msg.split("set train.micro_batch_size to a multiple of ")[1].split(",")[0])
    cfg = load_config(REPO / "recipes" / "tulip_b16.yaml", [f"train.micro_batch_size={need}",
                                                            f"train.global_batch_size={need * 64}"])
    assert not _te_failures([g for block in _block_shapes(cfg).values() for g in block])
    # The same layout is fine in bf16.
    load_config(REPO / "recipes" / "tulip_b16.yaml", overrides + ["precision.fp8=null"])


def test_sequence_parallel_local_rows_are_checked():
    # TP 4 + SP, text context 24: a micro-batch of 2 gathers 48 rows (a multiple of 16) but
    # TE's module check sees 12 per rank (not a multiple of 8): it takes a multiple of 4.
    base = ["model.size=debug", "model.vision.image_size=64", "parallel.tensor_parallel=4",
            "parallel.sequence_parallel=true", "model.text.context_length=24", "precision.fp8=e4m3",
            "train.global_batch_size=8", "model.vision.ffn_hidden_size=512", "model.text.ffn_hidden_size=512"]
    with pytest.raises(ConfigError, match=r"text tower's FP8 GEMMs .* 48 tokens .* 12 on each rank before the "
                                          r"sequence-parallel all-gather .* a multiple of 4"):
        load_config(None, base + ["train.micro_batch_size=2"])
    cfg = load_config(None, base + ["train.micro_batch_size=4"])
    assert fp8_plan(cfg).runs_fp8("text")


def test_plan_validates_with_fp8_and_prints_the_fp8_gemms(capsys):
    assert plan_main([str(REPO / "recipes" / "tulip_1b.yaml"), "--nodes", "64"]) == 0
    out = capsys.readouterr().out
    assert "FP8 GEMMs (precision.fp8=hybrid" in out
    table = {line.split()[0] + " " + line.split()[1]: line.split()[2] for line in out.splitlines()
             if line.startswith("  ") and line.split()[:1] and line.split()[2:3] in (["FP8"], ["bf16"])}
    assert table == {"vision tower": "FP8", "text tower": "bf16", "MAE decoder": "FP8", "caption decoder": "bf16"}
    assert "qkv 1536->2304  proj 768->1536  fc1 1536->3072  fc2 3072->1536" in out
    assert "^ linear_fc1 output / linear_fc2 input width 2152 = model.text.ffn_hidden_size 4304 / TP 2" in out

    rc = plan_main([str(REPO / "recipes" / "tulip_b16.yaml"), "--nodes", "4", "train.micro_batch_size=1",
                    "train.global_batch_size=32"])
    err = capsys.readouterr().err
    assert rc == 2 and "plan refused" in err and "vision tower's FP8 GEMMs" in err and "49 MAE visible" in err
    # A width TE cannot run: bf16 fallback above, or refused on request, naming layer and width.
    rc = plan_main([str(REPO / "recipes" / "tulip_so400m.yaml"), "--nodes", "16", "precision.fp8_ineligible=error"])
    err = capsys.readouterr().err
    assert rc == 2 and "the vision tower cannot run FP8: linear_fc1 output / linear_fc2 input width 2152" in err


def test_tower_and_decoder_configs_follow_the_fp8_plan():
    cfg = load_config(REPO / "recipes" / "tulip_1b.yaml")
    choices = mc.layer_choices(cfg, use_te=False)
    assert mc.tower_config(cfg, "vision", choices).fp8 == "hybrid"
    assert mc.tower_config(cfg, "text", choices).fp8 is None
    assert mc.decoder_config(cfg, "mae", choices).fp8 == "hybrid"
    assert mc.decoder_config(cfg, "text", choices).fp8 is None
    assert mc.tower_config(cfg, "text").fp8 is None  # choices computed when not given
    off = load_config(REPO / "recipes" / "tulip_1b.yaml", ["precision.fp8=null"])
    assert mc.tower_config(off, "vision").fp8 is None
    # A decoder the loss weights do not build still gets a config (tests, tools): by its widths.
    no_recon = load_config(REPO / "recipes" / "tulip_1b.yaml", ["loss.weights.text_recon=0", "loss.weights.mae=0"])
    plan = fp8_plan(no_recon)
    assert [b.name for b in plan.blocks if b.built] == ["vision", "text"]
    assert "decoder" not in plan.startup_line() and "decoder" not in "\n".join(plan.table())
    assert mc.decoder_config(no_recon, "mae").fp8 == "hybrid" and mc.decoder_config(no_recon, "text").fp8 is None


def _block_fp8_contexts(fp8_text: bool) -> list:
    """Run a vision and a text block (local layers, CPU) whose configs differ only in FP8, with
    megatron's get_fp8_context recorded: which configs enter an FP8 context."""
    from unittest import mock

    from megatron.core.transformer import transformer_block
    from megatron.core.transformer.transformer_block import TransformerBlock

    from tulip_mega.models.specs import block_spec
    from tulip_mega.parallel.init import init_parallel

    init_parallel(1, 1, 0)
    # The text MLP width 264 is not a multiple of 16: the text block runs bf16.
    cfg = load_config(None, ["precision.fp8=hybrid", "model.text.ffn_hidden_size=" + ("256" if fp8_text else "264")])
    choices = mc.layer_choices(cfg, use_te=False)
    calls = []
    real = transformer_block.get_fp8_context

    def record(config, *args, **kwargs):
        calls.append((config.ffn_hidden_size, "init" if kwargs.get("is_init") else "forward"))
        return real(config, *args, **kwargs)

    with mock.patch.object(transformer_block, "get_fp8_context", record):
        for tower in ("vision", "text"):
            config = mc.tower_config(cfg, tower, choices)
            block = TransformerBlock(config, block_spec(config, use_te=False))
            block(torch.randn(16, 2, config.hidden_size), attention_mask=None)
    return calls


def test_a_bf16_block_enters_no_fp8_context():
    from tulip_mega.parallel.spawn import run_distributed

    # Calls by MLP width (vision 256, text 264 / 256): at build (per layer) and per forward
    # (delayed scaling: one context around the block); none at all for the bf16 block.
    fp8_vision = [(256, "init"), (256, "init"), (256, "forward")]
    assert run_distributed(_block_fp8_contexts, 1, False, timeout=120)[0] == fp8_vision
    assert run_distributed(_block_fp8_contexts, 1, True, timeout=120)[0] == fp8_vision * 2


# --- GPU switches ------------------------------------------------------------------------------
def _gpu(monkeypatch, cuda: bool, apex: bool = False) -> None:
    monkeypatch.setattr(mc, "use_cuda", lambda: cuda)
    monkeypatch.setattr(mc, "apex_wgrad_available", lambda: apex)


def test_gpu_switches_are_all_off_on_cpu(monkeypatch):
    _gpu(monkeypatch, cuda=False, apex=True)
    cfg = load_config(REPO / "recipes" / "tulip_1b.yaml")
    gpu = mc.gpu_switches(cfg, use_te=True)
    assert not any(getattr(gpu, f) for f in gpu.__dataclass_fields__), gpu
    choices = mc.layer_choices(cfg, use_te=True)
    for config in (mc.tower_config(cfg, "vision", choices), mc.decoder_config(cfg, "text", choices)):
        assert not (config.gradient_accumulation_fusion or config.bias_activation_fusion
                    or config.bias_dropout_fusion or config.masked_softmax_fusion or config.persist_layer_norm
                    or config.tp_only_amax_red)
        assert config.activation_func is mc.gelu_tanh
    assert mc.tower_config(cfg, "vision", choices).recompute_granularity == "selective"
    assert mc.ddp_bucket_size(cfg, [torch.nn.Linear(4, 4)]) is None
    lines = mc.startup_lines(cfg, choices, None)
    assert lines[0].startswith("fp8 hybrid (delayed scaling): FP8 GEMMs in vision tower, MAE decoder; bf16 in")
    assert lines[1].startswith("GPU switches: off (no CUDA)") and len(lines) == 2


@pytest.mark.parametrize("apex", [False, True])
def test_gpu_switches_on_with_cuda_and_te(monkeypatch, apex):
    _gpu(monkeypatch, cuda=True, apex=apex)
    default = mc.layer_choices(load_config(REPO / "recipes" / "tulip_1b.yaml"), use_te=True)
    assert not default.gpu.bias_gelu_fusion and not default.gpu.bias_dropout_fusion  # opt-in: measured slower
    cfg = load_config(REPO / "recipes" / "tulip_1b.yaml", ["precision.bias_fusions=true"])
    choices = mc.layer_choices(cfg, use_te=True)
    vision, text = mc.tower_config(cfg, "vision", choices), mc.tower_config(cfg, "text", choices)
    mae, caption = mc.decoder_config(cfg, "mae", choices), mc.decoder_config(cfg, "text", choices)
    for config in (vision, text, mae, caption):
        assert config.bias_activation_fusion and config.bias_dropout_fusion
        assert config.activation_func is F.gelu  # megatron's key for its (tanh) bias-GELU kernel
        assert not config.masked_softmax_fusion and not config.persist_layer_norm
    assert vision.gradient_accumulation_fusion and text.gradient_accumulation_fusion and mae.gradient_accumulation_fusion
    # The caption decoder's output layer is megatron's ColumnParallelLinear: apex or nothing.
    assert caption.gradient_accumulation_fusion == apex
    # FP8 blocks reduce amaxes over TP only; bf16 blocks have no FP8 at all.
    assert vision.tp_only_amax_red and mae.tp_only_amax_red
    assert text.fp8 is None and not text.tp_only_amax_red
    # Head dims 96 and 72: TE's fused attention, nothing left to recompute selectively.
    assert vision.recompute_granularity is None and text.recompute_granularity is None
    lines = mc.startup_lines(cfg, choices, mc.bucket_size_for(800_000_000, 256))
    assert lines[1] == ("GPU switches: gradient accumulation fusion in TE layers"
                        + (" and megatron's linears (apex)" if apex else
                           " (not in blocks with megatron's own linears, e.g. the caption decoder: no apex)")
                        + ", bias-GELU fusion on, bias-dropout-add fusion on, FP8 amax reduction over TP only")
    assert lines[2] == ("recompute: selective core-attention recompute dropped for vision (head dim 96), "
                        "text (head dim 72): TE's fused attention stores no score matrix")
    assert lines[3] == "DDP buckets: 100.0M parameters each (overlap_grad_reduce)"


def test_gpu_without_te_uses_megatron_linears_only_with_apex(monkeypatch):
    cfg = load_config(REPO / "recipes" / "tulip_b16.yaml", ["precision.fp8=null"])
    for apex in (False, True):
        _gpu(monkeypatch, cuda=True, apex=apex)
        choices = mc.layer_choices(cfg, use_te=False)
        config = mc.tower_config(cfg, "vision", choices)
        assert config.gradient_accumulation_fusion == apex
        assert not config.bias_activation_fusion  # opt-in (precision.bias_fusions): measured slower
        assert not config.tp_only_amax_red and config.recompute_granularity == cfg.recompute.granularity


def test_core_attention_recompute_kept_where_te_may_not_fuse(monkeypatch):
    _gpu(monkeypatch, cuda=True)
    # 6b: vision head dim 3200 / 32 = 100 (not a multiple of 8), text 2048 / 16 = 128.
    cfg = load_config(REPO / "recipes" / "tulip_6b.yaml", ["recompute.granularity=selective"])
    layout = resolve_layout(cfg, cfg.parallel.tensor_parallel * cfg.parallel.pipeline_parallel)
    choices = mc.layer_choices(cfg, use_te=True, layout=layout)
    assert mc.tower_config(cfg, "vision", choices, layout).recompute_granularity == "selective"
    assert mc.tower_config(cfg, "text", choices, layout).recompute_granularity is None


def test_megatron_fused_bias_gelu_is_siglips_tanh_gelu():
    """The kernel bias_activation_fusion selects (keyed on F.gelu) computes gelu_tanh(x + b):
    forward and both gradients, in float32 (run eagerly: torch.compile changes no math)."""
    from megatron.core.fusions.fused_bias_gelu import bias_gelu_impl

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 3, 256, generator=g) * 3).requires_grad_(True)
    b = torch.randn(256, generator=g).requires_grad_(True)
    w = torch.randn(64, 3, 256, generator=g)
    with torch.compiler.set_stance("force_eager"):
        fused = bias_gelu_impl(x, b)
        (fused * w).sum().backward()
    gx, gb = x.grad.clone(), b.grad.clone()
    x.grad = b.grad = None
    ref = mc.gelu_tanh(x + b)
    (ref * w).sum().backward()
    torch.testing.assert_close(fused, ref, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(gx, x.grad, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(gb, b.grad, rtol=1e-4, atol=1e-3)  # summed over 192 rows
    assert not torch.allclose(fused, F.gelu(x + b))  # not erf GELU, despite the F.gelu key


def test_ddp_bucket_size(monkeypatch):
    # 0.8B parameters per rank at DP 256: megatron's default 256M gives ~3 buckets; ours 8.
    assert mc.bucket_size_for(800_000_000, 256) == 100_000_000
    assert math.ceil(800_000_000 / mc.bucket_size_for(800_000_000, 256)) == 8
    # Never below 1 MB of fp32 gradients per rank, never above megatron's default.
    assert mc.bucket_size_for(800_000_000, 2048) == 512_000_000
    assert mc.bucket_size_for(10_000_000, 4) == 1_250_000
    assert mc.bucket_size_for(10**12, 8) == 40_000_000
    from megatron.core import parallel_state

    _gpu(monkeypatch, cuda=True)
    monkeypatch.setattr(parallel_state, "get_data_parallel_world_size", lambda *a, **k: 1)
    model = [torch.nn.Linear(1000, 1000), torch.nn.Linear(1000, 3000)]  # chunks of ~1.0M and ~3.0M
    cfg = load_config(None, ["parallel.overlap_grad_reduce=true"])
    assert mc.ddp_bucket_size(cfg, model) == math.ceil(3_003_000 / 8)
    assert mc.ddp_bucket_size(load_config(None), model) is None  # no overlap: megatron's one bucket
