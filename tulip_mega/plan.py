"""`tulip-mega plan RECIPE --nodes N`: will this layout fit, and how fast will it go?

Pure arithmetic on the resolved recipe (no torch / megatron import, so it answers at once):

- layout: `resolve_layout(cfg, N x G)` (the trainer's own arithmetic: batch, streams,
  pipeline split); refused with its reason;
- FP8: the recipe is validated with `precision.fp8` as it asks (Transformer Engine's shape
  rule, tulip_mega/config/fp8_shapes.py; TE itself need not be installed), and the GEMMs of
  every block are printed per rank with FP8 or bf16 and why;
- per-GPU memory: parameters, gradients, optimizer states (with/without the distributed
  optimizer) and activations under the chosen recompute, per Korthikanti et al. 2022,
  "Reducing Activation Recomputation in Large Transformer Models";
- FLOPs per image-text pair (both towers), the contrastive batch (the whole global batch
  under `loss.contrastive_batch=global`, whose embedding cache costs one more forward of the
  contrastive streams per step), and the step time / pairs per second at a stated MFU of a
  stated peak (H100 bf16 dense 989 TFLOP/s);
- with SigLIP 2's self-distillation terms, the EMA teacher: its forward-only FLOPs (once, not
  3x), its float32 weights per stage (no gradient, no optimizer state), and the model FLOPs
  before and after it starts at `loss.distill.start_fraction`.

The formulas (Korthikanti et al. 2022 for activations) are in docs/training.md "FLOP and
memory model".
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Optional, Sequence

from tulip_mega.config.fp8_shapes import fp8_plan
from tulip_mega.config.run_layout import RunLayout
from tulip_mega.config.streams import DISTILL_TERMS, Streams, input_streams
from tulip_mega.data_rate import data_rate, format_data_rate
from tulip_mega.flops import contrastive_batch_line as flops_contrastive_batch_line
from tulip_mega.flops import count_flops, embedding_cache_flops, locca_sequence
from tulip_mega.launch import resolve_layout
from tulip_mega.model_size import distill_param_counts, param_counts, towers
from tulip_mega.plan_stages import PipelinePlan, format_pipeline, locca_params, plan_pipeline

H100_BF16_DENSE_TFLOPS = 989.0
GIB = 1024**3


def forward_flops_per_sample(cfg, streams: Streams) -> dict[str, int]:
    """Forward FLOPs for one sample feeding `streams`, by part (2 FLOPs per multiply-add), from
    tulip_mega.flops (every tower call, view, head and decoder the loss terms switch
    on). The contrastive logits are left out here (see the module docstring)."""
    return dict(count_flops(cfg, streams).parts)


@dataclasses.dataclass
class Plan:
    """The numbers of one layout: memory of the fullest stage, FLOPs, step time."""

    layout: RunLayout  # the hypothetical run's layout (tulip_mega.launch.resolve_layout)
    contrastive_mode: str
    params_total: int
    params_per_gpu: float
    transformer_params_per_gpu: float
    memory_gib: dict[str, float]
    flops_forward_per_sample: int
    flops_model_per_sample: int
    flops_hardware_per_sample: int
    flops_cache_per_sample: int
    step_time_s: float
    samples_per_s: float
    mfu: float
    peak_tflops: float
    pipeline: PipelinePlan  # per-stage FLOPs and memory (tulip_mega/plan_stages.py)
    flops_teacher_per_sample: int = 0  # the EMA teacher's forward (in flops_model_per_sample once)
    flops_model_before_teacher: int = 0  # model FLOPs per sample of the steps before it starts


def make_plan(cfg, nodes: int, gpus_per_node: int = 8, mfu: float = 0.40,
              peak_tflops: float = H100_BF16_DENSE_TFLOPS) -> Plan:
    """The numbers for `cfg` on nodes x gpus_per_node GPUs; raises ConfigError for a bad layout."""
    return plan_layout(cfg, resolve_layout(cfg, nodes * gpus_per_node), mfu, peak_tflops)


def plan_layout(cfg, layout: RunLayout, mfu: float = 0.40, peak_tflops: float = H100_BF16_DENSE_TFLOPS) -> Plan:
    """The numbers for `cfg` laid out as `layout`: the fullest pipeline stage's memory (the
    split, every stream's activations, the micro-batches in flight: what must fit), FLOPs
    per pair with recompute and the embedding cache, and the step time at `mfu`."""
    tp, pp = layout.tensor_parallel, layout.pipeline_parallel
    transformer_per_gpu = sum(tw.layers * (tw.layer_sharded_params / tp + tw.layer_replicated_params)
                              for tw in towers(cfg)) / pp
    pipeline = plan_pipeline(cfg, layout)
    count = count_flops(cfg, layout.streams)
    fwd, model = count.forward, count.training  # the teacher: forward only, and never recomputed
    recompute = cfg.recompute.granularity
    if recompute == "full":
        hardware = model + fwd - count.teacher
    elif recompute == "selective":
        hardware = model + count.attention
    else:
        hardware = model
    cache = embedding_cache_flops(cfg, layout)
    hardware += cache
    gb = layout.global_batch_size
    step = gb * (model + cache) / (layout.world_size * peak_tflops * 1e12 * mfu)
    trained = sum(param_counts(cfg).values()) + sum(n for k, n in distill_param_counts(cfg).items()
                                                     if not k.startswith("teacher_"))
    return Plan(
        layout=layout, contrastive_mode=cfg.loss.contrastive_batch, params_total=trained,
        params_per_gpu=pipeline.fullest.params, transformer_params_per_gpu=transformer_per_gpu,
        memory_gib=dict(pipeline.fullest.memory_gib), flops_forward_per_sample=fwd, flops_model_per_sample=model,
        flops_hardware_per_sample=hardware, flops_cache_per_sample=cache, step_time_s=step,
        samples_per_s=gb / step, mfu=mfu, peak_tflops=peak_tflops, pipeline=pipeline,
        flops_teacher_per_sample=count.teacher,
        flops_model_before_teacher=count_flops(cfg, layout.streams.without_distill()).training,
    )


def contrastive_batch_line(plan: Plan) -> str:
    """How many pairs each contrastive term compares, and what that costs (start-up log, plan)."""
    lay = plan.layout
    return flops_contrastive_batch_line(plan.contrastive_mode, lay.contrastive_batch, lay.microbatches,
                                        plan.flops_cache_per_sample, plan.flops_model_per_sample)


def _gpus_text(lay: RunLayout) -> str:
    return (f"{lay.world_size} GPUs = TP {lay.tensor_parallel} x PP {lay.pipeline_parallel} "
            f"x DP {lay.data_parallel}")


def _batch_text(lay: RunLayout) -> str:
    return (f"global {lay.global_batch_size} = micro {lay.micro_batch_size} x DP {lay.data_parallel} "
            f"x {lay.microbatches}")


def format_plan(cfg, plan: Plan) -> str:
    m, lay = plan.memory_gib, plan.layout
    par, rc = cfg.parallel, cfg.recompute
    v, t = cfg.model.vision, cfg.model.text
    lines = [
        f"model {cfg.model.size}: {plan.params_total / 1e6:.1f}M parameters "
        f"(vision {v.num_layers}L h{v.hidden_size} s{v.seq_length}, text {t.num_layers}L h{t.hidden_size} "
        f"s{t.context_length})",
        f"layout: {_gpus_text(lay)}"
        f"{' (sequence parallel)' if par.sequence_parallel else ''}"
        f"{f', {par.virtual_pipeline} interleaved virtual stages per PP rank' if par.virtual_pipeline > 1 else ''}",
        f"batch: {_batch_text(lay)} accumulation step(s)",
        contrastive_batch_line(plan),
        "",
        f"memory per GPU (GiB), {'fp32' if cfg.precision.dtype == 'fp32' else 'bf16 mixed precision'}, "
        f"recompute={rc.granularity or 'off'}, distributed optimizer={'on' if par.distributed_optimizer else 'off'}:",
        f"  parameters   {m['parameters']:8.2f}   ({plan.params_per_gpu / 1e6:.1f}M on the fullest stage, "
        f"stage {plan.pipeline.fullest.index}; transformer layers {plan.transformer_params_per_gpu / 1e6:.1f}M "
        "per GPU on average)",
        f"  gradients    {m['gradients']:8.2f}   (fp32 main grads)",
        f"  optimizer    {m['optimizer']:8.2f}   (fp32 master + Adam m, v{'; / DP' if par.distributed_optimizer else ''})",
        f"  activations  {m['activations']:8.2f}   (Korthikanti et al.; micro-batch {lay.micro_batch_size}, every view "
        f"and text; {plan.pipeline.fullest.in_flight} in flight)",
        *([f"  teacher      {m['teacher']:8.2f}   (EMA teacher: float32 weights, no gradients or optimizer "
            "states, no activations)"] if "teacher" in m else []),
        f"  total        {m['total']:8.2f}   (+ ~10% for NCCL buffers and fragmentation; H100 has 80)",
        "",
        format_pipeline(plan.pipeline),
        "",
        f"FLOPs per pair: forward {plan.flops_forward_per_sample / 1e9:.2f} GFLOP, "
        f"training (3x) {plan.flops_model_per_sample / 1e9:.2f} GFLOP, "
        f"with recompute and the embedding cache {plan.flops_hardware_per_sample / 1e9:.2f} GFLOP",
        f"at {plan.mfu:.0%} MFU of {plan.peak_tflops:g} TFLOP/s per GPU: step {plan.step_time_s:.3f} s, "
        f"{plan.samples_per_s:,.0f} pairs/s, {plan.samples_per_s * 3600 / 1e6:.1f}M pairs/hour",
        *locca_lines(cfg, plan),
        *teacher_lines(cfg, plan),
    ]
    if m["total"] > 80 * 0.9:
        lines.append("warning: the estimate exceeds ~72 GiB (90% of an 80 GB H100): raise TP/PP, lower "
                     "train.micro_batch_size, or use recompute.granularity=full")
    fp8 = fp8_plan(cfg, lay.streams)
    if fp8.fp8:
        lines += ["", *fp8.table(),
                  f"fp8={fp8.fp8}: FP8 GEMMs via Transformer Engine (needs TE on the GPU nodes); the estimate "
                  "above uses the bf16 peak, and TE's FP8 weight copies add about 2 bytes per parameter"]
    return "\n".join(lines)


def locca_lines(cfg, plan: Plan) -> list[str]:
    """What the LocCa decoder costs per step (none without it): its training FLOPs per pair
    (3 sequences per image, forward and backward) and its parameters on the last stage."""
    if cfg.loss.weights.locca <= 0:
        return []
    parts = count_flops(cfg, input_streams(cfg)).parts
    decoder = 3 * (parts["locca_decoder_matmul"] + parts["locca_decoder_attention"])
    sharded, replicated = locca_params(cfg)
    tp = plan.layout.tensor_parallel
    return [f"LocCa decoder ({cfg.model.locca_decoder.num_layers} layers, 3 sequences of "
            f"{locca_sequence(cfg)} positions per image): {_flops(decoder)}/pair training "
            f"({decoder / plan.flops_model_per_sample:.0%} of the model FLOPs), "
            f"{(sharded + replicated) / 1e6:.1f}M parameters ({sharded / tp / 1e6 + replicated / 1e6:.1f}M per GPU "
            f"on the last stage)"]


def teacher_lines(cfg, plan: Plan) -> list[str]:
    """What the EMA teacher of the self-distillation terms costs per step (none without it):
    its forward-only FLOPs, its float32 weights on the fullest stage, and the model FLOPs per
    pair before and after it starts (the step time above is the one after)."""
    start = plan.layout.distill_start
    if start is None:
        return []
    terms = ", ".join(t for t in DISTILL_TERMS if getattr(cfg.loss.weights, t) > 0)
    teacher, model, before = (plan.flops_teacher_per_sample, plan.flops_model_per_sample,
                              plan.flops_model_before_teacher)
    fullest = plan.pipeline.fullest
    steps = cfg.train.steps
    mean = (start * before + (steps - start) * model) / max(steps, 1)
    return [f"EMA teacher ({terms}) from step {start:,} of {steps:,}: {_flops(teacher)}/pair forward-only "
            f"({teacher / model:.0%} of the model FLOPs), {fullest.memory_gib['teacher']:.2f} GiB of float32 "
            f"weights on the fullest stage ({fullest.teacher_params / 1e6:.1f}M parameters, stage {fullest.index})",
            f"  model FLOPs per pair: {before / 1e9:.2f} GFLOP before step {start:,}, {model / 1e9:.2f} GFLOP "
            f"from it on (the step time above), {mean / 1e9:.2f} GFLOP averaged over the run"]


RECIPE_COMMENT_PREFIX = "# plan: "


def _flops(x: float) -> str:
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if x >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.3g} FLOP"


def _count(x: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def _duration(seconds: float) -> str:
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.3g} days"
    if seconds >= 2 * 3600:
        return f"{seconds / 3600:.3g} hours"
    return f"{seconds / 60:.3g} minutes"


def recipe_comment(cfg, plan: Plan, command: str) -> list[str]:
    """The `# plan:` block a recipe carries as its expected numbers: the command, then one line
    per number. tests/unit/test_plan.py re-runs the command and checks the block is what it prints
    (regenerate with `tulip-mega plan RECIPE --nodes N --recipe-comment`)."""
    v, t, lay = cfg.model.vision, cfg.model.text, plan.layout
    pairs = cfg.train.steps * lay.global_batch_size
    cache = plan.flops_cache_per_sample
    lines = [
        command,
        f"  model {cfg.model.size}: {_count(plan.params_total)} parameters "
        f"(vision {v.num_layers}L h{v.hidden_size}, text {t.num_layers}L h{t.hidden_size})",
        f"  layout: {_gpus_text(lay)}; {_batch_text(lay).replace('global', 'global batch', 1)}",
        f"  memory per GPU: {plan.memory_gib['total']:.1f} GiB (before ~10% headroom)",
        *([f"  pipeline bubble: {plan.pipeline.bubble:.1%} ("
           + ("1F1B" if plan.pipeline.virtual == 1 else f"interleaved, {plan.pipeline.virtual} virtual stages")
           + f", {lay.microbatches} micro-batches per step; not in the step time below)"] if lay.pipeline_parallel > 1 else []),
        f"  training {_flops(plan.flops_model_per_sample)} per pair"
        + (f" + {_flops(cache)} embedding-cache forward (+{cache / plan.flops_model_per_sample:.0%})" if cache else ""),
        f"  at {plan.mfu:.0%} MFU of {plan.peak_tflops:g} TFLOP/s per GPU: {plan.step_time_s:.3g} s per step, "
        f"{_count(plan.samples_per_s)} pairs/s",
        f"  train.steps {cfg.train.steps:,} x {lay.global_batch_size} = {_count(pairs)} pairs: "
        f"{_duration(plan.step_time_s * cfg.train.steps)} on {lay.world_size} GPUs",
    ]
    return [RECIPE_COMMENT_PREFIX + line for line in lines]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tulip-mega plan",
                                description="Check a recipe's layout on N nodes and estimate memory and speed.")
    p.add_argument("recipe", help="recipe YAML, e.g. recipes/tulip_1b.yaml")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides, as for train")
    p.add_argument("--nodes", type=int, required=True, help="number of nodes")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--mfu", type=float, default=0.40, help="model FLOPs utilisation to assume (default 0.40)")
    p.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS,
                   help=f"per-GPU peak (default {H100_BF16_DENSE_TFLOPS:g} = H100 SXM bf16 dense)")
    p.add_argument("--host-samples-per-core", type=float, default=None,
                   help="samples per CPU-second of the loader's host path on your CPUs (measure with "
                        "benchmarks/loader.py --host-only); default: tulip_mega.data_rate.HOST_SAMPLES_PER_CORE")
    p.add_argument("--recipe-comment", action="store_true",
                   help="print only the `# plan:` block a recipe carries as its expected numbers")
    return p


def plan_command(args: argparse.Namespace) -> str:
    """The `tulip-mega plan ...` command line that reproduces `args` (for the recipe block)."""
    parts = ["tulip-mega plan", args.recipe, *args.overrides, f"--nodes {args.nodes}"]
    defaults = build_parser().parse_args(["x", "--nodes", "1"])
    for flag in ("gpus_per_node", "mfu", "peak_tflops"):
        if getattr(args, flag) != getattr(defaults, flag):
            parts.append(f"--{flag.replace('_', '-')} {getattr(args, flag):g}")
    return " ".join(parts)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    from tulip_mega.config import ConfigError, load_config

    try:
        if args.nodes < 1 or args.gpus_per_node < 1:
            raise ConfigError(f"--nodes={args.nodes} and --gpus-per-node={args.gpus_per_node} must be >= 1")
        # Validated with FP8 as the recipe asks: Transformer Engine's shape rule refuses token
        # counts it cannot run (config/fp8_shapes.py); whether TE imports is a launch check.
        cfg = load_config(args.recipe, args.overrides)
        plan = make_plan(cfg, args.nodes, args.gpus_per_node, args.mfu, args.peak_tflops)
        rate = data_rate(cfg, plan, args.host_samples_per_core)
    except (ConfigError, OSError, ValueError) as e:
        print(f"tulip-mega: plan refused: {e}", file=sys.stderr)
        return 2
    if args.recipe_comment:
        print("\n".join(recipe_comment(cfg, plan, plan_command(args))))
        return 0
    print(format_plan(cfg, plan))
    print(format_data_rate(rate, default_rate=args.host_samples_per_core is None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
