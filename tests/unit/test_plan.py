"""`tulip-mega plan`: layout check, memory and FLOP arithmetic (no torch, no processes)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tulip_mega.config import ConfigError, load_config
from tulip_mega.config.streams import input_streams
from tulip_mega.plan import forward_flops_per_sample, main, make_plan

REPO = Path(__file__).resolve().parents[2]
DEBUG = ["model.size=debug", "model.vision.image_size=32", "model.vision.patch_size=8",
         "model.text.context_length=16"]  # the hand counts below assume 16 text tokens = 16 patches


def _cfg(*overrides: str):
    return load_config(None, DEBUG + list(overrides))


def test_debug_flops_match_a_hand_count():
    # debug: both towers 2 layers, h=64, f=256, 4 heads; vision 32px/8 = 16 patches, text 16 tokens.
    s, h, f = 16, 64, 256
    layer_matmul = 2 * s * (4 * h * h + 2 * h * f)  # QKV + out proj (4h^2) and the MLP (2hf), per token
    layer_attention = 2 * s * s * h + 2 * s * s * h  # QK^T and softmax(QK^T) V
    towers = 2 * 2 * (layer_matmul + layer_attention)  # 2 towers x 2 layers
    patch_embed = 2 * s * (3 * 8 * 8) * h
    map_head = 2 * s * 2 * h * h + 2 * 2 * h * h + 4 * s * h + 2 * 2 * h * f  # K,V over s; q, out; scores; MLP
    text_head = 2 * h * h
    assert towers + patch_embed + map_head + text_head == 7_303_168
    cfg = _cfg()
    parts = forward_flops_per_sample(cfg, input_streams(cfg))
    assert sum(parts.values()) == 7_303_168
    assert parts["vision_layers_attention"] == parts["text_layers_attention"] == 2 * layer_attention

    plan = make_plan(_cfg("train.global_batch_size=32", "train.micro_batch_size=8"), nodes=1, gpus_per_node=4)
    assert plan.flops_model_per_sample == 3 * 7_303_168  # forward + backward (2x)
    assert plan.flops_hardware_per_sample == plan.flops_model_per_sample  # no recompute
    micro = "loss.contrastive_batch=micro"
    full = make_plan(_cfg("recompute.granularity=full", micro), nodes=1, gpus_per_node=1)
    assert full.flops_hardware_per_sample == 4 * 7_303_168  # + one more forward
    sel = make_plan(_cfg("recompute.granularity=selective", micro), nodes=1, gpus_per_node=1)
    assert sel.flops_hardware_per_sample == 3 * 7_303_168 + 4 * layer_attention
    # The global contrastive batch over 4 micro-batches: the embedding cache is one more forward of
    # the contrastive streams, which for plain SigLIP is the whole forward.
    cached = make_plan(_cfg("recompute.granularity=full"), nodes=1, gpus_per_node=1)
    assert cached.layout.microbatches == 4 and cached.flops_cache_per_sample == 7_303_168
    assert cached.flops_hardware_per_sample == 5 * 7_303_168
    assert cached.flops_model_per_sample == 3 * 7_303_168  # MFU's numerator is unchanged


def test_batch_and_speed_arithmetic():
    plan = make_plan(_cfg("train.global_batch_size=64", "train.micro_batch_size=4"), nodes=2, gpus_per_node=4,
                     mfu=0.5, peak_tflops=100.0)
    assert (plan.layout.world_size, plan.layout.data_parallel, plan.layout.microbatches, plan.layout.contrastive_batch) == (8, 8, 2, 64)
    # Model FLOPs (3x forward) + the embedding-cache forward of the global contrastive batch.
    assert plan.step_time_s == pytest.approx(64 * (3 + 1) * 7_303_168 / (8 * 100e12 * 0.5))
    assert plan.samples_per_s == pytest.approx(64 / plan.step_time_s)
    micro = make_plan(_cfg("train.global_batch_size=64", "train.micro_batch_size=4", "loss.contrastive_batch=micro"),
                      nodes=2, gpus_per_node=4, mfu=0.5, peak_tflops=100.0)
    assert (micro.layout.contrastive_batch, micro.flops_cache_per_sample) == (32, 0)
    assert micro.step_time_s == pytest.approx(64 * 3 * 7_303_168 / (8 * 100e12 * 0.5))


def test_memory_components_positive_and_scale():
    base = make_plan(_cfg("model.size=b16", "model.vision.image_size=224", "model.vision.patch_size=16",
                          "train.global_batch_size=64", "train.micro_batch_size=8"), nodes=1, gpus_per_node=8)
    assert all(v > 0 for v in base.memory_gib.values())
    assert base.memory_gib["total"] == pytest.approx(sum(v for k, v in base.memory_gib.items() if k != "total"))

    tp2 = make_plan(_cfg("model.size=b16", "model.vision.image_size=224", "model.vision.patch_size=16",
                         "train.global_batch_size=64", "train.micro_batch_size=8", "parallel.tensor_parallel=2"),
                    nodes=1, gpus_per_node=8)
    # TP=2 halves the per-GPU transformer parameters (up to the replicated biases/LayerNorms).
    assert tp2.transformer_params_per_gpu == pytest.approx(base.transformer_params_per_gpu / 2, rel=1e-3)
    assert tp2.memory_gib["activations"] < base.memory_gib["activations"]

    pp2 = make_plan(_cfg("model.size=b16", "model.vision.image_size=224", "model.vision.patch_size=16",
                         "train.global_batch_size=64", "train.micro_batch_size=8", "parallel.pipeline_parallel=2"),
                    nodes=1, gpus_per_node=8)
    assert pp2.transformer_params_per_gpu == pytest.approx(base.transformer_params_per_gpu / 2)

    dist = make_plan(_cfg("model.size=b16", "model.vision.image_size=224", "model.vision.patch_size=16",
                          "train.global_batch_size=64", "train.micro_batch_size=8",
                          "parallel.distributed_optimizer=true"), nodes=1, gpus_per_node=8)
    assert dist.memory_gib["optimizer"] == pytest.approx(base.memory_gib["optimizer"] / 8)  # / DP
    assert dist.memory_gib["parameters"] == pytest.approx(base.memory_gib["parameters"])

    sel = make_plan(_cfg("model.size=b16", "model.vision.image_size=224", "model.vision.patch_size=16",
                         "train.global_batch_size=64", "train.micro_batch_size=8",
                         "recompute.granularity=selective"), nodes=1, gpus_per_node=8)
    full = make_plan(_cfg("model.size=b16", "model.vision.image_size=224", "model.vision.patch_size=16",
                          "train.global_batch_size=64", "train.micro_batch_size=8",
                          "recompute.granularity=full"), nodes=1, gpus_per_node=8)
    assert full.memory_gib["activations"] < sel.memory_gib["activations"] < base.memory_gib["activations"]


def test_bad_layout_is_refused_with_the_reason(capsys):
    with pytest.raises(ConfigError, match="world size 6 is not divisible"):
        make_plan(load_config(REPO / "recipes" / "tiny_cpu.yaml"), nodes=1, gpus_per_node=6)
    rc = main([str(REPO / "recipes" / "tiny_cpu.yaml"), "--nodes", "1", "--gpus-per-node", "6"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "plan refused" in err and "parallel.tensor_parallel=2" in err
    rc = main([str(REPO / "recipes" / "tulip_1b.yaml"), "--nodes", "64", "parallel.tensor_parallel=3"])
    assert rc == 2 and "num_heads=16 is not divisible by parallel.tensor_parallel=3" in capsys.readouterr().err


def test_1b_recipe_fits_on_64_nodes_and_plan_imports_no_torch():
    code = ("import sys; from tulip_mega.plan import main; "
            "rc = main(['recipes/tulip_1b.yaml', '--nodes', '64', 'precision.fp8=hybrid']); "
            "assert 'torch' not in sys.modules and 'megatron' not in sys.modules, 'plan imported torch'; "
            "sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "512 GPUs = TP 2 x PP 1 x DP 256" in out.stdout
    assert "fp8=hybrid" in out.stdout and "warning" not in out.stdout


def test_recipe_plan_comments_are_what_plan_prints():
    """Every recipe's expected numbers are a `# plan:` block whose first line is the command;
    re-running it must print the same block (regenerate with that command + --recipe-comment).
    The GPU recipes must carry one."""
    import shlex

    from tulip_mega.config import load_config
    from tulip_mega.plan import RECIPE_COMMENT_PREFIX, build_parser, make_plan, plan_command, recipe_comment

    checked = []
    for recipe in sorted((REPO / "recipes").glob("*.yaml")):
        lines = [ln.rstrip("\n") for ln in recipe.read_text().splitlines() if ln.startswith(RECIPE_COMMENT_PREFIX)]
        if not lines:
            continue
        words = shlex.split(lines[0][len(RECIPE_COMMENT_PREFIX):])
        assert words[:2] == ["tulip-mega", "plan"], (recipe.name, lines[0])
        args = build_parser().parse_intermixed_args(words[2:])
        cfg = load_config(str(REPO / args.recipe), list(args.overrides) + ["precision.fp8=null"])
        plan = make_plan(cfg, args.nodes, args.gpus_per_node, args.mfu, args.peak_tflops)
        expected = recipe_comment(cfg, plan, plan_command(args))
        assert lines == expected, f"{recipe.name}: the # plan: block differs from plan's output:\n" + "\n".join(expected)
        checked.append(recipe.stem)
    assert {"tulip_b16", "tulip_so400m", "tulip_1b", "clip_rocket_b16"} <= set(checked), checked
