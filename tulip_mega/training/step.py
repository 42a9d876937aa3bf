"""One optimizer step with megatron's forward-backward schedule (1F1B when PP > 1).

`TrainStep.forward_backward` leaves the gradients of one global batch in megatron's DDP
buffers and returns the loss terms; `TrainStep.optimizer_step` applies them unless they are
not finite; `TrainStep.__call__` does both.

The contrastive batch (`loss.contrastive_batch`, docs/losses.md):

  * `micro`: each micro-step's loss sees micro x DP pairs (megatron's usual accumulation).
  * `global` (default): every contrastive term is computed once over micro x DP x
    accumulation pairs, the batch SigLIP and TULIP define the loss on. With more than one
    micro-batch per step that takes an embedding cache, as open_clip's `--accum-freq` does
    without pipeline parallelism:
      1. a forward-only pass of every micro-batch through megatron's schedule (any PP) runs
         only the streams the contrastive terms read (no MAE stream, no decoders) and keeps
         the embeddings on the last stage, no activations;
      2. the contrastive terms over the concatenated embeddings (distributed over DP as
         always), backward to the cached embeddings (and logit scales/biases);
      3. the usual forward+backward per micro-batch, whose loss is the reconstruction terms
         plus <embedding, cached gradient> for each contrastive output, so backpropagation
         carries exactly the global loss's gradient into the towers.
    Both passes use the same host batches (read once in pass 1), so every random choice
    (crops, flips, EDA, GeCo picks; MAE masks are keyed by sample and step) is identical.
    Under FP8 delayed scaling the forwards of 3. cast with the scales of 1. (training/fp8_replay.py);
    a model with dropout or drop-path is refused, and `train.check_cache` compares 3.'s
    contrastive outputs with the cached ones every step (training/cache_check.py).

With `text_recon` on, the reading ranks read every micro-batch of the step before the first
forward: its loss is the mean over the step's caption tokens, and each micro-batch divides
its summed cross entropy by the step's token count (losses/token_count.py), known only then.

Every step also checks that the pipeline stages that read batches read the same samples, and
a step whose loss or gradient norm is not finite changes nothing (training/optimizer.py).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import zlib
from functools import partial
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func

from tulip_mega.config.run_layout import RunLayout
from tulip_mega.data.base import Batch
from tulip_mega.losses.outputs import ModelOutputs
from tulip_mega.losses.reconstruction import mae_mask
from tulip_mega.losses.stack import TulipLossStack
from tulip_mega.losses.token_count import step_token_divisor
from tulip_mega.models.megatron_config import ddp_bucket_size
from tulip_mega.models.tulip import TulipModel
from tulip_mega.parallel.init import device
from tulip_mega.training.cache_check import CacheCheck, stochastic_layers, tolerance
from tulip_mega.training.fp8_replay import replay_guard
from tulip_mega.training.optimizer import guarded_step

log = logging.getLogger("tulip_mega")

class TrainingHalted(RuntimeError):
    """The run must stop and must not be requeued as is; `exit_code` is what tulip_mega.train returns."""

    exit_code = 1


class NonFiniteTraining(TrainingHalted):
    """train.max_skipped_steps consecutive steps had a non-finite loss or gradient norm."""

    exit_code = 4


class PipelineDataMismatch(TrainingHalted):
    """Pipeline stages of one model replica read different samples in the same step."""

    exit_code = 5


class CacheReplayMismatch(TrainingHalted):
    """train.check_cache: the gradient pass did not reproduce the cached contrastive embeddings."""

    exit_code = 6


def wrap_ddp(parts: list[TulipModel], cfg) -> list[DistributedDataParallel]:
    """megatron DDP, one wrapper per model part (virtual stage), as megatron's own trainer
    does: gradient buckets reduced over the data-parallel group (ZeRO-1 optional)."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
        bucket_size=ddp_bucket_size(cfg, parts),
    )
    return [DistributedDataParallel(config=m.config, ddp_config=ddp_config, module=m) for m in parts]


class ScheduledModel(torch.nn.Module):
    """The DDP model as megatron's schedule sees it: calls and attributes go to the DDP model,
    except `config`, which is the step's schedule config (the model's config plus the hooks),
    and `chunk`, the index of this model chunk on its rank (0 without interleaving), which
    tells the forward step which chunk the schedule is running."""

    def __init__(self, model: DistributedDataParallel, config, chunk: int = 0) -> None:
        super().__init__()
        self.module = model
        self.config = config
        self.chunk = chunk

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["module"], name)


class TrainStep:
    """Forward+backward over the micro-batches of one global batch, then a guarded optimizer step."""

    def __init__(self, cfg, layout: RunLayout, model_parts: list[DistributedDataParallel], optimizer,
                 scheduler) -> None:
        """`model_parts`: this rank's DDP model parts (one per virtual stage) in megatron's order."""
        self.cfg = cfg
        self.chunks = model_parts
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.layout = layout
        self.num_microbatches = layout.microbatches
        self.micro_batch_size = cfg.train.micro_batch_size
        self.modules: list[TulipModel] = [c.module for c in self.chunks]
        # Every chunk of a rank runs the same streams, so any chunk gives the p2p shapes.
        self.module: TulipModel = self.modules[0]
        self.interleaved = len(self.chunks) > 1
        # Optimizer steps done so far, skipped ones included (the loop sets it after a resume);
        # per-step randomness that must be identical on every rank and layout (the MAE mask)
        # is keyed by it.
        self.completed_steps = 0
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.max_skipped_steps = cfg.train.max_skipped_steps
        self.streams = self.module.train_streams
        self.loss = TulipLossStack(
            cfg, self.streams, group=parallel_state.get_data_parallel_group(), pad_id=_pad_id(cfg)
        )
        # Which chunk reads the host batches: the first chunk of the first stage (it embeds),
        # or the last chunk of the last stage when a loss needs targets. With PP > 1 those are
        # on different ranks, so at most one chunk per rank reads.
        readers = [i for i, m in enumerate(self.modules) if self._chunk_reads(m)]
        if len(readers) > 1:
            raise RuntimeError(f"model chunks {readers} of this rank would all read batches; one reader per rank")
        self._reader = readers[0] if readers else None
        # The embedding cache is needed only when a step has several micro-batches: with one,
        # the micro-step's contrastive batch already is the global batch.
        self.global_contrastive = layout.embedding_cache
        self.cache_streams = self.streams.contrastive_only()
        if self.global_contrastive:
            _refuse_stochastic_layers(self.modules)
        # The replay must run at the cache pass's FP8 scales (training/fp8_replay.py), and
        # train.check_cache verifies that it reproduces the cached embeddings.
        self._fp8 = replay_guard(cfg.precision, self.chunks)
        self._check = None
        if self.global_contrastive and cfg.train.check_cache:
            self._check = CacheCheck(tolerance(cfg.precision, cfg.train.check_cache_tolerance))
        self.report_keys = (*(f"loss/{name}" for name in self.loss.terms),
                            *(f"chance/{name}" for name in self.loss.contrastive_terms), "logit_scale", "logit_bias")
        self._schedule = get_forward_backward_func()
        self.pp = parallel_state.get_pipeline_model_parallel_world_size()
        # megatron's schedule reads its hooks (gradient finalisation, no_sync, loss scaling) from
        # the config of the model it runs. They go on a copy carried by a view of the DDP model,
        # so the model's own TransformerConfig (shared by all its layers) is never edited.
        schedule_config = copy.copy(self.chunks[0].config)
        schedule_config.finalize_model_grads_func = finalize_model_grads
        # The interleaved schedule enters every chunk's no_sync when given a list.
        schedule_config.no_sync_func = [c.no_sync for c in self.chunks] if self.interleaved else self.chunks[0].no_sync
        schedule_config.grad_scale_func = optimizer.scale_loss
        self._scheduled = [ScheduledModel(c, schedule_config, i) for i, c in enumerate(self.chunks)]
        self.packed_shape = self.module.packed_shape(self.micro_batch_size, self.streams)
        self.cache_packed_shape = self.module.packed_shape(self.micro_batch_size, self.cache_streams)
        if self.pp > 1:
            check_pipeline_shapes(self.packed_shape)
        # Per-step state: the host batches this rank read (replayed by the second pass), and on
        # the last stage the gradient of the global contrastive loss per micro-batch output.
        self._batches: list[Batch] = []
        self._keys: list[list[str]] = []
        self._replay = False
        # Forwards run in micro-batch order within each chunk, but the interleaved schedule
        # alternates between chunks: one counter per chunk.
        self._micro = [0] * len(self.chunks)
        self._cache_grads: list[dict[str, torch.Tensor]] = []
        # text_recon is a mean over the tokens of the whole step: its divisor needs every
        # micro-batch's captions before the first loss, so the step reads them ahead.
        self._reads_ahead = "text_recon" in self.loss.terms
        self._text_divisor: Optional[float] = None

    def _chunk_reads(self, module: TulipModel) -> bool:
        """Whether this model chunk needs the host batch: it embeds, or it computes a loss
        that needs targets or GeCo masks."""
        return module.pre_process or (module.post_process and self.loss.needs_batch)

    @property
    def needs_input(self) -> bool:
        """The stage that embeds the inputs reads batches, and so does the last stage when a
        loss needs targets or GeCo validity masks (both read the same batches of their DP rank)."""
        return self._reader is not None

    # --- megatron callbacks -------------------------------------------------------------
    def _next_batch(self, data_iterator: Optional[Iterator], m: int, chunk: int = 0) -> Optional[Batch]:
        """Micro-batch m's host batch for model chunk `chunk`: read (first pass) or replayed
        (second pass); None for a chunk that reads nothing."""
        if chunk != self._reader:
            return None
        if self._replay:
            return self._batches[m]
        batch = next(data_iterator)
        self._keys.append(batch.keys)
        if self.global_contrastive or self._reads_ahead:  # kept for the second pass / the replay
            self._batches.append(batch)
        return batch

    def _forward_step(self, data_iterator: Iterator, model, cache: bool = False) -> tuple[Any, Callable]:
        chunk = model.chunk
        micro = self._micro[chunk]  # the schedule runs each chunk's forwards in micro-batch order
        self._micro[chunk] += 1
        host = self._next_batch(data_iterator, micro, chunk)
        batch = images = tokens = mae_idx = None
        streams = self.cache_streams if cache else self.streams
        if host is not None:
            batch = host.to(device(), non_blocking=True)
            images, tokens = batch.images, batch.tokens
            if streams.mae_visible:
                # Keyed by sample and step, so every stage, rank and layout draws the same mask.
                mae_idx = tuple(i.to(device()) for i in mae_mask(
                    batch.keys, self.completed_steps, self.cfg.run.seed, self.streams.patches, self.streams.mae_visible
                ))
        output = model(images, tokens, batch=batch, mae_idx=mae_idx, streams=streams)
        if cache:
            return output, self._keep_embeddings
        return output, partial(self._loss_func, batch=batch, mae_idx=mae_idx, micro=micro)

    @staticmethod
    def _keep_embeddings(output: ModelOutputs) -> tuple[torch.Tensor, dict]:
        """Pass 1 on the last stage: keep every tensor output (embeddings, scales), no graph."""
        kept = {k: v.detach() for k, v in output.tensors().items()}
        return torch.zeros((), device=kept["image_emb"].device), kept

    def _loss_func(self, output: ModelOutputs, batch=None, mae_idx=None, micro: int = 0) -> tuple[torch.Tensor, dict]:
        terms = None if not self.global_contrastive else self.loss.reconstruction_terms
        total, values = self.loss(output, batch, mae_idx, terms=terms, text_divisor=self._text_divisor)
        if not isinstance(total, torch.Tensor):  # no reconstruction term switched on
            total = torch.zeros((), device=output.image_emb.device)
        if self.global_contrastive:
            if self._check is not None:
                self._check.compare(output, micro)
            # The schedule divides by the number of micro-batches; the surrogate's gradients
            # must add up to the global loss's over the micro-batches, so undo that division.
            total = total + self.num_microbatches * self._contrastive_surrogate(output, micro)
        # The schedule divides the returned loss in place: report clones.
        report = {f"loss/{name}": value.detach().clone() for name, value in values.items()}
        if not self.global_contrastive:  # else the global pass reported them for the whole batch
            report.update({f"chance/{name}": v for name, v in self.loss.chance(output, batch).items()})
        report["logit_scale"] = output.logit_scale.detach().clone()
        report["logit_bias"] = output.logit_bias.detach().clone()
        return total, report

    def _contrastive_surrogate(self, output: ModelOutputs, micro: int) -> torch.Tensor:
        """sum_k <output_k, dL_global/d output_k> for this micro-batch: its gradient with respect
        to the weights is this micro-batch's share of the global contrastive loss's gradient."""
        total = torch.zeros((), device=output.image_emb.device)
        tensors = output.tensors()
        for key, grad in self._cache_grads[micro].items():
            total = total + (tensors[key].float() * grad).sum()
        return total

    def _run_schedule(self, data_iterator, forward_step, shape, forward_only: bool) -> list:
        # The packed activations take megatron's default p2p shape (models/packing.py), which
        # the interleaved schedule requires (it refuses adjust_tensor_shapes_fn).
        self._micro = [0] * len(self.chunks)
        if self.interleaved:  # one iterator per chunk; only the reading chunk calls next()
            data_iterator = [data_iterator] * len(self.chunks)
        return self._schedule(
            forward_step_func=forward_step,
            data_iterator=data_iterator,
            model=self._scheduled,
            num_microbatches=self.num_microbatches,
            seq_length=self.module.schedule_seq_length(shape),
            micro_batch_size=self.micro_batch_size,
            forward_only=forward_only,
        )

    # --- the global contrastive batch ----------------------------------------------------
    def _global_contrastive_pass(self, data_iterator) -> dict[str, torch.Tensor]:
        """Passes 1 and 2 of the module docstring: returns this rank's contrastive term values
        (on the last stage; empty elsewhere) and leaves the per-micro-batch gradients."""
        with self._fp8.cache_pass(), torch.no_grad():
            cached = self._run_schedule(data_iterator, partial(self._forward_step, cache=True),
                                        self.cache_packed_shape, forward_only=True)
        self._cache_grads = []
        if not parallel_state.is_pipeline_last_stage():
            return {}
        if self._check is not None:
            self._check.keep(cached)
        b, n = self.micro_batch_size, self.num_microbatches
        leaves = {}
        for key in cached[0]:
            parts = [c[key] for c in cached]
            if parts[0].dim() == 0:  # a logit scale or bias: the same in every micro-batch
                leaves[key] = parts[0].clone().requires_grad_()
            else:  # [b, e] or view-/text-major [V, b, e]: micro-batches along the sample axis
                leaves[key] = torch.cat(parts, dim=parts[0].dim() - 2).requires_grad_()
        batch = Batch.concat(self._batches).to(device()) if self._batches else None
        with torch.enable_grad():
            total, values = self.loss(ModelOutputs.from_tensors(leaves), batch, None, terms=self.loss.contrastive_terms)
            total.backward()
        for m in range(n):
            grads = {}
            for key, leaf in leaves.items():
                if leaf.grad is None:
                    continue
                if leaf.dim() == 0:
                    grads[key] = leaf.grad / n
                else:
                    grads[key] = leaf.grad.narrow(leaf.dim() - 2, m * b, b)
            self._cache_grads.append(grads)
        report = {f"loss/{name}": value.detach() for name, value in values.items()}
        report.update({f"chance/{name}": v for name, v in self.loss.chance(ModelOutputs.from_tensors(leaves), batch).items()})
        return report

    # --- one step ------------------------------------------------------------------------
    def _read_ahead(self, data_iterator: Optional[Iterator]) -> None:
        """Read every micro-batch of the step now (the passes replay them) and, on the ranks
        that compute the loss, set text_recon's divisor from the step's token count summed
        over data parallel (losses/token_count.py)."""
        if self._reader is not None:
            for m in range(self.num_microbatches):
                self._next_batch(data_iterator, m, self._reader)
        self._replay = True
        if any(m.post_process for m in self.modules):  # the last stage reads: text_recon needs targets
            self._text_divisor = step_token_divisor(
                [b.tokens for b in self._batches], self.loss.pad_id, self.num_microbatches,
                parallel_state.get_data_parallel_group(), device())

    def forward_backward(self, data_iterator: Optional[Iterator]) -> dict[str, float]:
        """Gradients of one global batch into the DDP buffers (not applied); returns the loss
        and every term, reduced so that every rank holds the global values."""
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        self._batches, self._keys, self._replay = [], [], False
        if self._reads_ahead:
            self._read_ahead(data_iterator)
        contrastive = {}
        if self.global_contrastive:
            contrastive = self._global_contrastive_pass(data_iterator)
            self._check_lockstep()
            self._replay = True
        with self._fp8.replay_pass():
            reports = self._run_schedule(data_iterator, self._forward_step, self.packed_shape, forward_only=False)
        if not self.global_contrastive:
            self._check_lockstep()
        if self._check is not None:
            failure = self._check.failure(self.completed_steps + 1)
            if failure is not None:
                raise CacheReplayMismatch(failure)
        self._batches, self._keys, self._cache_grads, self._replay = [], [], [], False
        self._text_divisor = None
        metrics = reduce_reports(reports, self.report_keys, extra=contrastive)
        metrics["loss"] = sum(self.loss.weights[name] * metrics[f"loss/{name}"] for name in self.loss.terms)
        return metrics

    def optimizer_step(self, metrics: dict[str, float]) -> dict[str, float]:
        """Apply the gradients unless the loss or the gradient norm is not finite (then skip:
        no weight, optimizer state or LR-schedule change; logged and counted). Raises
        NonFiniteTraining after train.max_skipped_steps consecutive skips."""
        loss_keys = ("loss", *(f"loss/{name}" for name in self.loss.terms))
        loss_finite = all(math.isfinite(metrics[k]) for k in loss_keys)
        applied, grad_norm = guarded_step(self.optimizer, loss_finite)
        self.completed_steps += 1
        out = {"grad_norm": grad_norm, "lr": self.optimizer.param_groups[0]["lr"]}
        if applied:
            self.scheduler.step(increment=1)
            self.consecutive_skips = 0
        else:
            self.skipped_steps += 1
            self.consecutive_skips += 1
            bad = [f"{k}={metrics[k]}" for k in loss_keys if not math.isfinite(metrics[k])]
            if not math.isfinite(grad_norm):
                bad.append(f"grad_norm={grad_norm}")
            log.warning("step %d skipped: non-finite %s; no weight or optimizer state changed "
                        "(%d consecutive, %d this run; the run stops after train.max_skipped_steps=%d in a row)",
                        self.completed_steps, ", ".join(bad), self.consecutive_skips, self.skipped_steps,
                        self.max_skipped_steps)
            if self.consecutive_skips >= self.max_skipped_steps:
                raise NonFiniteTraining(
                    f"{self.consecutive_skips} consecutive steps (up to step {self.completed_steps}) had a non-finite "
                    f"loss or gradient norm ({', '.join(bad)}); the weights are those of the last finite step. "
                    "Lower optim.lr, check the data, or resume from an earlier checkpoint")
        out["train/skipped_steps"] = float(self.skipped_steps)
        return out

    def __call__(self, data_iterator: Optional[Iterator]) -> dict[str, float]:
        metrics = self.forward_backward(data_iterator)
        metrics.update(self.optimizer_step(metrics))
        return metrics

    # --- pipeline lockstep ----------------------------------------------------------------
    def _check_lockstep(self) -> None:
        """Every stage of a model replica that read batches this step read the same samples.

        One CRC32 of the keys per micro-batch, all-gathered over the pipeline group (cheap);
        the keys themselves travel only on a mismatch, to name the first differing one."""
        n = self.num_microbatches
        reads = self.needs_input and len(self._keys) == n
        mine = torch.full((n,), -1, dtype=torch.long)
        if reads:
            mine = torch.tensor([zlib.crc32("\0".join(keys).encode()) for keys in self._keys], dtype=torch.long)
        mismatch = False
        if self.pp > 1:
            group = parallel_state.get_pipeline_model_parallel_group()
            everyone = [torch.empty_like(mine).to(device()) for _ in range(self.pp)]
            dist.all_gather(everyone, mine.to(device()), group=group)
            rows = [row.cpu() for row in everyone if int(row[0]) >= 0]
            mismatch = any(not torch.equal(row, rows[0]) for row in rows[1:])
        flag = torch.tensor([1.0 if mismatch else 0.0], device=device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if not bool(flag.item()):
            return
        step = self.completed_steps + 1
        if not mismatch:
            raise PipelineDataMismatch(f"step {step}: pipeline stages of another data-parallel replica read "
                                       "different samples (see that replica's error)")
        keys = [k for micro in self._keys for k in micro] if reads else None
        everyone_keys: list = [None] * self.pp
        dist.all_gather_object(everyone_keys, keys, group=parallel_state.get_pipeline_model_parallel_group())
        raise PipelineDataMismatch(_first_difference(step, everyone_keys, self.micro_batch_size))


def _refuse_stochastic_layers(modules: list) -> None:
    """The embedding cache replays each micro-batch's forward and needs the same outputs twice:
    a layer that draws random numbers (dropout, drop-path) would break it without an error."""
    noisy = stochastic_layers(modules)
    if noisy:
        shown = ", ".join(noisy[:4]) + (f" and {len(noisy) - 4} more" if len(noisy) > 4 else "")
        raise TrainingHalted(
            f"loss.contrastive_batch=global with several micro-batches per step replays every micro-batch's "
            f"forward to apply the cached embedding gradients, but these layers are random in training: {shown}. "
            "Set their rates to 0 or use loss.contrastive_batch=micro (docs/losses.md)")


def _first_difference(step: int, keys_by_stage: list, micro: int) -> str:
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


def _pad_id(cfg) -> int:
    """The caption padding id (ignored by the text reconstruction loss): the tokenizer's own
    when its file is there, else the id our tokenizer trainer assigns."""
    from tulip_mega.data.tokenizer import PAD_ID, Tokenizer

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
