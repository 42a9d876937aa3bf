"""Parameter counts and per-layer activation memory of the two towers, from the recipe alone.

Pure arithmetic (no torch) shared by `tulip_mega/plan.py` (whole-model memory, MFU) and
`tulip_mega/plan_stages.py` (the same formulas per pipeline stage); a test checks the counts
against the built model.
"""

from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class Tower:
    name: str
    layers: int
    hidden: int
    ffn: int
    heads: int
    seq: int

    @property
    def layer_sharded_params(self) -> int:
        h, f = self.hidden, self.ffn
        return 4 * h * h + 2 * h * f + 4 * h + f

    @property
    def layer_replicated_params(self) -> int:
        return 5 * self.hidden

    @property
    def layer_params(self) -> int:
        return self.layer_sharded_params + self.layer_replicated_params

    def layer_activation_bytes(self, micro_batch: int, tp: int, sp: bool, recompute: Optional[str],
                               bytes_per_value: int = 2) -> float:
        """Korthikanti et al. per-layer activation memory (their constants assume 16-bit values)."""
        s, b, h, f, a = self.seq, micro_batch, self.hidden, self.ffn, self.heads
        scores = 5 * a * s * s * b / tp
        if recompute == "full":
            return 2 * s * b * h / (tp if sp else 1) * bytes_per_value / 2
        if sp:
            linear = s * b * (18 * h + 4 * f) / tp
        else:
            linear = s * b * (10 * h + (8 * h + 4 * f) / tp)
        if recompute == "selective":
            scores = 0.0
        return (linear + scores) * bytes_per_value / 2


def towers(cfg) -> tuple[Tower, Tower]:
    v, t = cfg.model.vision, cfg.model.text
    return (Tower("vision", v.num_layers, v.hidden_size, v.ffn_hidden_size, v.num_heads, v.seq_length),
            Tower("text", t.num_layers, t.hidden_size, t.ffn_hidden_size, t.num_heads, t.context_length))


def param_counts(cfg) -> dict[str, int]:
    """Exact parameter counts of the model's parts (matches tulip_mega/models)."""
    v, t = cfg.model.vision, cfg.model.text
    vt, tt = towers(cfg)
    hv, ht = v.hidden_size, t.hidden_size
    return {
        "vision_embed": 3 * v.patch_size**2 * hv + hv + v.seq_length * hv,
        "vision_layers": vt.layers * vt.layer_params,
        "vision_final_ln": 2 * hv,
        # probe + MultiheadAttention (in_proj 3h^2+3h, out_proj h^2+h) + LN + MLP
        "vision_map_head": hv + 4 * hv * hv + 4 * hv + 2 * hv + 2 * hv * v.ffn_hidden_size + v.ffn_hidden_size + hv,
        "text_embed": t.vocab_size * ht + t.context_length * ht,
        "text_layers": tt.layers * tt.layer_params,
        "text_final_ln": 2 * ht,
        "text_head": ht * hv + hv,
        "logit_scale_bias": 2,
    }


def distill_head_params(cfg) -> int:
    """One DINO projection head (models/decoders.DistillHead): three biased linears, then the
    bias-free prototype layer."""
    e, d = cfg.model.vision.hidden_size, cfg.loss.distill
    h, b = d.head_hidden, d.head_bottleneck
    return e * h + h + h * h + h + h * b + b + b * d.prototypes


def distill_param_counts(cfg) -> dict[str, int]:
    """Parameters of the self-distillation terms (models/tulip.py), split by where they live and
    how they are kept; empty when both terms are off. Student parts (trained, replicated):
    distill_head, patch_head (last stage), distill_mask_token (stage 0). Teacher parts (float32,
    frozen: no gradient, no optimizer state): a copy of the vision tower's layers (TP-sharded
    like the student's, on every stage), its patch embedding (stage 0), its final LayerNorm,
    MAP head and the teacher copies of the heads (last stage)."""
    w = cfg.loss.weights
    distill, patch = w.self_distill > 0, w.masked_prediction > 0
    if not (distill or patch):
        return {}
    counts = param_counts(cfg)
    head = distill_head_params(cfg)
    heads = head * (int(distill) + int(patch))
    return {
        "distill_heads": heads,
        "distill_mask_token": cfg.model.vision.hidden_size if patch else 0,
        "teacher_vision_embed": counts["vision_embed"],
        "teacher_vision_layers": counts["vision_layers"],
        "teacher_vision_final_ln": counts["vision_final_ln"],
        "teacher_vision_map_head": counts["vision_map_head"],
        "teacher_heads": heads,
    }
