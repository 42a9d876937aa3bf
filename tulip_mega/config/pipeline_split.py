"""The shape of `parallel.pipeline_split`, checked with the rest of the recipe.

Pure arithmetic on the recipe: the `even` split and the structure of an explicit
`[[vision, text], ...]` list. Choosing a `balanced` split needs the FLOP model and lives in
`tulip_mega/models/pipeline_split.py`, which builds on this module (config must not import
models or training: see tests/unit/test_structure.py).
"""

from __future__ import annotations

from typing import Sequence

Split = tuple[tuple[int, int], ...]  # per stage / chunk (vision layers, text layers)

KEY = "parallel.pipeline_split"


def num_chunks(cfg) -> int:
    """How many model chunks the split fills: one per pipeline stage, or PP x
    `parallel.virtual_pipeline` under interleaving (in megatron's order: chunk 0 of every
    rank, then chunk 1 of every rank, ...)."""
    return cfg.parallel.pipeline_parallel * cfg.parallel.virtual_pipeline


def _stages_name(cfg) -> str:
    """The keys that set the number of chunks, as an error message names them."""
    pp, v = cfg.parallel.pipeline_parallel, cfg.parallel.virtual_pipeline
    if v == 1:
        return f"parallel.pipeline_parallel={pp} stages"
    return f"parallel.pipeline_parallel={pp} x parallel.virtual_pipeline={v} = {pp * v} chunks"


def even_split(vision: int, text: int, stages: int) -> Split:
    """num_layers / stages per stage; the first `num_layers % stages` stages get one more."""
    def share(n: int, i: int) -> int:
        return n // stages + (1 if i < n % stages else 0)

    return tuple((share(vision, i), share(text, i)) for i in range(stages))


def show_split(split: Sequence[Sequence[int]]) -> str:
    return "[" + ", ".join(f"[{v}, {t}]" for v, t in split) + "]"


def check_split_choice(cfg) -> None:
    """Raise ValueError naming `parallel.pipeline_split` when the layers cannot fill the stages
    or an explicit list does not match the stages and the towers' depths."""
    stages = num_chunks(cfg)
    vision, text = cfg.model.vision.num_layers, cfg.model.text.num_layers
    choice = cfg.parallel.pipeline_split
    what = "stage" if cfg.parallel.virtual_pipeline == 1 else "chunk"
    if vision + text < stages:
        raise ValueError(f"{KEY}: model.vision.num_layers={vision} + model.text.num_layers={text} layers cannot "
                         f"fill {_stages_name(cfg)} (each {what} needs a layer of a tower)")
    if isinstance(choice, str):
        if choice == "even" and cfg.parallel.virtual_pipeline > 1:  # an even share may leave a chunk empty
            _refuse_empty(even_split(vision, text, stages), what, choice)
        return
    if len(choice) != stages:
        if cfg.parallel.virtual_pipeline == 1:
            raise ValueError(f"{KEY} lists {len(choice)} stages, but parallel.pipeline_parallel={stages}")
        raise ValueError(f"{KEY} lists {len(choice)} pairs, but {_stages_name(cfg)} need one pair per chunk "
                         "(chunk 0 of every rank, then chunk 1, ...)")
    if any(v < 0 or t < 0 for v, t in choice):
        raise ValueError(f"{KEY}={show_split(choice)}: layer counts must be >= 0")
    for name, col, total in (("model.vision.num_layers", 0, vision), ("model.text.num_layers", 1, text)):
        got = sum(pair[col] for pair in choice)
        if got != total:
            raise ValueError(f"{KEY}={show_split(choice)}: the {name.split('.')[1]} counts sum to {got}, "
                             f"but {name}={total}")
    _refuse_empty(choice, what, show_split(choice))


def _refuse_empty(split, what: str, name: str) -> None:
    """A stage (chunk) with no layer of either tower would only forward the packed tensor;
    refused (see tulip_mega/models/pipeline_split.py)."""
    empty = [i for i, (v, t) in enumerate(split) if v + t == 0]
    if empty:
        raise ValueError(f"{KEY}={name}: {what} {empty[0]} would hold no layer of either tower")


def structural_split(cfg) -> Split | None:
    """The split when it is known without the FLOP model (`even` or an explicit list); None
    for `balanced`."""
    choice = cfg.parallel.pipeline_split
    if choice == "even":
        return even_split(cfg.model.vision.num_layers, cfg.model.text.num_layers, num_chunks(cfg))
    if choice == "balanced":
        return None
    return tuple((int(v), int(t)) for v, t in choice)


def check_recompute_fits(cfg, split: Split) -> None:
    """Full recompute of `recompute.num_layers` layers per stage (per chunk under interleaving:
    megatron recomputes within each chunk's block) needs that many layers on the fullest stage
    of each tower; ValueError naming the keys otherwise."""
    if cfg.recompute.granularity != "full":
        return
    for col, (key, layers) in enumerate((("model.vision.num_layers", cfg.model.vision.num_layers),
                                         ("model.text.num_layers", cfg.model.text.num_layers))):
        per_stage = max(pair[col] for pair in split)
        if cfg.recompute.num_layers > per_stage:
            choice = cfg.parallel.pipeline_split
            name = choice if isinstance(choice, str) else show_split(choice)
            raise ValueError(
                f"recompute.num_layers={cfg.recompute.num_layers} exceeds the {per_stage} layers of the fullest "
                f"pipeline stage of {key.rsplit('.', 1)[0]} ({layers} layers over {len(split)} stages, "
                f"{KEY}={name})")
