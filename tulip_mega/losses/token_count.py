"""The token count that makes the text reconstruction loss independent of the batch split.

`text_recon` is the mean token cross entropy over the whole step's non-padding tokens. Each
micro-batch's SUMMED cross entropy is divided by N_step / (num_microbatches * dp): megatron
divides each micro-batch loss by num_microbatches and DDP averages over dp, so the gradient is
exactly that of sum(CE) / N_step (a mean of per-micro-batch means would weigh a short caption's
tokens more when few tokens share its micro-batch). The count is summed over DP once per step.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist

__all__ = ["step_token_divisor", "target_token_count"]


def target_token_count(tokens: torch.Tensor, pad_id: int) -> int:
    """Number of targets of `causal_text_loss` that count: entries of `tokens` not equal to pad_id."""
    return int((tokens != pad_id).sum())


def step_token_divisor(token_batches: Iterable[torch.Tensor], pad_id: int, num_microbatches: int,
                       group: Optional[dist.ProcessGroup], device: torch.device) -> float:
    """N_step / (num_microbatches * dp): the divisor of each micro-batch's summed token cross
    entropy (module docstring). `token_batches` are this rank's caption tokens [b, L] of every
    micro-batch of the step; the count is summed over `group` (the data-parallel group; one
    all-reduce, every member must call it). 1.0 when the whole step has no target token (the
    loss is then 0)."""
    local = sum(target_token_count(t, pad_id) for t in token_batches)
    count = torch.tensor([local], dtype=torch.int64, device=device)
    dp = 1
    if group is not None and dist.is_available() and dist.is_initialized():
        dist.all_reduce(count, group=group)
        dp = dist.get_world_size(group)
    total = int(count.item())
    return total / (num_microbatches * dp) if total > 0 else 1.0
