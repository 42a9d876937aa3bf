"""`RunLayout`: how one run is laid out, resolved once at start-up (`tulip_mega.launch`).

Every consumer (loader, model builder, step, loop, eval, reshard, FLOP counter, `plan`) reads
the layout from this one object instead of re-deriving a piece of it from the recipe. Pure
data, no torch: config validation and `plan` use it without a process group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from tulip_mega.config.pipeline_split import Split, even_split
from tulip_mega.config.streams import Streams

Tower = Literal["vision", "text"]


@dataclass(frozen=True)
class RunLayout:
    """Sizes, batch arithmetic, input streams and pipeline split of one run.

    `split` has one (vision layers, text layers) pair per model part in megatron's order
    (virtual-chunk major: PP x virtual pairs). `microbatches` is per step per DP rank.
    """

    world_size: int
    tensor_parallel: int
    pipeline_parallel: int
    virtual_pipeline: int
    data_parallel: int
    micro_batch_size: int
    global_batch_size: int
    microbatches: int
    contrastive_batch: int  # pairs each contrastive term compares per step
    embedding_cache: bool  # the two-pass global contrastive batch (loss.contrastive_batch=global, > 1 micro-batch)
    streams: Streams  # what one step encodes (with the EMA teacher's views once it runs)
    split: Split
    distill_start: Optional[int] = None  # completed steps before the EMA teacher starts; None: no teacher

    def streams_at(self, completed_steps: int) -> Streams:
        """The streams of the step after `completed_steps`: without the EMA teacher's views
        before `distill_start` (they cost no compute until their terms switch on)."""
        if self.distill_start is not None and completed_steps < self.distill_start:
            return self.streams.without_distill()
        return self.streams

    def teacher_running(self, completed_steps: int) -> bool:
        """Whether the step after `completed_steps` runs the EMA teacher."""
        return self.distill_start is not None and completed_steps >= self.distill_start

    @property
    def model_parts(self) -> int:
        """Model parts (virtual stages) each pipeline rank holds."""
        return self.virtual_pipeline

    def tower_layout(self, tower: Tower) -> Optional[list[list[str]]]:
        """megatron's `pipeline_model_parallel_layout` (list form) for one tower: one row per
        (virtual) stage in megatron's order, `embedding` opening the first and `loss` closing
        the last, as megatron's layout validation requires. None where megatron's default
        split is the same (no interleaving, and PP divides both towers evenly): then the
        TransformerConfig carries no layout at all."""
        if self.pipeline_parallel == 1:
            return None
        stages = len(self.split)
        vision, text = (sum(pair[col] for pair in self.split) for col in (0, 1))
        if (self.virtual_pipeline == 1 and vision % stages == 0 and text % stages == 0
                and self.split == even_split(vision, text, stages)):
            return None
        col = 0 if tower == "vision" else 1
        rows = [["decoder"] * pair[col] for pair in self.split]
        rows[0] = ["embedding"] + rows[0]
        rows[-1] = rows[-1] + ["loss"]
        return rows
