"""Which layers of each tower every pipeline stage holds (`parallel.pipeline_split`).

Every stage holds a contiguous slice of the vision layers AND of the text layers
(models/tulip.py packs both towers' activations into one p2p tensor). A split is one
`(vision, text)` layer count per stage: `even` (num_layers / PP per stage, the first stages
taking the remainder), `balanced` (both towers' counts chosen jointly so that the slowest
stage is as fast as possible by the training FLOPs of `tulip_mega.flops`, recompute and the
embedding-cache forward included; stage 0 also pays the patch embedding, the last stage the
heads and decoders) or an explicit `[[v0, t0], [v1, t1], ...]`.

Under interleaving (`parallel.virtual_pipeline` = v > 1) the split has one pair per chunk,
PP x v of them in megatron's order (chunk 0 of every rank, then chunk 1, ...), the order the
layers run in. A chunk empty of both towers is refused. megatron learns the split through
each tower's `pipeline_model_parallel_layout` (`RunLayout.tower_layout`), which also numbers
the layers globally, so checkpoints reshard between any two splits.

`validate_split` runs once per process, from `tulip_mega.launch.resolve_layout`. Pure
Python, no torch: config validation and `plan` import it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

from tulip_mega.config import ConfigError
from tulip_mega.config.pipeline_split import (Split, check_recompute_fits, check_split_choice, even_split, num_chunks,
                                              show_split)
from tulip_mega.config.streams import Streams, contrastive_terms_on
from tulip_mega.flops import TEACHER_PREFIX, TRAINING_MULTIPLIER, count_flops

__all__ = ["Split", "even_split", "show_split"]  # re-exported: callers import the split from here


@dataclass(frozen=True)
class StageCosts:
    """Training FLOPs per sample that a stage spends: per layer of each tower, plus the extras
    only the first stage (patch embedding) and the last stage (heads, decoders) run."""

    vision_layer: float
    text_layer: float
    first: float
    last: float

    def stage(self, index: int, stages: int, vision: int, text: int) -> float:
        cost = vision * self.vision_layer + text * self.text_layer
        if index == 0:
            cost += self.first
        if index == stages - 1:
            cost += self.last
        return cost

    def stages(self, split: Split) -> list[float]:
        return [self.stage(i, len(split), v, t) for i, (v, t) in enumerate(split)]


_LAYER_PARTS = {"vision": ("vision_layers_matmul", "vision_layers_attention"),
                "text": ("text_layers_matmul", "text_layers_attention")}


def stage_costs(cfg, streams: Streams) -> StageCosts:
    """The per-layer and per-end costs of the recipe `cfg` (resolved) feeding `streams`, in
    training FLOPs per sample as the GPU runs them: 3 x forward, + one forward under full
    recompute, + the attention scores under selective recompute, + the embedding-cache forward
    of the contrastive streams under `loss.contrastive_batch=global` (assumed to accumulate:
    the split must not depend on the number of nodes)."""
    layers = {"vision": cfg.model.vision.num_layers, "text": cfg.model.text.num_layers}
    rc = cfg.recompute.granularity
    per_layer, first, last = _split_parts(count_flops(cfg, streams).parts, layers, rc, TRAINING_MULTIPLIER)
    if cfg.loss.contrastive_batch == "global" and contrastive_terms_on(cfg):
        cache = count_flops(cfg, streams.contrastive_only()).parts
        c_layer, c_first, c_last = _split_parts(cache, layers, None, 1)
        per_layer = {k: per_layer[k] + c_layer[k] for k in per_layer}
        first, last = first + c_first, last + c_last
    return StageCosts(per_layer["vision"], per_layer["text"], first, last)


def _split_parts(parts: dict[str, int], layers: dict[str, int], recompute: Optional[str],
                 multiplier: int) -> tuple[dict[str, float], float, float]:
    """(FLOPs per layer of each tower, first-stage extras, last-stage extras) of forward FLOP
    `parts`, times `multiplier`, plus what `recompute` re-runs of the layers."""
    per_layer = {}
    for tower, (mm, attn) in _LAYER_PARTS.items():
        fwd = parts.get(mm, 0) + parts.get(attn, 0)
        extra = fwd if recompute == "full" else parts.get(attn, 0) if recompute == "selective" else 0
        per_layer[tower] = (multiplier * fwd + extra) / max(layers[tower], 1)
    # The EMA teacher (keys teacher_*): forward only, never recomputed, its layers beside the
    # student's vision layers on every stage, its patch embedding on the first.
    teacher_layers = parts.get("teacher_layers_matmul", 0) + parts.get("teacher_layers_attention", 0)
    per_layer["vision"] += teacher_layers / max(layers["vision"], 1)
    first = multiplier * parts.get("vision_patch_embed", 0) + parts.get("teacher_patch_embed", 0)
    layer_keys = {k for pair in _LAYER_PARTS.values() for k in pair}
    placed = layer_keys | {"vision_patch_embed", "contrastive_logits", "teacher_layers_matmul",
                           "teacher_layers_attention", "teacher_patch_embed"}
    last = sum((1 if k.startswith(TEACHER_PREFIX) else multiplier) * v for k, v in parts.items() if k not in placed)
    return per_layer, first, last


def _fits(costs: StageCosts, vision: int, text: int, stages: int, bound: float) -> Optional[Split]:
    """A split whose every stage costs at most `bound` and holds at least one layer, or None.

    Exact: for given vision counts v_i, stage i can take any text count in
    [lo_i, hi_i] with hi_i = floor((bound - extras_i - v_i * vision_layer) / text_layer) and
    lo_i = 1 if v_i == 0 else 0, so some text split exists iff sum lo <= text <= sum hi. A
    dynamic programme over stages with state (vision layers placed, vision-free stages so far)
    keeps the largest sum hi and the choice that gave it."""
    eps = bound * 1e-12

    def hi(i: int, v: int) -> int:
        room = bound + eps - costs.stage(i, stages, v, 0)
        if room < 0:
            return -1
        return int(room // costs.text_layer) if costs.text_layer > 0 else text

    # state (vision placed, vision-free stages) -> (best sum hi, back-pointer)
    layer: dict[tuple[int, int], tuple[int, Optional[tuple]]] = {(0, 0): (0, None)}
    history = []
    for i in range(stages):
        nxt: dict[tuple[int, int], tuple[int, Optional[tuple]]] = {}
        for (a, empty), (total, _) in layer.items():
            for v in range(0, vision - a + 1):
                h = hi(i, v)
                if h < 0:
                    break  # more vision layers only cost more
                h = min(h, text)
                key = (a + v, empty + (v == 0))
                if v == 0 and h < 1:
                    continue  # a vision-free stage needs a text layer
                if key not in nxt or nxt[key][0] < total + h:
                    nxt[key] = (total + h, (a, empty, v))
        history.append(nxt)
        layer = nxt
    best = None
    for (a, empty), (total, _) in layer.items():
        if a == vision and empty <= text <= total:
            best = (a, empty)
            break
    if best is None:
        return None
    vis = []
    key = best
    for i in range(stages - 1, -1, -1):
        a, empty, v = history[i][key][1]
        vis.append(v)
        key = (a, empty)
    vis.reverse()
    texts = [1 if v == 0 else 0 for v in vis]
    spare = text - sum(texts)
    for i, v in enumerate(vis):  # fill up to each stage's room, last stages last
        add = min(spare, min(hi(i, v), text) - texts[i])
        texts[i] += add
        spare -= add
    return tuple(zip(vis, texts))


@functools.lru_cache(maxsize=64)
def balanced_split(costs: StageCosts, vision: int, text: int, stages: int) -> Split:
    """The split whose slowest stage is fastest (FLOPs of `costs`), every stage holding at
    least one layer: a binary search over the candidate bottlenecks (every first / middle /
    last stage cost e + a * vision_layer + b * text_layer) with the exact test `_fits`. The
    even split wins ties."""
    if vision + text < stages:
        raise ValueError(f"{vision} + {text} layers cannot fill {stages} pipeline stages")
    if stages == 1:
        return ((vision, text),)
    total = costs.first + costs.last + vision * costs.vision_layer + text * costs.text_layer
    lower = max(total / stages, costs.first, costs.last)
    ends = {costs.first, costs.last, 0.0}  # the extra work of the first, last and middle stages
    candidates = sorted(c for c in {e + a * costs.vision_layer + b * costs.text_layer
                                    for e in ends for a in range(vision + 1) for b in range(text + 1)}
                        if c >= lower * (1 - 1e-12))
    lo, hi_ = 0, len(candidates) - 1
    found = _fits(costs, vision, text, stages, candidates[hi_])
    while lo < hi_:
        mid = (lo + hi_) // 2
        split = _fits(costs, vision, text, stages, candidates[mid])
        if split is None:
            lo = mid + 1
        else:
            hi_, found = mid, split
    # On a tie keep the even split: the same speed, and the model megatron builds by default.
    even = even_split(vision, text, stages)
    if all(v + t for v, t in even) and max(costs.stages(even)) <= max(costs.stages(found)) * (1 + 1e-12):
        return even
    return found


def resolve_split(cfg, streams: Streams, stages: Optional[int] = None) -> Split:
    """The recipe's split as per-stage (vision, text) counts (`parallel.pipeline_split`); under
    interleaving per chunk, PP x `parallel.virtual_pipeline` of them in megatron's order.
    `streams`: the run's input streams (they price the layers of a `balanced` split);
    `stages` overrides the count of stages."""
    stages = stages or num_chunks(cfg)
    vision, text = cfg.model.vision.num_layers, cfg.model.text.num_layers
    choice = cfg.parallel.pipeline_split
    if choice == "even":
        return even_split(vision, text, stages)
    if choice == "balanced":
        if stages == 1:
            return ((vision, text),)
        return balanced_split(stage_costs(cfg, streams), vision, text, stages)
    return tuple((int(v), int(t)) for v, t in choice)


def validate_split(cfg, streams: Streams) -> Split:
    """The recipe's resolved split; raises ConfigError naming `parallel.pipeline_split` when it
    cannot run. The structure of an explicit list is checked with the rest of the recipe
    (`tulip_mega.config.pipeline_split.check_split_choice`); what needs the FLOP model (a
    `balanced` split) is checked here, once per process by `tulip_mega.launch.resolve_layout`."""
    try:
        check_split_choice(cfg)
        split = resolve_split(cfg, streams)
        empty = [i for i, (v, t) in enumerate(split) if v + t == 0]
        if empty:
            what = "stage" if cfg.parallel.virtual_pipeline == 1 else "chunk"
            raise ValueError(f"parallel.pipeline_split={show_split(split)}: {what} {empty[0]} would hold no layer of "
                             f"either tower")
        check_recompute_fits(cfg, split)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return split
