"""Model FLOPs per image-text sample, computed from the architecture: the one source for
`plan`, the training loop's TFLOP/s and MFU, and benchmarks/train_step.py.

A formula, not a profiler: MFU is defined against the FLOPs the model needs (matmuls only,
training = 3 x forward, recompute and the embedding cache's extra forward reported beside it,
not in it). The EMA teacher of the self-distillation terms runs forward only, without
autograd: its parts (keys `teacher_*`) count once in training, not three times. The formulas
are in docs/training.md "FLOP and memory model". Pure Python, no torch: `plan` stays instant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from tulip_mega.config.streams import Streams, contrastive_terms_on, decoder_length, model_heads

if TYPE_CHECKING:
    from tulip_mega.config.run_layout import RunLayout

TRAINING_MULTIPLIER = 3  # forward + backward (2x forward); recompute not counted
TEACHER_PREFIX = "teacher_"  # parts of the EMA teacher: forward only (no backward, no recompute)


def layer_flops(seq: int, hidden: int, ffn: int) -> tuple[int, int]:
    """(matmul, attention) forward FLOPs of one transformer layer on one sequence.

    matmul = QKV, out projection and MLP; attention = QK^T and softmax(QK^T) V (what selective
    recompute re-runs)."""
    s, h, f = seq, hidden, ffn
    matmul = 2 * s * h * 3 * h + 2 * s * h * h + 2 * 2 * s * h * f
    attention = 2 * s * s * h + 2 * s * s * h
    return matmul, attention


def map_head_flops(seq: int, hidden: int, ffn: int) -> int:
    """Attention-pooling head on one view: one learned query over `seq` tokens, then its MLP."""
    s, h, f = seq, hidden, ffn
    q_proj, kv_proj = 2 * h * h, 2 * s * h * 2 * h
    scores_and_av = 2 * s * h + 2 * s * h
    out_proj, mlp = 2 * h * h, 2 * 2 * h * f
    return q_proj + kv_proj + scores_and_av + out_proj + mlp


def distill_head_flops(in_dim: int, hidden: int, bottleneck: int, prototypes: int) -> int:
    """DINO projection head (models/decoders.DistillHead) on one row: three MLP layers, then
    the prototype layer (the L2 normalisations are not matmuls)."""
    return 2 * (in_dim * hidden + hidden * hidden + hidden * bottleneck + bottleneck * prototypes)


@dataclass(frozen=True)
class FlopCount:
    """Forward FLOPs per sample by part; totals for forward and training."""

    parts: dict[str, int]

    @property
    def forward(self) -> int:
        return sum(self.parts.values())

    @property
    def teacher(self) -> int:
        """Forward FLOPs of the EMA teacher (its tower slice, MAP head and heads): run once per
        sample without autograd, so neither backward nor recompute multiplies them."""
        return sum(v for k, v in self.parts.items() if k.startswith(TEACHER_PREFIX))

    @property
    def training(self) -> int:
        """Model FLOPs of one training sample: 3 x the student's forward + the teacher's
        forward (recompute excluded)."""
        return TRAINING_MULTIPLIER * (self.forward - self.teacher) + self.teacher

    @property
    def attention(self) -> int:
        """Forward attention-score FLOPs of the student (what selective recompute runs again;
        the teacher keeps no activations, so nothing of it is recomputed)."""
        return sum(v for k, v in self.parts.items() if k.endswith("_attention") and not k.startswith(TEACHER_PREFIX))


def _add(parts: dict[str, int], key: str, value: int) -> None:
    parts[key] = parts.get(key, 0) + value


def count_flops(cfg, streams: Streams, contrastive_batch: Optional[int] = None) -> FlopCount:
    """Forward FLOPs of one sample of the recipe `cfg` (resolved) feeding `streams`, by part.

    contrastive_batch: columns of the contrastive logits (`RunLayout.contrastive_batch`);
    None leaves the logits out. Keys: vision_layers_matmul, vision_layers_attention,
    vision_patch_embed, vision_map_head, text_layers_matmul, text_layers_attention, text_head,
    and when switched on mae_decoder_matmul / _attention, text_decoder_matmul / _attention,
    locca_decoder_matmul / _attention,
    aug_projector, contrastive_logits; with the EMA teacher running (`streams.teacher_view`)
    the student's distill_head / patch_head and the teacher's forward-only teacher_layers_matmul,
    teacher_layers_attention, teacher_patch_embed, teacher_map_head, teacher_heads (the
    "masked" stream is student tower work without a MAP head).
    """
    v, t, m, w = cfg.model.vision, cfg.model.text, cfg.model, cfg.loss.weights
    hv, ht, e, p = v.hidden_size, t.hidden_size, v.hidden_size, v.patch_size
    parts: dict[str, int] = {}

    for stream in streams.vision:
        tower = "teacher" if stream.name == "teacher" else "vision"
        mm, attn = layer_flops(stream.seq, hv, v.ffn_hidden_size)
        _add(parts, f"{tower}_layers_matmul", stream.views * v.num_layers * mm)
        _add(parts, f"{tower}_layers_attention", stream.views * v.num_layers * attn)
        _add(parts, f"{tower}_patch_embed", stream.views * 2 * stream.seq * (3 * p * p) * hv)
        if stream.name in ("global", "local"):
            _add(parts, "vision_map_head", stream.views * map_head_flops(stream.seq, hv, v.ffn_hidden_size))

    mm, attn = layer_flops(t.context_length, ht, t.ffn_hidden_size)
    parts["text_layers_matmul"] = streams.texts * t.num_layers * mm
    parts["text_layers_attention"] = streams.texts * t.num_layers * attn
    parts["text_head"] = streams.texts * 2 * ht * e

    if streams.mae_visible:
        dec = m.mae_decoder
        d = dec.hidden_size or hv
        mm, attn = layer_flops(streams.patches, d, dec.ffn_hidden_size or v.ffn_hidden_size)
        masked = streams.patches - streams.mae_visible
        parts["mae_decoder_matmul"] = (2 * streams.mae_visible * hv * d + dec.num_layers * mm
                                       + 2 * masked * d * 3 * p * p)
        parts["mae_decoder_attention"] = dec.num_layers * attn
    if streams.text_recon:
        dec = m.text_decoder
        d, L = dec.hidden_size or ht, t.context_length
        mm, attn = layer_flops(L, d, dec.ffn_hidden_size or t.ffn_hidden_size)
        parts["text_decoder_matmul"] = 2 * e * d + dec.num_layers * mm + 2 * L * d * t.vocab_size
        parts["text_decoder_attention"] = dec.num_layers * attn
    if streams.locca_regions:
        _locca_flops(cfg, streams, parts)
    if streams.teacher_view:
        _distill_flops(cfg, streams, parts)
    if w.aug_contrastive > 0:
        hidden = m.aug_projector_hidden
        parts["aug_projector"] = 2 * (2 * e * hidden + 2 * hidden * e)
    if contrastive_batch is not None:
        terms = len(contrastive_terms_on(cfg))
        parts["contrastive_logits"] = terms * 2 * e * contrastive_batch
    return FlopCount(parts)


def locca_vocab_size(cfg) -> int:
    """The LocCa decoder's vocabulary (losses/locca.LoccaVocab): text ids, location bins, three
    task tokens and the mask token, padded to a multiple of TP."""
    n = cfg.model.text.vocab_size + cfg.loss.locca.box_bins + 4
    tp = cfg.parallel.tensor_parallel
    return -(-n // tp) * tp


def locca_sequence(cfg) -> int:
    """Positions of every LocCa sequence of the recipe (rounded to TP under sequence parallel)."""
    par = cfg.parallel
    return decoder_length(cfg.model.text.context_length, par.tensor_parallel if par.sequence_parallel else 1)


def _locca_flops(cfg, streams: Streams, parts: dict[str, int]) -> None:
    """The LocCa decoder (models/decoders.LoccaDecoder) on one image: the context projection of
    its P patch tokens, then 3 sequences of Ld positions, each layer a causal self-attention
    layer plus cross-attention to the P tokens (q and out projections on Ld, k/v on P, scores
    and weighted sum Ld x P), and the output layer onto the decoder vocabulary."""
    dec, hv, ht = cfg.model.locca_decoder, cfg.model.vision.hidden_size, cfg.model.text.hidden_size
    d = dec.hidden_size or ht
    seq = locca_sequence(cfg)
    P, tasks = streams.patches, 3
    mm, attn = layer_flops(seq, d, dec.ffn_hidden_size or cfg.model.text.ffn_hidden_size)
    cross_mm = 2 * seq * d * d + 2 * P * d * 2 * d + 2 * seq * d * d
    cross_attn = 2 * seq * P * d + 2 * seq * P * d
    parts["locca_decoder_matmul"] = (2 * P * hv * d + tasks * dec.num_layers * (mm + cross_mm)
                                     + tasks * 2 * seq * d * locca_vocab_size(cfg))
    parts["locca_decoder_attention"] = tasks * dec.num_layers * (attn + cross_attn)


def _distill_flops(cfg, streams: Streams, parts: dict[str, int]) -> None:
    """The EMA-teacher terms' heads (models/tulip._distill_outputs): self_distill runs the
    student's distill_head on every local crop's pooled embedding and the teacher's MAP head +
    distill head on the teacher view; masked_prediction runs patch_head on the student's
    masked patches and the teacher's patch head on the same patches of its tokens."""
    v, d, heads = cfg.model.vision, cfg.loss.distill, model_heads(cfg)
    head = distill_head_flops(v.hidden_size, d.head_hidden, d.head_bottleneck, d.prototypes)
    teacher_heads = 0
    if heads.distill_head:
        parts["distill_head"] = streams.local_crops * head
        parts["teacher_map_head"] = map_head_flops(streams.patches, v.hidden_size, v.ffn_hidden_size)
        teacher_heads += head
    if heads.patch_head and streams.masked_patches:
        parts["patch_head"] = streams.masked_patches * head
        teacher_heads += streams.masked_patches * head
    parts["teacher_heads"] = teacher_heads


def model_flops_between(cfg, layout: RunLayout, first: int, last: int) -> float:
    """Mean training FLOPs per sample of the steps that follow `first` ... `last - 1` completed
    steps (a logging window): the streams change at `layout.distill_start`, when the EMA
    teacher and its student views start to cost compute, so MFU must count what each step ran."""
    steps = range(first, max(last, first + 1))
    if layout.distill_start is None:
        return float(count_flops(cfg, layout.streams, layout.contrastive_batch).training)
    before = sum(1 for s in steps if s < layout.distill_start)
    flops = [count_flops(cfg, layout.streams_at(s), layout.contrastive_batch).training
             for s in (layout.distill_start - 1, layout.distill_start)]
    return (before * flops[0] + (len(steps) - before) * flops[1]) / len(steps)


def tokens_per_sample(cfg, streams: Streams) -> int:
    """Tokens one sample feeds through the two towers (every view and every text of
    `streams`): the unit of `tokens_per_sec`."""
    return sum(s.views * s.seq for s in streams.vision) + streams.texts * cfg.model.text.context_length


def embedding_cache_flops(cfg, layout: RunLayout) -> int:
    """Forward FLOPs per sample of the embedding-cache pass (the contrastive streams only);
    0 when the layout does not run it."""
    if not layout.embedding_cache:
        return 0
    return count_flops(cfg, layout.streams.contrastive_only()).forward


def contrastive_batch_line(mode: str, contrastive_batch: int, accumulation: int, cache_flops: float,
                           model_flops: float) -> str:
    """How many pairs each contrastive term compares, and what that costs (start-up log and
    `tulip-mega plan`). cache_flops / model_flops: per sample, from `embedding_cache_flops` and
    `count_flops(...).training`."""
    if mode == "micro":
        return f"contrastive batch {contrastive_batch} = micro x DP per micro-step (loss.contrastive_batch=micro)"
    if not cache_flops:
        return f"contrastive batch {contrastive_batch} = the global batch (one micro-batch per step)"
    return (f"contrastive batch {contrastive_batch} = the global batch (loss.contrastive_batch=global): "
            f"embedding cache over {accumulation} accumulation steps, +1 forward of the contrastive streams "
            f"= +{cache_flops / 1e9:.3f} GFLOP per pair "
            f"(+{cache_flops / model_flops:.0%} over training FLOPs)")

