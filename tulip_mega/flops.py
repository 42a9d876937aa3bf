"""Model FLOPs per image-text sample, computed from the architecture: the one source for
`plan`, the training loop's TFLOP/s and MFU, and benchmarks/train_step.py.

A formula, not a profiler: MFU is defined against the FLOPs the model needs (matmuls only,
training = 3 x forward, recompute and the embedding cache's extra forward reported beside it,
not in it). The formulas are in docs/training.md "FLOP and memory model". Pure Python, no
torch: `plan` stays instant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from tulip_mega.config.streams import Streams, contrastive_terms_on

if TYPE_CHECKING:
    from tulip_mega.config.run_layout import RunLayout

TRAINING_MULTIPLIER = 3  # forward + backward (2x forward); recompute not counted


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


@dataclass(frozen=True)
class FlopCount:
    """Forward FLOPs per sample by part; totals for forward and training."""

    parts: dict[str, int]

    @property
    def forward(self) -> int:
        return sum(self.parts.values())

    @property
    def training(self) -> int:
        """Model FLOPs of one training sample: 3 x forward (recompute excluded)."""
        return TRAINING_MULTIPLIER * self.forward

    @property
    def attention(self) -> int:
        """Forward attention-score FLOPs (what selective recompute runs again)."""
        return sum(v for k, v in self.parts.items() if k.endswith("_attention"))


def _add(parts: dict[str, int], key: str, value: int) -> None:
    parts[key] = parts.get(key, 0) + value


def count_flops(cfg, streams: Streams, contrastive_batch: Optional[int] = None) -> FlopCount:
    """Forward FLOPs of one sample of the recipe `cfg` (resolved) feeding `streams`, by part.

    contrastive_batch: columns of the contrastive logits (`RunLayout.contrastive_batch`);
    None leaves the logits out. Keys: vision_layers_matmul, vision_layers_attention,
    vision_patch_embed, vision_map_head, text_layers_matmul, text_layers_attention, text_head,
    and when switched on mae_decoder_matmul / _attention, text_decoder_matmul / _attention,
    aug_projector, contrastive_logits.
    """
    v, t, m, w = cfg.model.vision, cfg.model.text, cfg.model, cfg.loss.weights
    hv, ht, e, p = v.hidden_size, t.hidden_size, v.hidden_size, v.patch_size
    parts: dict[str, int] = {}

    for stream in streams.vision:
        mm, attn = layer_flops(stream.seq, hv, v.ffn_hidden_size)
        _add(parts, "vision_layers_matmul", stream.views * v.num_layers * mm)
        _add(parts, "vision_layers_attention", stream.views * v.num_layers * attn)
        _add(parts, "vision_patch_embed", stream.views * 2 * stream.seq * (3 * p * p) * hv)
        if stream.name != "mae":
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
    if w.aug_contrastive > 0:
        hidden = m.aug_projector_hidden
        parts["aug_projector"] = 2 * (2 * e * hidden + 2 * hidden * e)
    if contrastive_batch is not None:
        terms = len(contrastive_terms_on(cfg))
        parts["contrastive_logits"] = terms * 2 * e * contrastive_batch
    return FlopCount(parts)


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

