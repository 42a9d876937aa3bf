"""A small adapter around megatron's forward-backward schedule (`get_forward_backward_func`:
no pipelining, 1F1B, or interleaved 1F1B with virtual stages).

It builds the schedule config megatron reads its hooks from, decides which model part of this
rank reads the host batches, numbers each part's micro-batches for the forward step, checks
that the pipeline stages agree on the p2p shape, and reduces the last stage's per-micro-batch
reports so that every rank holds the step's values.
"""

from __future__ import annotations

import copy
from functools import partial
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func

from tulip_mega.parallel.init import device


class ScheduledModel(torch.nn.Module):
    """A DDP model part as megatron's schedule sees it: calls and attributes go to the DDP model,
    except `config` (the schedule config: the model's config plus the hooks), `chunk` (this
    part's index on its rank, 0 without interleaving) and `reads` (whether it reads batches)."""

    def __init__(self, model: DistributedDataParallel, config, chunk: int = 0, reads: bool = False) -> None:
        super().__init__()
        self.module = model
        self.config = config
        self.chunk = chunk
        self.reads = reads

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["module"], name)


# forward_step(data_iterator, model part, micro-batch index) -> (output, loss function)
ForwardStep = Callable[[Optional[Iterator], ScheduledModel, int], tuple[Any, Callable]]


class Schedule:
    """megatron's schedule over this rank's model parts, one global batch per `run`."""

    def __init__(self, model_parts: list[DistributedDataParallel], grad_scale_func: Callable,
                 num_microbatches: int, micro_batch_size: int, loss_needs_batch: bool) -> None:
        """`loss_needs_batch`: the last stage's loss reads targets or GeCo masks."""
        self.num_microbatches = num_microbatches
        self.micro_batch_size = micro_batch_size
        self.reader = reading_part([p.module for p in model_parts], loss_needs_batch)
        self._interleaved = len(model_parts) > 1
        self._forward_backward = get_forward_backward_func()
        config = schedule_config(model_parts, grad_scale_func)
        self._parts = [ScheduledModel(p, config, i, i == self.reader) for i, p in enumerate(model_parts)]
        self._micro = [0] * len(model_parts)

    def run(self, data_iterator: Optional[Iterator], forward_step: ForwardStep, seq_length: int,
            forward_only: bool) -> list[dict]:
        """One pass over the step's micro-batches; the last stage's loss reports, in order.
        `seq_length`: what makes megatron's default p2p shape the packed activation shape
        (models/packing.py); the interleaved schedule refuses adjust_tensor_shapes_fn."""
        self._micro = [0] * len(self._parts)
        if self._interleaved:  # one iterator per part; only the reading part calls next()
            data_iterator = [data_iterator] * len(self._parts)
        return self._forward_backward(
            forward_step_func=partial(self._numbered, forward_step),
            data_iterator=data_iterator,
            model=self._parts,
            num_microbatches=self.num_microbatches,
            seq_length=seq_length,
            micro_batch_size=self.micro_batch_size,
            forward_only=forward_only,
        )

    def _numbered(self, forward_step: ForwardStep, data_iterator, model: ScheduledModel) -> tuple[Any, Callable]:
        """The schedule runs each part's forwards in micro-batch order, but alternates between
        parts when interleaved: one counter per part."""
        micro = self._micro[model.chunk]
        self._micro[model.chunk] += 1
        return forward_step(data_iterator, model, micro)


def schedule_config(model_parts: list[DistributedDataParallel], grad_scale_func: Callable):
    """megatron's schedule reads its hooks (gradient finalisation, no_sync, loss scaling) from
    the config of the model it runs. They go on a copy, so the model's own TransformerConfig
    (shared by all its layers) is never edited."""
    config = copy.copy(model_parts[0].config)
    config.finalize_model_grads_func = finalize_model_grads
    # The interleaved schedule enters every part's no_sync when given a list.
    config.no_sync_func = [p.no_sync for p in model_parts] if len(model_parts) > 1 else model_parts[0].no_sync
    config.grad_scale_func = grad_scale_func
    return config


def reading_part(modules: list, loss_needs_batch: bool) -> Optional[int]:
    """Which model part of this rank reads the host batches: the one that embeds (first stage),
    or the one computing a loss that needs targets or GeCo masks (last stage). With PP > 1
    those are on different ranks, so at most one part per rank reads; None: none does."""
    readers = [i for i, m in enumerate(modules) if m.pre_process or (m.post_process and loss_needs_batch)]
    if len(readers) > 1:
        raise RuntimeError(f"model chunks {readers} of this rank would all read batches; one reader per rank")
    return readers[0] if readers else None


def check_pipeline_shapes(shape: tuple[int, int, int]) -> None:
    """All pipeline stages must agree on the packed p2p shape: a mismatch would crash gloo
    (or hang / corrupt under NCCL) in the middle of the first step, so fail clearly now."""
    group = parallel_state.get_pipeline_model_parallel_group()
    mine = torch.tensor(shape, dtype=torch.long, device=device())
    everyone = [torch.zeros_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, mine, group=group)
    shapes = [tuple(t.tolist()) for t in everyone]
    if len(set(shapes)) != 1:
        raise RuntimeError(f"pipeline stages disagree on the packed activation shape: {shapes}")


def reduce_reports(reports: list[dict], keys: tuple[str, ...], extra: Optional[dict] = None) -> dict[str, float]:
    """Average the last stage's per-micro-batch reports over micro-batches and DP ranks and
    make the result known on every rank (rank 0 logs it, but it may not be a last stage).
    `extra` holds values already computed once per step (the global contrastive terms); they
    take precedence over the reports. `keys` must be the same on every rank."""
    extra = extra or {}
    values = torch.zeros(len(keys), dtype=torch.float64)
    if parallel_state.is_pipeline_last_stage() and reports:
        for i, k in enumerate(keys):
            if k in extra:
                values[i] = extra[k].double().cpu()
            else:
                values[i] = torch.stack([r[k].double().cpu() for r in reports]).mean()
    values = values.to(device())
    # Only the last stage contributes: sum over the pipeline, mean over data parallel.
    dist.all_reduce(values, group=parallel_state.get_pipeline_model_parallel_group())
    dist.all_reduce(values, group=parallel_state.get_data_parallel_group())
    values /= parallel_state.get_data_parallel_world_size()
    return {k: float(v) for k, v in zip(keys, values.cpu())}
