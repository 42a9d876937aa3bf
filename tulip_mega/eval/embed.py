"""Embeddings of an eval set under any TP x PP x DP layout, gathered to whole-set tensors.

How (the same machinery as training, so every layout the trainer runs, eval runs):
- forward passes go through megatron's `get_forward_backward_func()(..., forward_only=True,
  collect_non_loss_data=True)`, so pipeline stages exchange packed activations exactly as in
  training; the "loss function" on the last stage just hands back the embeddings;
- each data-parallel rank embeds its own disjoint part of the set (the caller's source
  iterator is per DP rank); a short last micro-batch is padded to the static micro-batch
  shape (PP needs fixed p2p shapes) and the padding rows are dropped afterwards;
- only the first pipeline stage reads data; per chunk of micro-batches it broadcasts to its
  pipeline peers how many micro-batches follow and each row's label (-1 = padding), so every
  stage runs the same schedule and the last stage knows which rows are real and their labels;
- the last stage gathers the DP parts (variable lengths) so it holds the whole set; metrics
  computed there are shared with the other stages by `share_from_last_stage`;
- under interleaved virtual stages (several model parts) megatron's interleaved schedule
  runs the parts; it needs the micro-batches of a call to be a multiple of PP, so a short
  chunk of micro-batches is topped up with padding micro-batches (all rows labelled -1).
Models run in eval mode under no_grad; the previous train/eval mode is restored.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from tulip_mega.losses.outputs import ModelOutputs
from tulip_mega.parallel.init import device

log = logging.getLogger("tulip_mega")

PAD = -1  # label of a padding row
PROGRESS_SECONDS = 30.0  # how often a long embedding pass logs its progress
_FAILED = -1  # chunk header sent by a first stage that could not read its data

# A source yields (images [k,3,H,W] | None, tokens [k,L] | None, labels [k]) with k <= micro
# batch; None means "this pass does not need that tower's input" (zeros / pad ids are fed,
# because pipeline stages need static shapes). Labels must be >= 0.
Source = Iterable[tuple[Optional[torch.Tensor], Optional[torch.Tensor], torch.Tensor]]


class Embedder:
    """Runs eval forward passes of this rank's model parts (one per virtual stage, in
    megatron's order; DDP-wrapped or bare TulipModels)."""

    def __init__(self, parts: list, micro_batch: int, image_size: int, context_length: int, chunk: int = 8) -> None:
        self.chunks = list(parts)
        self.module = getattr(self.chunks[0], "module", self.chunks[0])  # any part: same streams and shapes
        self.micro_batch = micro_batch
        self.image_size = image_size
        self.context_length = context_length
        self.chunk = chunk
        self.pp = parallel_state.get_pipeline_model_parallel_world_size()
        self.first = parallel_state.is_pipeline_first_stage()
        self.last = parallel_state.is_pipeline_last_stage()
        self.packed_shape = self.module.packed_shape(micro_batch)
        self.embed_dim = self.module.config.hidden_size  # the embedding width = vision width
        self._forward_backward = get_forward_backward_func()

    # --- reading (first stage) and agreeing on the schedule (all stages) ---------------
    def _read_chunk(self, it: Iterator) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """Up to `chunk` padded micro-batches from the source, and their labels [n, micro]."""
        b, s, L = self.micro_batch, self.image_size, self.context_length
        micro, labels = [], []
        for images, tokens, lab in it:
            k = int(lab.shape[0])
            if not 0 < k <= b:
                raise ValueError(f"eval source gave a batch of {k} rows; expected 1..{b} (the eval micro-batch)")
            if (lab < 0).any():
                raise ValueError("eval labels must be >= 0 (negative values mark padding)")
            img = torch.zeros(b, 3, s, s)
            tok = torch.zeros(b, L, dtype=torch.long)  # pad id 0
            if images is not None:
                img[:k] = images
            if tokens is not None:
                tok[:k] = tokens
            row = torch.full((b,), PAD, dtype=torch.long)
            row[:k] = lab.long()
            micro.append((img, tok))
            labels.append(row)
            if len(micro) == self.chunk:
                break
        return micro, torch.stack(labels) if labels else torch.empty(0, b, dtype=torch.long)

    def _agree(self, it: Optional[Iterator]) -> tuple[list, torch.Tensor]:
        """First stage reads; every stage of the pipeline learns the chunk's size and labels."""
        micro, labels, error = [], None, None
        if self.first:
            try:
                micro, labels = self._read_chunk(it)
            except Exception as e:  # noqa: BLE001 - tell the other stages, then re-raise
                error = e
        if self.pp == 1:
            if error is not None:
                raise error
            return micro, labels
        header = torch.full((1 + self.chunk * self.micro_batch,), PAD, dtype=torch.long)
        if self.first:
            header[0] = _FAILED if error is not None else labels.shape[0]
            if error is None:
                header[1 : 1 + labels.numel()] = labels.flatten()
        header = header.to(device())
        dist.broadcast(header, src=parallel_state.get_pipeline_model_parallel_first_rank(),
                       group=parallel_state.get_pipeline_model_parallel_group())
        header = header.cpu()
        n = int(header[0])
        if error is not None:
            raise error
        if n == _FAILED:
            raise RuntimeError("the first pipeline stage failed to read the eval data (see its log)")
        return micro, header[1 : 1 + n * self.micro_batch].view(n, self.micro_batch)

    # --- forward -------------------------------------------------------------------------
    def _forward_step(self, data_iterator, model):
        images = tokens = None
        if getattr(model, "module", model).pre_process:  # the chunk that embeds reads
            images, tokens = next(data_iterator)
            images, tokens = images.to(device()), tokens.to(device())
        return model(images, tokens), self._collect

    @staticmethod
    def _collect(output: ModelOutputs, non_loss_data: bool = True) -> dict:
        return {"image_emb": output.image_emb.detach().float(), "text_emb": output.text_emb.detach().float()}

    def _run(self, micro: list, n: int) -> list[dict]:
        return self._forward_backward(
            forward_step_func=self._forward_step,
            data_iterator=self._iterators(micro),
            model=self.chunks,
            num_microbatches=n,
            seq_length=self.module.schedule_seq_length(self.packed_shape),  # megatron's default p2p shape
            micro_batch_size=self.micro_batch,
            forward_only=True,
            collect_non_loss_data=True,
        )

    def _iterators(self, micro: list):
        """The schedule's data iterator (one per chunk under interleaving; only the chunk that
        embeds calls next())."""
        it = iter(micro) if self.first else None
        return [it] * len(self.chunks) if len(self.chunks) > 1 else it

    def _pad_to_pipeline(self, micro: list, labels: torch.Tensor) -> tuple[list, torch.Tensor]:
        """Top the micro-batches of one call up to a multiple of PP with padding micro-batches
        (the interleaved schedule's requirement); a no-op without interleaving."""
        extra = (-labels.shape[0]) % self.pp if len(self.chunks) > 1 else 0
        if not extra:
            return micro, labels
        b, s, L = self.micro_batch, self.image_size, self.context_length
        if self.first:
            micro = micro + [(torch.zeros(b, 3, s, s), torch.zeros(b, L, dtype=torch.long))] * extra
        return micro, torch.cat([labels, torch.full((extra, b), PAD, dtype=torch.long)])

    def embed(self, source: Optional[Source], desc: str = "eval") -> Optional[dict[str, torch.Tensor]]:
        """Embed this DP rank's part of a set (source read on the first stage only; other stages
        may pass None). Returns on the last stage the WHOLE set, gathered over DP:
        {"image_emb" [N, e], "text_emb" [N, e], "labels" [N]} (float32 / int64, on the CPU);
        None on the other stages. Every rank of the job must call it (collectives). A long pass
        logs `desc`, the samples done and the rate every PROGRESS_SECONDS (from the reading rank
        of data-parallel rank 0; its count times DP is the set's)."""
        it = iter(source) if (self.first and source is not None) else iter(())
        progress = _Progress(desc, self.first and parallel_state.get_data_parallel_rank() == 0
                             and parallel_state.get_tensor_model_parallel_rank() == 0)
        image, text, labels = [], [], []
        was_training = self.chunks[0].training
        for chunk in self.chunks:
            chunk.eval()
        try:
            with torch.no_grad():
                while True:
                    micro, lab = self._agree(it)
                    n = lab.shape[0]
                    if n == 0:
                        break
                    progress.update(int((lab != PAD).sum()))
                    micro, lab = self._pad_to_pipeline(micro, lab)
                    n = lab.shape[0]
                    outputs = self._run(micro, n)
                    if self.last:
                        keep = lab.flatten() != PAD
                        image.append(torch.cat([o["image_emb"].cpu() for o in outputs])[keep])
                        text.append(torch.cat([o["text_emb"].cpu() for o in outputs])[keep])
                        labels.append(lab.flatten()[keep])
        finally:
            for chunk in self.chunks:
                chunk.train(was_training)
        progress.done()
        if not self.last:
            return None
        e = self.embed_dim
        local = {
            "image_emb": torch.cat(image) if image else torch.empty(0, e),
            "text_emb": torch.cat(text) if text else torch.empty(0, e),
            "labels": torch.cat(labels) if labels else torch.empty(0, dtype=torch.long),
        }
        return {k: gather_data_parallel(v) for k, v in local.items()}


class _Progress:
    """Samples embedded so far by this rank, logged at most every PROGRESS_SECONDS (and once at
    the end of a pass that logged), so a long eval set shows it is moving."""

    def __init__(self, desc: str, speaks: bool, every: Optional[float] = None) -> None:
        self.desc, self.speaks = desc, speaks
        self.every = PROGRESS_SECONDS if every is None else every
        self.start = self.last = time.monotonic()
        self.count, self.logged = 0, False

    def update(self, n: int) -> None:
        self.count += n
        now = time.monotonic()
        if self.speaks and now - self.last >= self.every:
            self.last, self.logged = now, True
            log.info("%s: %d samples embedded on data-parallel rank 0 (%.1f/s)", self.desc, self.count,
                     self.count / max(now - self.start, 1e-9))

    def done(self) -> None:
        if self.speaks and self.logged:
            log.info("%s: done, %d samples on data-parallel rank 0 in %.0f s", self.desc, self.count,
                     time.monotonic() - self.start)


def gather_data_parallel(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every DP rank's [n_r, ...] tensor in DP-rank order (n_r may differ)."""
    group = parallel_state.get_data_parallel_group()
    world = dist.get_world_size(group)
    if world == 1:
        return t
    dev = device()
    count = torch.tensor([t.shape[0]], dtype=torch.long, device=dev)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    counts = [int(c) for c in counts]
    padded = torch.zeros((max(counts), *t.shape[1:]), dtype=t.dtype, device=dev)
    padded[: t.shape[0]] = t.to(dev)
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:c] for p, c in zip(parts, counts)]).cpu()


def share_from_last_stage(values: list[float]) -> list[float]:
    """Numbers computed on the last pipeline stage, made known on every stage (same order)."""
    t = torch.tensor(values if parallel_state.is_pipeline_last_stage() else [0.0] * len(values),
                     dtype=torch.float64, device=device())
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(t, group=parallel_state.get_pipeline_model_parallel_group())
    return [float(v) for v in t.cpu()]
