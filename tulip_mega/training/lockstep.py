"""The pipeline lockstep check: every stage of a model replica that reads batches must read
the same samples in a step, or targets and GeCo masks would silently pair with the wrong
embeddings. One CRC32 of the keys per micro-batch is all-gathered over the pipeline group
(cheap); the keys themselves travel only on a mismatch, to name the first differing one."""

from __future__ import annotations

import zlib
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from tulip_mega.parallel.init import device
from tulip_mega.training.errors import PipelineDataMismatch


def check_lockstep(keys: Optional[list[list[str]]], num_microbatches: int, micro_batch_size: int,
                   step: int) -> None:
    """Raise PipelineDataMismatch on every rank when two reading stages of any replica read
    different samples in optimizer step `step` (1-based). `keys`: this rank's sample keys per
    micro-batch of the step, or None when it read no batches."""
    mine = torch.full((num_microbatches,), -1, dtype=torch.long)
    if keys is not None:
        mine = torch.tensor([zlib.crc32("\0".join(k).encode()) for k in keys], dtype=torch.long)
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    mismatch = False
    if pp > 1:
        group = parallel_state.get_pipeline_model_parallel_group()
        everyone = [torch.empty_like(mine).to(device()) for _ in range(pp)]
        dist.all_gather(everyone, mine.to(device()), group=group)
        rows = [row.cpu() for row in everyone if int(row[0]) >= 0]
        mismatch = any(not torch.equal(row, rows[0]) for row in rows[1:])
    flag = torch.tensor([1.0 if mismatch else 0.0], device=device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if not bool(flag.item()):
        return
    if not mismatch:
        raise PipelineDataMismatch(f"step {step}: pipeline stages of another data-parallel replica read "
                                   "different samples (see that replica's error)")
    flat = [k for micro in keys for k in micro] if keys is not None else None
    everyone_keys: list = [None] * pp
    dist.all_gather_object(everyone_keys, flat, group=parallel_state.get_pipeline_model_parallel_group())
    raise PipelineDataMismatch(first_difference(step, everyone_keys, micro_batch_size))


def first_difference(step: int, keys_by_stage: list, micro: int) -> str:
    """The message for a lockstep failure: the first position where two reading stages differ."""
    readers = [(s, keys) for s, keys in enumerate(keys_by_stage) if keys is not None]
    s0, ref = readers[0]
    for s, keys in readers[1:]:
        for i, (a, b) in enumerate(zip(ref, keys)):
            if a != b:
                return (f"step {step}: pipeline stages read different samples: micro-batch {i // micro}, sample "
                        f"{i % micro}: stage {s0} has key {a!r}, stage {s} has {b!r}. The stages' loaders must "
                        "see the same shards and settings (data.*, run.seed); targets and GeCo masks would misalign")
        if len(ref) != len(keys):
            return (f"step {step}: pipeline stages read different numbers of samples: stage {s0} {len(ref)}, "
                    f"stage {s} {len(keys)}")
    return f"step {step}: pipeline stages read different samples (checksums differ)"
