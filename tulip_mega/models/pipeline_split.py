"""Which layers of each tower every pipeline stage holds (`parallel.pipeline_split`).

Every stage holds a contiguous slice of the vision layers AND a contiguous slice of the text
layers (models/tulip.py packs both towers' activations into one p2p tensor). A split is one
`(vision, text)` layer count per stage:

  * `even`: today's behaviour, num_layers / PP of each tower per stage (when PP does not
    divide a tower, the first stages get one layer more);
  * `balanced` (default): the counts of both towers chosen jointly so that the slowest stage
    is as fast as possible, by the training FLOPs of `tulip_mega.flops` (recompute
    and the embedding-cache forward included: they are time the stage spends). Stage 0 also
    pays the patch embedding, the last stage the MAP head, the text head, the reconstruction
    decoders and the aug projectors;
  * an explicit list `[[v0, t0], [v1, t1], ...]`, one pair per stage.

With interleaved virtual stages (`parallel.virtual_pipeline` = v > 1) every pipeline rank
holds v model chunks and the split has one pair per chunk, PP x v pairs in megatron's order
(virtual-chunk major: chunk 0 of ranks 0..PP-1, then chunk 1 of ranks 0..PP-1, ...), which is
also the order the layers run in. `even` and `balanced` then split the layers over the PP x v
chunks, the first chunk of rank 0 paying the embeddings and the last chunk of the last rank the
heads and losses; every chunk must hold a layer of some tower. A layout is always set under
interleaving (megatron's default would need PP x v to divide both towers).

How megatron-core gets told: each tower is a megatron `TransformerBlock` with its own
`TransformerConfig`, so each tower gets its own `pipeline_model_parallel_layout` (megatron-core
>= 0.13's flexible layout, `PipelineParallelLayerLayout`): stage 0's row is
`["embedding", "decoder" x v0]`, the last stage's `["decoder" x v_last, "loss"]`. megatron then
derives both the layers a stage builds (`get_num_layers_to_build`) and their global layer
numbers (`get_transformer_layer_offset`), which is what `sharded_state_dict` keys checkpoints
by, so checkpoints reshard between any two splits. We use the layout rather than
`num_layers_in_first/last_pipeline_stage` because those only move layers between the first,
the last and equally-sized middle stages. The layout allows a stage with zero layers of one
tower (an empty TransformerBlock passes its input through; megatron clones it on a middle
stage so the schedule never sees its input as its output); a stage empty of BOTH towers is
refused by `validate_split` (it would only forward the packed tensor). With `even` and PP
dividing both towers no layout is set at all: megatron's default split, bit-identical to
before this option existed.

Pure Python, no torch: config validation and `plan` import it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

from tulip_mega.config.pipeline_split import (Split, check_recompute_fits, check_split_choice, even_split, num_chunks,
                                              show_split)

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


def stage_costs(cfg) -> StageCosts:
    """The per-layer and per-end costs of the recipe `cfg` (resolved), in training FLOPs per
    sample as the GPU runs them: 3 x forward, + one forward under full recompute, + the
    attention scores under selective recompute, + the embedding-cache forward of the
    contrastive streams under `loss.contrastive_batch=global` (assumed to accumulate: the
    split must not depend on the number of nodes)."""
    from tulip_mega.config.streams import contrastive_terms_on, input_streams
    from tulip_mega.flops import TRAINING_MULTIPLIER, count_flops

    layers = {"vision": cfg.model.vision.num_layers, "text": cfg.model.text.num_layers}
    rc = cfg.recompute.granularity

    def split_parts(parts: dict[str, int], recompute: bool, multiplier: int) -> tuple[dict[str, float], float, float]:
        per_layer = {}
        for tower, (mm, attn) in _LAYER_PARTS.items():
            fwd = parts.get(mm, 0) + parts.get(attn, 0)
            extra = 0
            if recompute and rc == "full":
                extra = fwd
            elif recompute and rc == "selective":
                extra = parts.get(attn, 0)
            per_layer[tower] = (multiplier * fwd + extra) / max(layers[tower], 1)
        first = multiplier * parts.get("vision_patch_embed", 0)
        layer_keys = {k for pair in _LAYER_PARTS.values() for k in pair}
        last = multiplier * sum(v for k, v in parts.items()
                                if k not in layer_keys and k not in ("vision_patch_embed", "contrastive_logits"))
        return per_layer, first, last

    per_layer, first, last = split_parts(count_flops(cfg).parts, True, TRAINING_MULTIPLIER)
    if cfg.loss.contrastive_batch == "global" and contrastive_terms_on(cfg):
        cache = count_flops(cfg, streams=input_streams(cfg).contrastive_only()).parts
        c_layer, c_first, c_last = split_parts(cache, False, 1)
        per_layer = {k: per_layer[k] + c_layer[k] for k in per_layer}
        first, last = first + c_first, last + c_last
    return StageCosts(per_layer["vision"], per_layer["text"], first, last)


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


def resolve_split(cfg, stages: Optional[int] = None) -> Split:
    """The recipe's split as per-stage (vision, text) counts (`parallel.pipeline_split`); under
    interleaving per chunk, PP x `parallel.virtual_pipeline` of them in megatron's order.
    `stages` overrides that count (plan tries other layouts)."""
    stages = stages or num_chunks(cfg)
    vision, text = cfg.model.vision.num_layers, cfg.model.text.num_layers
    choice = cfg.parallel.pipeline_split
    if choice == "even":
        return even_split(vision, text, stages)
    if choice == "balanced":
        if stages == 1:
            return ((vision, text),)
        return balanced_split(stage_costs(cfg), vision, text, stages)
    return tuple((int(v), int(t)) for v, t in choice)


def validate_split(cfg) -> Split:
    """The recipe's resolved split; raises ConfigError naming `parallel.pipeline_split` when it
    cannot run. The structure of an explicit list is checked with the rest of the recipe
    (`tulip_mega.config.pipeline_split.check_split_choice`); what needs the FLOP model (a
    `balanced` split) is checked here, when the model is built and by `plan`."""
    from tulip_mega.config import ConfigError

    try:
        check_split_choice(cfg)
        split = resolve_split(cfg)
        empty = [i for i, (v, t) in enumerate(split) if v + t == 0]
        if empty:
            what = "stage" if cfg.parallel.virtual_pipeline == 1 else "chunk"
            raise ValueError(f"parallel.pipeline_split={show_split(split)}: {what} {empty[0]} would hold no layer of "
                             f"either tower")
        check_recompute_fits(cfg, split)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return split


def tower_layout(split: Split, tower: str, virtual: int = 1) -> list[list[str]]:
    """megatron's `pipeline_model_parallel_layout` (list form) for one tower: one row per
    (virtual) stage in megatron's order (virtual chunk major), `embedding` opening stage 0 and
    `loss` closing the last stage, as megatron's layout validation requires. With `virtual`
    > 1, `split` lists the pp * virtual chunks in that same order."""
    col = 0 if tower == "vision" else 1
    rows = [["decoder"] * pair[col] for pair in split]
    rows[0] = ["embedding"] + rows[0]
    rows[-1] = rows[-1] + ["loss"]
    return rows


def needs_layout(split: Split, vision: int, text: int, virtual: int = 1) -> bool:
    """False when the split is megatron's default (num_layers / PP of both towers per stage):
    then no layout is set and the model is exactly what it was before splits existed. Always
    True under interleaving (`virtual` > 1): the layout is how megatron learns the chunks."""
    if virtual > 1:
        return True
    stages = len(split)
    return not (vision % stages == 0 and text % stages == 0 and split == even_split(vision, text, stages))
