"""Which layers of each tower every pipeline stage holds (`parallel.pipeline_split`).

Every stage holds a contiguous slice of the vision layers AND a contiguous slice of the text
layers (models/tulip.py packs both towers' activations into one p2p tensor). A split is one
`(vision, text)` layer count per stage:

  * `even`: today's behaviour, num_layers / PP of each tower per stage (when PP does not
    divide a tower, the first stages get one layer more);
  * `balanced` (default): the counts of both towers chosen jointly so that the slowest stage
    is as fast as possible, by the training FLOPs of `tulip_mega.training.flops` (recompute
    and the embedding-cache forward included: they are time the stage spends). Stage 0 also
    pays the patch embedding, the last stage the MAP head, the text head, the reconstruction
    decoders and the aug projectors;
  * an explicit list `[[v0, t0], [v1, t1], ...]`, one pair per stage.

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

from dataclasses import dataclass
from typing import Optional, Sequence

Split = tuple[tuple[int, int], ...]  # per stage (vision layers, text layers)


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
    from tulip_mega.training.flops import TRAINING_MULTIPLIER, count_flops

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


def even_split(vision: int, text: int, stages: int) -> Split:
    """num_layers / stages per stage; the first `num_layers % stages` stages get one more."""
    def share(n: int, i: int) -> int:
        return n // stages + (1 if i < n % stages else 0)

    return tuple((share(vision, i), share(text, i)) for i in range(stages))


def _greedy(costs: StageCosts, vision: int, text: int, stages: int, bound: float,
            vision_first: bool) -> Optional[Split]:
    """Fill stages in order up to `bound` FLOPs, one tower first, keeping one layer in reserve
    for every later stage; None when the layers do not fit."""
    out = []
    v_left, t_left = vision, text
    for i in range(stages):
        cap = bound - costs.stage(i, stages, 0, 0)
        reserve = stages - i - 1  # one layer for each later stage
        order = [("v", costs.vision_layer), ("t", costs.text_layer)]
        if not vision_first:
            order.reverse()
        take = {"v": 0, "t": 0}
        for name, unit in order:
            left = v_left if name == "v" else t_left
            other_left = t_left if name == "v" else v_left
            spare = max(0, reserve - other_left)  # layers of this tower the later stages need
            n = min(left - spare, int(cap // unit) if unit > 0 else left)
            if i == stages - 1:
                n = left  # the last stage takes the rest (checked against the bound below)
            n = max(n, 0)
            take[name] = n
            cap -= n * unit
            if name == "v":
                v_left -= n
            else:
                t_left -= n
        if take["v"] + take["t"] == 0:
            return None
        out.append((take["v"], take["t"]))
    split = tuple(out)
    if v_left or t_left or max(costs.stages(split)) > bound * (1 + 1e-12):
        return None
    return split


def balanced_split(costs: StageCosts, vision: int, text: int, stages: int) -> Split:
    """The split whose slowest stage is fastest (FLOPs of `costs`), every stage holding at
    least one layer. Scans the candidate bottlenecks (every first/middle/last stage cost
    e + a*vision_layer + b*text_layer) upwards from the average and takes the first that a
    stage-by-stage fill (vision first, or text first) meets; exact for the instances we test
    and instant for 48 x 24 layers on 64 stages."""
    if vision + text < stages:
        raise ValueError(f"{vision} + {text} layers cannot fill {stages} pipeline stages")
    if stages == 1:
        return ((vision, text),)
    total = costs.first + costs.last + vision * costs.vision_layer + text * costs.text_layer
    lower = max(total / stages, costs.first, costs.last)
    ends = {costs.first, costs.last, 0.0}  # the extra work of the first, last and middle stages
    candidates = sorted({e + a * costs.vision_layer + b * costs.text_layer
                         for e in ends for a in range(vision + 1) for b in range(text + 1)})
    for bound in candidates:
        if bound < lower * (1 - 1e-12):
            continue
        found = [s for s in (_greedy(costs, vision, text, stages, bound, True),
                             _greedy(costs, vision, text, stages, bound, False)) if s is not None]
        if found:
            return min(found, key=lambda s: max(costs.stages(s)))
    return even_split(vision, text, stages)  # unreachable: the largest bound fits everything


def resolve_split(cfg, stages: Optional[int] = None) -> Split:
    """The recipe's split as per-stage (vision, text) counts (`parallel.pipeline_split`)."""
    stages = stages or cfg.parallel.pipeline_parallel
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
    """Raise ValueError naming `parallel.pipeline_split` when the split cannot run; return it."""
    stages = cfg.parallel.pipeline_parallel
    vision, text = cfg.model.vision.num_layers, cfg.model.text.num_layers
    choice = cfg.parallel.pipeline_split
    key = "parallel.pipeline_split"
    if vision + text < stages:
        raise ValueError(f"{key}: model.vision.num_layers={vision} + model.text.num_layers={text} layers cannot "
                         f"fill parallel.pipeline_parallel={stages} stages (each stage needs a layer of a tower)")
    if not isinstance(choice, str):
        if len(choice) != stages:
            raise ValueError(f"{key} lists {len(choice)} stages, but parallel.pipeline_parallel={stages}")
        if any(v < 0 or t < 0 for v, t in choice):
            raise ValueError(f"{key}={_show(choice)}: layer counts must be >= 0")
        for name, col, total in (("model.vision.num_layers", 0, vision), ("model.text.num_layers", 1, text)):
            got = sum(pair[col] for pair in choice)
            if got != total:
                raise ValueError(f"{key}={_show(choice)}: the {name.split('.')[1]} counts sum to {got}, "
                                 f"but {name}={total}")
    split = resolve_split(cfg)
    empty = [i for i, (v, t) in enumerate(split) if v + t == 0]
    if empty:
        raise ValueError(f"{key}={_show(split)}: stage {empty[0]} would hold no layer of either tower")
    return split


def _show(split: Sequence[Sequence[int]]) -> str:
    return "[" + ", ".join(f"[{v}, {t}]" for v, t in split) + "]"


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


def needs_layout(split: Split, vision: int, text: int) -> bool:
    """False when the split is megatron's default (num_layers / PP of both towers per stage):
    then no layout is set and the model is exactly what it was before splits existed."""
    stages = len(split)
    return not (vision % stages == 0 and text % stages == 0 and split == even_split(vision, text, stages))
