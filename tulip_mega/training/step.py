"""One optimizer step with megatron's forward-backward schedule (1F1B when PP > 1).

Owns the pieces that the schedule needs wired together: DDP wrapper, megatron optimizer and
LR/WD scheduler, the forward_step_func and loss_func, and the p2p tensor shape of the packed
two-tower activations. `TrainStep.__call__` returns the step's metrics, already reduced so
that every rank holds the same numbers (loss over the global batch, grad norm, lr, ...).
"""

from __future__ import annotations

import os

from functools import partial
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from tulip_mega.losses.reconstruction import mae_mask
from tulip_mega.losses.stack import TulipLossStack
from tulip_mega.models.tulip import TulipModel
from tulip_mega.parallel.init import device


def wrap_ddp(model: TulipModel, cfg) -> DistributedDataParallel:
    """megatron DDP: gradient buckets reduced over the data-parallel group (ZeRO-1 optional)."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
    )
    return DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)


def make_optimizer(cfg, model: DistributedDataParallel):
    """AdamW (decoupled weight decay; none on biases, norms and the logit scale/bias)."""
    o = cfg.optim
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.betas[0],
        adam_beta2=o.betas[1],
        adam_eps=o.eps,
        clip_grad=o.clip_grad,
        bf16=model.config.bf16,
        params_dtype=model.config.params_dtype,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
    )
    return get_megatron_optimizer(opt_config, [model])


def make_scheduler(cfg, optimizer) -> OptimizerParamScheduler:
    """Linear warmup from 0 to optim.lr, then cosine decay to optim.min_lr at train.steps."""
    o, steps = cfg.optim, cfg.train.steps
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=o.warmup_steps,
        lr_decay_steps=steps,
        lr_decay_style="cosine",
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=steps,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )


class TrainStep:
    """Runs forward+backward over the micro-batches of one global batch and steps the optimizer."""

    def __init__(self, cfg, model: DistributedDataParallel, optimizer, scheduler, num_microbatches: int) -> None:
        self.cfg = cfg
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.num_microbatches = num_microbatches
        self.micro_batch_size = cfg.train.micro_batch_size
        self.module: TulipModel = model.module
        # Optimizer steps done so far (the loop sets it after a resume); per-step randomness
        # that must be identical on every rank and layout (the MAE mask) is keyed by it.
        self.completed_steps = 0
        self.streams = self.module.train_streams
        self.loss = TulipLossStack(
            cfg, self.streams, group=parallel_state.get_data_parallel_group(), pad_id=_pad_id(cfg)
        )
        self.report_keys = ("loss", *(f"loss/{name}" for name in self.loss.terms), "logit_scale", "logit_bias")
        self.forward_backward = get_forward_backward_func()
        self.pp = parallel_state.get_pipeline_model_parallel_world_size()
        config = model.config
        config.finalize_model_grads_func = finalize_model_grads
        config.no_sync_func = model.no_sync
        config.grad_scale_func = optimizer.scale_loss
        self.packed_shape = self.module.packed_shape(self.micro_batch_size, self.streams)
        if self.pp > 1:
            check_pipeline_shapes(self.packed_shape)

    @property
    def needs_input(self) -> bool:
        """The stage that embeds the inputs reads batches, and so does the last stage when a
        loss needs targets or GeCo validity masks (both read the same batches of their DP rank)."""
        return self.module.pre_process or (self.module.post_process and self.loss.needs_batch)

    # --- megatron callbacks -------------------------------------------------------------
    def _forward_step(self, data_iterator: Iterator, model) -> tuple[Any, Callable]:
        batch = images = tokens = mae_idx = None
        if self.needs_input:
            batch = next(data_iterator).to(device(), non_blocking=True)
            images, tokens = batch.images, batch.tokens
            if self.streams.mae_visible:
                # Keyed by sample and step, so every stage, rank and layout draws the same mask.
                mae_idx = tuple(i.to(device()) for i in mae_mask(
                    batch.keys, self.completed_steps, self.cfg.run.seed, self.streams.patches, self.streams.mae_visible
                ))
        output = model(images, tokens, batch=batch, mae_idx=mae_idx, streams=self.streams)
        return output, partial(self._loss_func, batch=batch, mae_idx=mae_idx)

    def _loss_func(self, output: dict, batch=None, mae_idx=None) -> tuple[torch.Tensor, dict]:
        total, terms = self.loss(output, batch, mae_idx)
        # The schedule divides the returned loss in place: report clones.
        report = {"loss": total.detach().clone()}
        report.update({f"loss/{name}": value.detach().clone() for name, value in terms.items()})
        report["logit_scale"] = output["logit_scale"].detach().clone()
        report["logit_bias"] = output["logit_bias"].detach().clone()
        return total, report

    def _shapes(self, recv, send):
        return [self.packed_shape], [self.packed_shape]

    # --- one step ----------------------------------------------------------------------
    def __call__(self, data_iterator: Optional[Iterator], forward_only: bool = False) -> dict[str, float]:
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        kwargs = {}
        if self.pp > 1:
            kwargs["adjust_tensor_shapes_fn"] = self._shapes
        reports = self.forward_backward(
            forward_step_func=self._forward_step,
            data_iterator=data_iterator,
            model=[self.model],
            num_microbatches=self.num_microbatches,
            seq_length=self.packed_shape[0],
            micro_batch_size=self.micro_batch_size,
            forward_only=forward_only,
            **kwargs,
        )
        metrics: dict[str, float] = {}
        if not forward_only:
            ok, grad_norm, _ = self.optimizer.step()
            if not ok:
                raise FloatingPointError("optimizer step skipped: non-finite gradients")
            self.scheduler.step(increment=1)
            self.completed_steps += 1
            metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
            metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        metrics.update(reduce_reports(reports, self.report_keys))
        return metrics


def reduce_reports(reports: list[dict], keys: tuple[str, ...]) -> dict[str, float]:
    """Average the last stage's per-micro-batch reports over micro-batches and DP ranks and
    make the result known on every rank (rank 0 logs it, but it may not be a last stage).
    `keys` must be the same on every rank (the loss stack's terms come from the recipe)."""
    values = torch.zeros(len(keys), dtype=torch.float64)
    if parallel_state.is_pipeline_last_stage() and reports:
        for i, k in enumerate(keys):
            values[i] = torch.stack([r[k].double().cpu() for r in reports]).mean()
    values = values.to(device())
    # Only the last stage contributes: sum over the pipeline, mean over data parallel.
    dist.all_reduce(values, group=parallel_state.get_pipeline_model_parallel_group())
    dist.all_reduce(values, group=parallel_state.get_data_parallel_group())
    values /= parallel_state.get_data_parallel_world_size()
    return {k: float(v) for k, v in zip(keys, values.cpu())}


def _pad_id(cfg) -> int:
    """The caption padding id (ignored by the text reconstruction loss): the tokenizer's own
    when its file is there, else the id our tokenizer trainer assigns."""
    from dataloaders.tokenizer import PAD_ID, Tokenizer

    if cfg.loss.weights.text_recon > 0 and os.path.isfile(cfg.data.tokenizer):
        return Tokenizer(cfg.data.tokenizer).pad_id
    return PAD_ID


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
