"""The per-pipeline-stage part of `tulip-mega plan`: FLOPs, memory, the bubble, and a better split.

Pure arithmetic (no torch), like tulip_mega/plan.py, whose formulas it applies per stage:

  stage FLOPs      training FLOPs per pair that stage i runs (models/pipeline_split.StageCosts:
                   its layers of both towers, + the patch embedding on stage 0, + the heads,
                   decoders and projectors on the last stage; recompute and the embedding-cache
                   forward included, as they take the stage's time)
  stage memory     its parameters (layers of both towers /TP + replicated parts, the embeddings
                   on stage 0, heads + decoders on the last), fp32 grads, optimizer states (/DP
                   with the distributed optimizer), and activations: every vision stream (views
                   x tokens: global crops, local crops, MAE visible patches) and every text
                   through each of the stage's layers (Korthikanti per layer), times the
                   micro-batches in flight on that stage: 1F1B keeps min(p - i, m) on stage i;
                   interleaved with v chunks keeps min(v m, 2 (p - i - 1) + (v - 1) p + 1)
                   chunk-micro-batches of 1/v of the stage's layers (megatron's warm-up count);
                   the last stage adds the decoders' activations of one micro-batch
  EMA teacher      (self_distill / masked_prediction) a float32 copy of the stage's vision
                   layers (/TP), + its patch embedding on stage 0, + its final LayerNorm, MAP
                   head and head copies on the last stage, at 4 bytes per parameter with no
                   gradient or optimizer state (memory kind "teacher"); its forward runs without
                   autograd, so its stream adds no activations. The student's distill heads
                   and mask token are ordinary parameters; the last stage adds the heads'
                   activations (their K-wide logits dominate) of one micro-batch
  bubble           1F1B (p - 1) / (m + p - 1); interleaved (p - 1) / (v m + p - 1), with m the
                   micro-batches per step of one DP rank (Narayanan et al. 2021)
  pipeline time    the step is paced by the slowest stage: factor max/mean stage FLOPs, and the
                   bubble stretches it by 1 / (1 - bubble)

Under interleaved virtual stages (`parallel.virtual_pipeline` = v > 1) the split lists PP x v
chunks (megatron's order: chunk c of stage i is entry c * PP + i); a stage's numbers are the
sums over its v chunks, its activations the interleaved in-flight count above, the recipe's
bubble the interleaved one, and the suggested split balances the chunks (what `balanced`
optimises).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from tulip_mega.config.run_layout import RunLayout
from tulip_mega.config.streams import Streams
from tulip_mega.flops import locca_sequence, locca_vocab_size
from tulip_mega.model_size import Tower, distill_param_counts, param_counts, towers
from tulip_mega.models.pipeline_split import Split, StageCosts, balanced_split, even_split, stage_costs

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class StagePlan:
    index: int
    vision_layers: int
    text_layers: int
    flops: float  # training FLOPs per pair on this stage (recompute and cache included)
    params: float  # parameters per GPU of this stage
    in_flight: int  # micro-batches (1F1B) / chunk-micro-batches (interleaved) holding activations
    memory_gib: dict  # parameters, gradients, optimizer, activations, (teacher,) total
    teacher_params: float = 0.0  # EMA-teacher parameters per GPU of this stage (float32, frozen)


@dataclasses.dataclass(frozen=True)
class PipelinePlan:
    split: Split  # per stage, or per chunk (PP x virtual, megatron's order) under interleaving
    split_name: str  # the recipe's parallel.pipeline_split
    stages: tuple[StagePlan, ...]
    microbatches: int  # per step and DP rank
    bubble_1f1b: float
    bubble_interleaved: dict  # v -> bubble fraction
    imbalance: float  # max / mean stage FLOPs
    suggestion: Optional[Split]  # a better split than the recipe's, if there is one
    suggestion_gain: float  # slowest stage (chunk) of the recipe's split / of the suggestion
    virtual: int = 1  # the recipe's parallel.virtual_pipeline

    @property
    def bubble(self) -> float:
        """The bubble of the recipe's schedule (1F1B, or interleaved with its virtual size)."""
        return self.bubble_1f1b if self.virtual == 1 else bubble_fraction(len(self.stages), self.microbatches,
                                                                           self.virtual)

    @property
    def fullest(self) -> StagePlan:
        return max(self.stages, key=lambda s: s.memory_gib["total"])


def bubble_fraction(pp: int, microbatches: int, virtual: int = 1) -> float:
    """Idle fraction of a pipelined step: (p - 1) / (v m + p - 1)."""
    return (pp - 1) / (virtual * microbatches + pp - 1)


def in_flight(stage: int, pp: int, microbatches: int, virtual: int = 1) -> int:
    """Micro-batches whose activations stage `stage` holds at its peak (chunk-micro-batches of
    1/v of its layers under interleaving), per megatron's warm-up counts."""
    if virtual == 1:
        return min(pp - stage, microbatches)
    return min(virtual * microbatches, 2 * (pp - stage - 1) + (virtual - 1) * pp + 1)


def _decoder_params(cfg) -> tuple[float, float]:
    """(TP-sharded, replicated) parameters of the last stage's decoders and projectors."""
    m, w, v, t = cfg.model, cfg.loss.weights, cfg.model.vision, cfg.model.text
    sharded = replicated = 0.0
    if w.mae > 0:
        d = m.mae_decoder
        layer = Tower("mae", d.num_layers, d.hidden_size, d.ffn_hidden_size, d.num_heads, v.seq_length)
        sharded += d.num_layers * layer.layer_sharded_params
        replicated += (d.num_layers * layer.layer_replicated_params + v.hidden_size * d.hidden_size + d.hidden_size
                       + d.hidden_size + v.seq_length * d.hidden_size + 2 * d.hidden_size
                       + d.hidden_size * 3 * v.patch_size**2 + 3 * v.patch_size**2)
    if w.text_recon > 0:
        d = m.text_decoder
        layer = Tower("text_dec", d.num_layers, d.hidden_size, d.ffn_hidden_size, d.num_heads, t.context_length)
        sharded += d.num_layers * layer.layer_sharded_params + 2 * t.vocab_size * d.hidden_size
        replicated += (d.num_layers * layer.layer_replicated_params + v.hidden_size * d.hidden_size + d.hidden_size
                       + t.context_length * d.hidden_size + 2 * d.hidden_size)
    if w.locca > 0:
        s, r = locca_params(cfg)
        sharded, replicated = sharded + s, replicated + r
    if w.aug_contrastive > 0:
        e, h = v.hidden_size, m.aug_projector_hidden
        replicated += 2 * (2 * e * h + h + e)
    return sharded, replicated


def locca_params(cfg) -> tuple[float, float]:
    """(TP-sharded, replicated) parameters of the LocCa decoder: its layers with cross-attention
    (q, kv, out projections; one more LayerNorm), the vocabulary-parallel embedding and output
    layer, learned positions and the context projection."""
    d_cfg, hv = cfg.model.locca_decoder, cfg.model.vision.hidden_size
    d, seq = d_cfg.hidden_size, locca_sequence(cfg)
    layer = Tower("locca", d_cfg.num_layers, d, d_cfg.ffn_hidden_size, d_cfg.num_heads, seq)
    cross = 4 * d * d + 4 * d  # q (d x d), kv (d x 2d), out (d x d) and their biases
    vocab = locca_vocab_size(cfg)
    sharded = d_cfg.num_layers * (layer.layer_sharded_params + cross) + 2 * vocab * d
    replicated = d_cfg.num_layers * (layer.layer_replicated_params + 2 * d) + seq * d + hv * d + d + 2 * d
    return sharded, replicated


def _decoder_activations(cfg, streams: Streams, micro_batch: int, tp: int, sp: bool, value_bytes: int) -> float:
    """Activation bytes of one micro-batch through the decoders (no recompute)."""
    m, w = cfg.model, cfg.loss.weights
    total = 0.0
    for on, d, seq, rows in ((w.mae > 0, m.mae_decoder, streams.patches, 1),
                             (w.text_recon > 0, m.text_decoder, cfg.model.text.context_length, 1),
                             (w.locca > 0, m.locca_decoder, locca_sequence(cfg), 3)):
        if on:  # LocCa: 3 sequences per image (its cross-attention's k/v over the patches not counted)
            tw = Tower("dec", d.num_layers, d.hidden_size, d.ffn_hidden_size, d.num_heads, seq)
            total += d.num_layers * tw.layer_activation_bytes(rows * micro_batch, tp, sp, None, value_bytes)
    return total


def _distill_head_activations(cfg, streams: Streams, micro_batch: int, value_bytes: int) -> float:
    """Activation bytes of one micro-batch through the student's distill heads and their loss:
    per student row the MLP's saved inputs (e + 4 H + 2 B values) and, in float32, the
    log-softmax over the K prototypes and the teacher's target it multiplies."""
    if not streams.teacher_view:
        return 0.0
    w, d, e = cfg.loss.weights, cfg.loss.distill, cfg.model.vision.hidden_size
    rows = (streams.local_crops if w.self_distill > 0 else 0) + streams.masked_patches
    per_row = (e + 4 * d.head_hidden + 2 * d.head_bottleneck) * value_bytes + 2 * d.prototypes * 4
    return micro_batch * rows * per_row


def layer_activation_bytes(cfg, streams: Streams, tower: str, micro_batch: int, recompute: Optional[str],
                           value_bytes: int) -> float:
    """Activation bytes of ONE layer of `tower` for one micro-batch: every stream through it
    but the EMA teacher's (it runs without autograd and keeps nothing for a backward)."""
    par = cfg.parallel
    tp, sp = par.tensor_parallel, par.sequence_parallel
    vt, tt = towers(cfg)
    if tower == "vision":
        calls = [(dataclasses.replace(vt, seq=s.seq), s.views) for s in streams.vision if s.name != "teacher"]
    else:
        calls = [(tt, streams.texts)]
    return sum(tw.layer_activation_bytes(micro_batch * n, tp, sp, recompute, value_bytes) for tw, n in calls)


def plan_pipeline(cfg, layout: RunLayout) -> PipelinePlan:
    """Per-stage numbers of the layout's split (PP x virtual chunks under interleaving)."""
    pp, virtual, split = layout.pipeline_parallel, layout.virtual_pipeline, layout.split
    costs = stage_costs(cfg, layout.streams)
    chunk_flops = costs.stages(split)
    # A stage's layers and FLOPs: the sum over its chunks (chunk c of stage i is c * pp + i).
    per_stage = [[c * pp + i for c in range(len(split) // pp)] for i in range(pp)]
    flops = [sum(chunk_flops[k] for k in chunks) for chunks in per_stage]
    stage_layers = [tuple(sum(split[k][col] for k in chunks) for col in (0, 1)) for chunks in per_stage]
    memory = _StageMemory(cfg, layout)
    stages = tuple(StagePlan(i, nv, nt, flops[i], *memory.stage(i, nv, nt)) for i, (nv, nt) in enumerate(stage_layers))
    suggestion, gain = _suggest(costs, split, pp, chunk_flops)
    name = cfg.parallel.pipeline_split if isinstance(cfg.parallel.pipeline_split, str) else "explicit"
    layers = sum(v + t for v, t in split)
    m = layout.microbatches
    return PipelinePlan(
        split=split, split_name=name, stages=stages, microbatches=m,
        bubble_1f1b=bubble_fraction(pp, m),
        bubble_interleaved={v: bubble_fraction(pp, m, v) for v in (2, 4) if pp > 1 and layers >= pp * v},
        imbalance=max(flops) / (sum(flops) / len(flops)), suggestion=suggestion, suggestion_gain=gain,
        virtual=virtual,
    )


def _suggest(costs: StageCosts, split: Split, pp: int, chunk_flops: list[float]) -> tuple[Optional[Split], float]:
    """(the FLOP-balanced split when it beats `split` by over 0.5%, else None; the gain)."""
    if pp == 1:
        return None, 1.0
    vision, text = (sum(pair[col] for pair in split) for col in (0, 1))
    best = balanced_split(costs, vision, text, len(split))
    gain = max(chunk_flops) / max(costs.stages(best))
    return (best if gain > 1.005 and best != split else None), gain


class _StageMemory:
    """Parameters, in-flight micro-batches and memory of one pipeline stage of a layout."""

    def __init__(self, cfg, layout: RunLayout) -> None:
        self.cfg, self.layout = cfg, layout
        self.counts = param_counts(cfg)
        self.towers = towers(cfg)
        fp32 = cfg.precision.dtype == "fp32"
        self.bytes = (4, 4, 8) if fp32 else (2, 4, 12)  # weight, gradient, optimizer per parameter
        self.value_bytes = 4 if fp32 else 2
        self.decoders = _decoder_params(cfg)
        self.distill = distill_param_counts(cfg)
        mb, streams, rc = layout.micro_batch_size, layout.streams, cfg.recompute.granularity
        self.per_layer = {name: layer_activation_bytes(cfg, streams, name, mb, rc, self.value_bytes)
                          for name in ("vision", "text")}
        self.no_rc = {name: layer_activation_bytes(cfg, streams, name, mb, None, self.value_bytes)
                      for name in ("vision", "text")}

    def params(self, i: int, nv: int, nt: int) -> float:
        """Parameters per GPU of stage `i` holding `nv` vision and `nt` text layers."""
        tp, last, c = self.layout.tensor_parallel, self.layout.pipeline_parallel - 1, self.counts
        vt, tt = self.towers
        params = sum(n * (tw.layer_sharded_params / tp + tw.layer_replicated_params) for n, tw in ((nv, vt), (nt, tt)))
        if i == 0:
            params += c["vision_embed"] + c["text_embed"] / tp + self.distill.get("distill_mask_token", 0)
        if i == last:
            params += (c["vision_final_ln"] + c["vision_map_head"] + c["text_final_ln"] + c["text_head"]
                       + c["logit_scale_bias"] + self.decoders[0] / tp + self.decoders[1]
                       + self.distill.get("distill_heads", 0))
        return params

    def teacher_params(self, i: int, nv: int) -> float:
        """EMA-teacher parameters per GPU of stage `i` holding `nv` vision layers: the teacher
        mirrors the student's vision tower slice on every stage (models/tulip.py); 0 without it."""
        if not self.distill:
            return 0.0
        tp, d, vt = self.layout.tensor_parallel, self.distill, self.towers[0]
        params = nv * (vt.layer_sharded_params / tp + vt.layer_replicated_params)
        if i == 0:
            params += d["teacher_vision_embed"]
        if i == self.layout.pipeline_parallel - 1:
            params += d["teacher_vision_final_ln"] + d["teacher_vision_map_head"] + d["teacher_heads"]
        return params

    def stage(self, i: int, nv: int, nt: int) -> tuple[float, int, dict, float]:
        """(parameters per GPU, micro-batches in flight, memory GiB by kind, EMA-teacher
        parameters per GPU) of stage `i`."""
        lay, cfg = self.layout, self.cfg
        params = self.params(i, nv, nt)
        flight = in_flight(i, lay.pipeline_parallel, lay.microbatches, lay.virtual_pipeline)
        act = flight * (nv * self.per_layer["vision"] + nt * self.per_layer["text"]) / lay.virtual_pipeline
        if cfg.recompute.granularity == "full":  # one layer re-runs without recompute in backward
            act += max([self.no_rc[name] for name, n in (("vision", nv), ("text", nt)) if n] or [0.0])
        if i == lay.pipeline_parallel - 1:
            act += _decoder_activations(cfg, lay.streams, lay.micro_batch_size, lay.tensor_parallel,
                                        cfg.parallel.sequence_parallel, self.value_bytes)
            act += _distill_head_activations(cfg, lay.streams, lay.micro_batch_size, self.value_bytes)
        weight_bytes, grad_bytes, optim_bytes = self.bytes
        dp = lay.data_parallel if cfg.parallel.distributed_optimizer else 1
        memory = {"parameters": params * weight_bytes / GIB, "gradients": params * grad_bytes / GIB,
                  "optimizer": params * optim_bytes / dp / GIB, "activations": act / GIB}
        teacher = self.teacher_params(i, nv)
        if self.distill:
            memory["teacher"] = teacher * 4 / GIB  # float32 weights only: frozen, no grad, no optimizer
        memory["total"] = sum(memory.values())
        return params, flight, memory, teacher


def compare_splits(cfg, layout: RunLayout) -> dict[str, float]:
    """max / min stage FLOPs of `even` and `balanced` for the layout's PP (the benchmark's prediction)."""
    costs, pp = stage_costs(cfg, layout.streams), layout.pipeline_parallel
    v, t = cfg.model.vision.num_layers, cfg.model.text.num_layers
    out = {}
    for name, split in (("even", even_split(v, t, pp)), ("balanced", balanced_split(costs, v, t, pp))):
        f = costs.stages(split)
        out[name] = max(f) / min(f)
    return out


def _fmt_split(split: Split) -> str:
    return "[" + ", ".join(f"[{v}, {t}]" for v, t in split) + "]"


def format_pipeline(pipe: PipelinePlan) -> str:
    """The plan's pipeline section."""
    pp = len(pipe.stages)
    if pipe.virtual == 1:
        lines = [f"pipeline: {pp} stage(s), parallel.pipeline_split={pipe.split_name} -> {_fmt_split(pipe.split)} "
                 "([vision, text] layers per stage)"]
    else:
        lines = [f"pipeline: {pp} stage(s) x {pipe.virtual} interleaved virtual stages, parallel.pipeline_split="
                 f"{pipe.split_name} -> {_fmt_split(pipe.split)} ([vision, text] layers per chunk: chunk 0 of "
                 "every stage, then chunk 1, ...)"]
    if pp > 1:
        inter = ", ".join(f"v={v} {b:.1%}" for v, b in pipe.bubble_interleaved.items()) or "n/a"
        lines.append(f"  bubble with {pipe.microbatches} micro-batches per step: 1F1B {pipe.bubble_1f1b:.1%}; "
                     f"interleaved {inter}"
                     + (f"; this recipe (v={pipe.virtual}) {pipe.bubble:.1%}" if pipe.virtual > 1 else ""))
    teacher = "teacher" in pipe.stages[0].memory_gib
    lines.append("  stage  vision  text   GFLOP/pair  params/GPU  in-flight  memory GiB (par+grad+opt+act"
                 + ("+teacher)" if teacher else ")"))
    for s in pipe.stages:
        m = s.memory_gib
        lines.append(f"  {s.index:5d}  {s.vision_layers:6d}  {s.text_layers:4d}  {s.flops / 1e9:11.2f}  "
                     f"{s.params / 1e6:9.1f}M  {s.in_flight:9d}  {m['total']:6.2f} = {m['parameters']:.2f}+"
                     f"{m['gradients']:.2f}+{m['optimizer']:.2f}+{m['activations']:.2f}"
                     + (f"+{m['teacher']:.2f}" if teacher else ""))
    if pp > 1:
        lines.append(f"  slowest stage / mean: {pipe.imbalance:.3f}")
    if pipe.suggestion is not None:
        what = "stage" if pipe.virtual == 1 else "chunk"
        lines.append(f"  suggestion: parallel.pipeline_split={_fmt_split(pipe.suggestion)} (the FLOP-balanced "
                     f"split; its slowest {what} is {pipe.suggestion_gain:.2f}x faster than this recipe's)")
    return "\n".join(lines)
