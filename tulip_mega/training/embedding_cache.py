"""The embedding cache: every contrastive term over the step's whole global batch (micro x DP x
accumulation pairs, as SigLIP and TULIP define the loss) when a step has several micro-batches,
as open_clip's `--accum-freq` does, but through megatron's schedule at any PP (docs/losses.md):

  1. the cache pass: every micro-batch forward without grad, only the streams the contrastive
     terms read; the last stage keeps the outputs (embeddings, logit scales and biases);
  2. the dense contrastive terms over the concatenated outputs (distributed over DP as always),
     backward to those outputs: one cached gradient per micro-batch and output;
  3. the gradient pass: each micro-batch's forward+backward adds <output, cached gradient> to
     its loss, so backpropagation carries exactly the global loss's gradient into the towers.

Both passes see the same host batches, so every random choice is identical; a model with
dropout or drop-path is refused, FP8 delayed scaling is held at the cache pass's scales
(training/fp8_replay.py) and `train.check_cache` compares the replayed outputs with the cached
ones (training/cache_check.py).
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Optional

import torch

from tulip_mega.data.base import Batch
from tulip_mega.losses.outputs import ModelOutputs
from tulip_mega.losses.stack import TulipLossStack
from tulip_mega.training.cache_check import CacheCheck, stochastic_layers
from tulip_mega.training.errors import CacheReplayMismatch, TrainingHalted
from tulip_mega.training.fp8_replay import replay_guard


class EmbeddingCache:
    """Steps 2 and 3 of the module docstring, and the passes' guards, for one rank.

    Per step: `cache_pass()` around the forward-only pass, `store` with its outputs (last
    stage), `replay_pass()` around the forward+backward pass whose losses add `micro_loss`,
    then `finish`."""

    def __init__(self, loss: TulipLossStack, num_microbatches: int, micro_batch_size: int,
                 check: Optional[CacheCheck] = None, fp8=None) -> None:
        """`check`: train.check_cache's comparison, or None; `fp8`: the FP8 replay guard of
        `replay_guard` (default: none needed)."""
        self.loss = loss
        self.num_microbatches = num_microbatches
        self.micro_batch_size = micro_batch_size
        self.check = check
        self.fp8 = fp8 if fp8 is not None else replay_guard(None, ())
        self.grads: list[dict[str, torch.Tensor]] = []  # per micro-batch: {output: d loss / d output}

    @contextlib.contextmanager
    def cache_pass(self) -> Iterator[None]:
        """Around the forward-only pass: no grad, the FP8 scales the replay will use."""
        self.grads = []
        with self.fp8.cache_pass(), torch.no_grad():
            yield

    def replay_pass(self) -> contextlib.AbstractContextManager:
        """Around the forward+backward pass: casts with the cache pass's FP8 scales."""
        return self.fp8.replay_pass()

    @staticmethod
    def keep_outputs(output: ModelOutputs) -> tuple[torch.Tensor, dict]:
        """The cache pass's loss function on the last stage: keep every tensor output, no graph."""
        kept = {k: v.detach() for k, v in output.tensors().items()}
        return torch.zeros((), device=kept["image_emb"].device), kept

    def store(self, cached: list[dict[str, torch.Tensor]], batch: Optional[Batch]) -> dict[str, torch.Tensor]:
        """Step 2 over the cache pass's outputs (one dict per micro-batch, from `keep_outputs`)
        and the step's concatenated host batch: keeps the per-micro-batch gradients and returns
        the contrastive terms' values and chance levels for the whole batch."""
        if self.check is not None:
            self.check.keep(cached)
        leaves = _concat_leaves(cached)
        with torch.enable_grad():
            total, values = self.loss(ModelOutputs.from_tensors(leaves), batch, None, terms=self.loss.contrastive_terms)
            total.backward()
        self.grads = [self._micro_grads(leaves, m) for m in range(self.num_microbatches)]
        report = {f"loss/{name}": value.detach() for name, value in values.items()}
        chance = self.loss.chance(ModelOutputs.from_tensors(leaves), batch, self.loss.contrastive_terms)
        report.update({f"chance/{name}": v for name, v in chance.items()})
        return report

    def _micro_grads(self, leaves: dict[str, torch.Tensor], m: int) -> dict[str, torch.Tensor]:
        """Micro-batch m's share of the gradient wrt each output: its rows of an embedding, 1/n
        of a logit scale or bias (the same in every micro-batch)."""
        grads = {}
        b, n = self.micro_batch_size, self.num_microbatches
        for key, leaf in leaves.items():
            if leaf.grad is None:
                continue
            if leaf.dim() == 0:
                grads[key] = leaf.grad / n
            else:
                grads[key] = leaf.grad.narrow(leaf.dim() - 2, m * b, b)
        return grads

    def surrogate(self, output: ModelOutputs, micro: int) -> torch.Tensor:
        """sum_k <output_k, dL_global/d output_k> for micro-batch `micro`: its gradient with respect
        to the weights is this micro-batch's share of the global contrastive loss's gradient."""
        total = torch.zeros((), device=output.image_emb.device)
        tensors = output.tensors()
        for key, grad in self.grads[micro].items():
            total = total + (tensors[key].float() * grad).sum()
        return total

    def micro_loss(self, output: ModelOutputs, micro: int) -> torch.Tensor:
        """What the gradient pass adds to micro-batch `micro`'s loss (and compares, under
        train.check_cache). The schedule divides each loss by the number of micro-batches; the
        surrogates' gradients must add up to the global loss's, so this undoes that division."""
        if self.check is not None:
            self.check.compare(output, micro)
        return self.num_microbatches * self.surrogate(output, micro)

    def finish(self, step: int) -> None:
        """End of optimizer step `step` (1-based): raise CacheReplayMismatch on every rank when
        train.check_cache found a replay beyond tolerance; drop the step's gradients."""
        if self.check is not None:
            failure = self.check.failure(step)
            if failure is not None:
                raise CacheReplayMismatch(failure)
        self.grads = []


def _concat_leaves(cached: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The micro-batches' outputs as one batch of leaf tensors that collect gradients."""
    leaves = {}
    for key in cached[0]:
        parts = [c[key] for c in cached]
        if parts[0].dim() == 0:  # a logit scale or bias: the same in every micro-batch
            leaves[key] = parts[0].clone().requires_grad_()
        else:  # [b, e] or view-/text-major [V, b, e]: micro-batches along the sample axis
            leaves[key] = torch.cat(parts, dim=parts[0].dim() - 2).requires_grad_()
    return leaves


def refuse_stochastic_layers(roots: Iterable[torch.nn.Module]) -> None:
    """The cache replays each micro-batch's forward and needs the same outputs twice: a layer
    that draws random numbers (dropout, drop-path) would break it without an error."""
    noisy = stochastic_layers(roots)
    if noisy:
        shown = ", ".join(noisy[:4]) + (f" and {len(noisy) - 4} more" if len(noisy) > 4 else "")
        raise TrainingHalted(
            f"loss.contrastive_batch=global with several micro-batches per step replays every micro-batch's "
            f"forward to apply the cached embedding gradients, but these layers are random in training: {shown}. "
            "Set their rates to 0 or use loss.contrastive_batch=micro (docs/losses.md)")
