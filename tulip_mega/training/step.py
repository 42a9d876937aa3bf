"""One optimizer step: megatron's forward-backward schedule over the micro-batches of one
global batch (training/schedule.py), then an optimizer step that skips non-finite steps
(training/skip_guard.py).

With `loss.contrastive_batch=global` and several micro-batches per step, an embedding cache
pass runs first, so that every contrastive term sees the whole global batch
(training/embedding_cache.py). With `text_recon` on, the reading ranks read every micro-batch
of the step before the first forward: its loss is the mean over the step's caption tokens
(losses/token_count.py). Every step checks that the pipeline stages that read batches read
the same samples (training/lockstep.py). With SigLIP 2's EMA-teacher terms, the step that
reaches `loss.distill.start_fraction` copies the student into the teacher and switches the
teacher's views and terms on; every applied step after it updates the teacher and its centres
(training/teacher_step.py).
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Any, Callable, Iterator, Optional

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

from tulip_mega.config.run_layout import RunLayout
from tulip_mega.config.streams import Streams
from tulip_mega.data.base import Batch
from tulip_mega.losses.outputs import ModelOutputs
from tulip_mega.losses.locca import LoccaTargets, LoccaVocab, build_targets
from tulip_mega.losses.reconstruction import mae_mask
from tulip_mega.losses.stack import TulipLossStack
from tulip_mega.losses.token_count import step_token_divisor
from tulip_mega.models.megatron_config import ddp_bucket_size
from tulip_mega.models.tulip import TulipModel
from tulip_mega.parallel.init import device
from tulip_mega.training.cache_check import CacheCheck, tolerance
from tulip_mega.training.embedding_cache import EmbeddingCache, refuse_stochastic_layers
from tulip_mega.training.fp8_replay import replay_guard
from tulip_mega.training.lockstep import check_lockstep
from tulip_mega.training.schedule import Schedule, ScheduledModel, check_pipeline_shapes, reduce_reports
from tulip_mega.training.skip_guard import SkipGuard
from tulip_mega.training.teacher_step import TeacherSchedule

# Salt of masked_prediction's patch mask, so that it is drawn independently of MAE's.
MASKED_PREDICTION_SALT = "|masked_prediction"


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


class StepInputs:
    """The host batches the reading model part gets in one step: read once from the loader,
    kept when a later pass (the embedding cache's gradient pass, or the passes after a
    read-ahead) replays them; their sample keys go to the lockstep check."""

    def __init__(self, keep: bool) -> None:
        self.keep = keep
        self.reset()

    def reset(self) -> None:
        self.batches: list[Batch] = []
        self.keys: list[list[str]] = []
        self.replay = False

    def get(self, data_iterator: Optional[Iterator], micro: int) -> Batch:
        """Micro-batch `micro`'s host batch: the next one from the loader, or the kept one."""
        if self.replay:
            return self.batches[micro]
        batch = next(data_iterator)
        self.keys.append(batch.keys)
        if self.keep:
            self.batches.append(batch)
        return batch

    def concat(self) -> Optional[Batch]:
        """The step's kept batches as one batch on the device (None when this rank read none)."""
        return Batch.concat(self.batches).to(device()) if self.batches else None


class TrainStep:
    """Forward+backward over the micro-batches of one global batch, then a guarded optimizer step."""

    def __init__(self, cfg, layout: RunLayout, model_parts: list[DistributedDataParallel], optimizer,
                 scheduler, *, pad_id: int) -> None:
        """`model_parts`: this rank's DDP model parts (one per virtual stage) in megatron's order;
        `pad_id`: the caption padding id (training/data.py:caption_pad_id)."""
        self.layout = layout
        self.model_parts = model_parts
        self.modules: list[TulipModel] = [p.module for p in model_parts]
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.seed = cfg.run.seed
        self._locca = _locca_setup(cfg, layout)
        # Optimizer steps done so far, skipped ones included (the loop sets it after a resume);
        # per-step randomness that must be identical on every rank and layout (the MAE mask)
        # is keyed by it.
        self.completed_steps = 0
        self.loss = TulipLossStack(cfg, layout.streams, group=parallel_state.get_data_parallel_group(), pad_id=pad_id)
        self.teacher = TeacherSchedule(cfg, layout, self.modules) if layout.distill_start is not None else None
        self.schedule = Schedule(model_parts, optimizer.scale_loss, layout.microbatches, layout.micro_batch_size,
                                 self.loss.needs_batch)
        self.cache = _embedding_cache(cfg, layout, self.loss, model_parts)
        self.guard = SkipGuard(cfg.train.max_skipped_steps)
        # text_recon is a mean over the tokens of the whole step: its divisor needs every
        # micro-batch's captions before the first loss, so the step reads them ahead.
        self._reads_ahead = "text_recon" in self.loss.terms
        self._text_divisor: Optional[float] = None
        self.inputs = StepInputs(keep=self.cache is not None or self._reads_ahead)
        self._phase: Optional[bool] = None
        self._enter_phase()

    def _enter_phase(self) -> None:
        """Set what this step runs: the streams (with the teacher's views once it runs), their
        pipeline shapes, the active terms and the report keys. Changes at most once per run,
        at the step where the EMA teacher starts (the same step on every rank)."""
        running = self.layout.teacher_running(self.completed_steps)
        if running == self._phase:
            return
        self._phase = running
        self.streams = self.layout.streams_at(self.completed_steps)
        self.cache_streams = self.streams.contrastive_only()  # what the embedding cache's pass runs
        self.terms = self.loss.active_terms(running)
        self._seq_length, self._cache_seq_length = self._seq_lengths()
        chance = [n for n in self.terms if n in self.loss.chance_terms]
        self.report_keys = (*(f"loss/{name}" for name in self.terms),
                            *(f"chance/{name}" for name in chance), "logit_scale", "logit_bias")

    def _seq_lengths(self) -> tuple[int, int]:
        """megatron's seq_length for the full forward and for the cache pass's (contrastive
        streams only); every part of a rank runs the same streams, so any gives the shape."""
        module, b = self.modules[0], self.layout.micro_batch_size
        packed = module.packed_shape(b, self.streams)
        if self.layout.pipeline_parallel > 1:
            check_pipeline_shapes(packed)
        cache = module.packed_shape(b, self.cache_streams)
        return module.schedule_seq_length(packed), module.schedule_seq_length(cache)

    @property
    def num_microbatches(self) -> int:
        return self.layout.microbatches

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for a non-finite loss or gradient norm in this run."""
        return self.guard.skipped_steps

    @property
    def needs_input(self) -> bool:
        """The stage that embeds the inputs reads batches, and so does the last stage when a
        loss needs targets or GeCo validity masks (both read the same batches of their DP rank)."""
        return self.schedule.reader is not None

    # --- one step ------------------------------------------------------------------------
    def __call__(self, data_iterator: Optional[Iterator]) -> dict[str, float]:
        metrics = self.forward_backward(data_iterator)
        metrics.update(self.optimizer_step(metrics))
        return metrics

    def forward_backward(self, data_iterator: Optional[Iterator]) -> dict[str, float]:
        """Gradients of one global batch into the DDP buffers (not applied); returns the loss
        and every term, reduced so that every rank holds the global values."""
        self._enter_phase()
        if self.teacher is not None:
            self.teacher.before_step(self.completed_steps)
        for part in self.model_parts:
            part.zero_grad_buffer()
        self.optimizer.zero_grad()
        self.inputs.reset()
        if self._reads_ahead:
            self._read_ahead(data_iterator)
        contrastive = self._cache_pass(data_iterator) if self.cache is not None else {}
        with self.cache.replay_pass() if self.cache is not None else contextlib.nullcontext():
            reports = self.schedule.run(data_iterator, self._forward_step, self._seq_length, forward_only=False)
        if self.cache is None:
            self._check_lockstep()
        else:
            self.cache.finish(self.completed_steps + 1)
        self.inputs.reset()
        self._text_divisor = None
        metrics = reduce_reports(reports, self.report_keys, extra=contrastive)
        metrics["loss"] = sum(self.loss.weights[name] * metrics[f"loss/{name}"] for name in self.terms)
        return metrics

    def optimizer_step(self, metrics: dict[str, float]) -> dict[str, float]:
        """Apply the gradients unless the loss or the gradient norm is not finite
        (training/skip_guard.py); then, once it runs, move the EMA teacher towards the student."""
        loss_keys = ("loss", *(f"loss/{name}" for name in self.terms))
        self.completed_steps += 1
        skipped = self.guard.skipped_steps
        out = self.guard.apply(self.optimizer, self.scheduler, metrics, loss_keys, self.completed_steps)
        if self.teacher is not None and self._phase:
            out.update(self.teacher.after_step(self.completed_steps, applied=self.guard.skipped_steps == skipped))
        return out

    def _read_ahead(self, data_iterator: Optional[Iterator]) -> None:
        """Read every micro-batch of the step now (the passes replay them) and, on the ranks
        that compute the loss, set text_recon's divisor from the step's token count summed
        over data parallel (losses/token_count.py)."""
        if self.schedule.reader is not None:
            for m in range(self.num_microbatches):
                self.inputs.get(data_iterator, m)
        self.inputs.replay = True
        if any(m.post_process for m in self.modules):  # the last stage reads: text_recon needs targets
            self._text_divisor = step_token_divisor(
                [b.tokens for b in self.inputs.batches], self.loss.pad_id, self.num_microbatches,
                parallel_state.get_data_parallel_group(), device())

    def _cache_pass(self, data_iterator: Optional[Iterator]) -> dict[str, torch.Tensor]:
        """The embedding cache's forward-only pass and dense contrastive terms: this rank's
        contrastive term values (last stage; empty elsewhere). Later passes replay the batches."""
        with self.cache.cache_pass():
            cached = self.schedule.run(data_iterator, self._cache_forward_step, self._cache_seq_length,
                                       forward_only=True)
        contrastive = {}
        if parallel_state.is_pipeline_last_stage():
            contrastive = self.cache.store(cached, self.inputs.concat())
        self._check_lockstep()
        self.inputs.replay = True
        return contrastive

    def _check_lockstep(self) -> None:
        keys = self.inputs.keys if self.needs_input and len(self.inputs.keys) == self.num_microbatches else None
        check_lockstep(keys, self.num_microbatches, self.layout.micro_batch_size, self.completed_steps + 1)

    # --- megatron callbacks -------------------------------------------------------------
    def _forward(self, streams: Streams, data_iterator: Optional[Iterator], model: ScheduledModel,
                 micro: int) -> tuple[Any, Optional[Batch], Optional[tuple], Optional[LoccaTargets]]:
        """Micro-batch `micro` through one model part over `streams`: (output, the host batch on
        the device, MAE indices, LocCa targets); the batch is None in a part that reads nothing."""
        batch = images = tokens = mae_idx = patch_mask = locca = None
        if model.reads:
            host = self.inputs.get(data_iterator, micro)
            batch = host.to(device(), non_blocking=True)
            images, tokens = batch.images, batch.tokens
            # Masks are keyed by sample and step, so every stage, rank and layout draws the same.
            if streams.mae_visible:
                mae_idx = tuple(i.to(device()) for i in mae_mask(
                    batch.keys, self.completed_steps, self.seed, streams.patches, streams.mae_visible
                ))
            if streams.masked_patches:
                patch_mask = mae_mask(batch.keys, self.completed_steps, self.seed, streams.patches,
                                      streams.patches - streams.masked_patches, salt=MASKED_PREDICTION_SALT)[1]
                patch_mask = patch_mask.to(device())
            if streams.locca_regions and self.modules[model.chunk].post_process:
                vocab, length, fraction = self._locca
                locca = build_targets(host, host.keys, self.completed_steps, self.seed, vocab, length, fraction,
                                      self.loss.pad_id)
        output = model(images, tokens, batch=batch, mae_idx=mae_idx, streams=streams, patch_mask=patch_mask,
                       locca_inputs=None if locca is None else locca.inputs.to(device()))
        return output, batch, mae_idx, locca

    def _cache_forward_step(self, data_iterator, model: ScheduledModel, micro: int) -> tuple[Any, Callable]:
        output, _, _, _ = self._forward(self.cache_streams, data_iterator, model, micro)
        return output, EmbeddingCache.keep_outputs

    def _forward_step(self, data_iterator, model: ScheduledModel, micro: int) -> tuple[Any, Callable]:
        output, batch, mae_idx, locca = self._forward(self.streams, data_iterator, model, micro)
        return output, partial(self._loss_func, batch=batch, mae_idx=mae_idx, micro=micro, locca=locca)

    def _loss_func(self, output: ModelOutputs, batch=None, mae_idx=None, micro: int = 0,
                   locca: Optional[LoccaTargets] = None) -> tuple[torch.Tensor, dict]:
        """Micro-batch `micro`'s loss on the last stage: every term, or with the embedding
        cache the reconstruction terms plus the cache's surrogate; and its report."""
        terms = self.terms if self.cache is None else tuple(n for n in self.terms if n in self.loss.sample_mean_terms)
        total, values = self.loss(output, batch, mae_idx, terms=terms, text_divisor=self._text_divisor, locca=locca)
        if not isinstance(total, torch.Tensor):  # no reconstruction term switched on
            total = torch.zeros((), device=output.image_emb.device)
        if self.cache is not None:
            total = total + self.cache.micro_loss(output, micro)
        # The schedule divides the returned loss in place: report clones.
        report = {f"loss/{name}": value.detach().clone() for name, value in values.items()}
        # With the cache, its pass reported the contrastive terms' chance for the whole batch.
        chance = [n for n in self.terms if n in self.loss.chance_terms
                  and (self.cache is None or n not in self.loss.contrastive_terms)]
        report.update({f"chance/{name}": v for name, v in self.loss.chance(output, batch, chance).items()})
        report["logit_scale"] = output.logit_scale.detach().clone()
        report["logit_bias"] = output.logit_bias.detach().clone()
        return total, report


def _locca_setup(cfg, layout: RunLayout) -> tuple[LoccaVocab, int, float]:
    """The LocCa decoder's vocabulary, sequence length and parallel-prediction share."""
    from tulip_mega.config.streams import decoder_length

    tp = layout.tensor_parallel
    length = decoder_length(cfg.model.text.context_length, tp if cfg.parallel.sequence_parallel else 1)
    return LoccaVocab(cfg.model.text.vocab_size, cfg.loss.locca.box_bins, tp), length, cfg.loss.locca.parallel_fraction


def _embedding_cache(cfg, layout: RunLayout, loss: TulipLossStack,
                     model_parts: list[DistributedDataParallel]) -> Optional[EmbeddingCache]:
    """The embedding cache when the layout runs one (loss.contrastive_batch=global with more than
    one micro-batch per step; with one, the micro-batch already is the global batch), else None."""
    if not layout.embedding_cache:
        return None
    refuse_stochastic_layers([p.module for p in model_parts])
    check = None
    if cfg.train.check_cache:
        check = CacheCheck(tolerance(cfg.precision, cfg.train.check_cache_tolerance))
    return EmbeddingCache(loss, layout.microbatches, layout.micro_batch_size, check,
                          fp8=replay_guard(cfg.precision, model_parts))
