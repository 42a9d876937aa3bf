"""SigLIP 2's LocCa term (Wan et al. 2024; Tschannen et al. 2025, section 2.2): a decoder with
cross-attention to view 0's patch tokens learns three tasks per image.

    captioning (cap):          [CAP]  -> caption tokens                        (teacher forcing, or
                                                                                parallel prediction)
    referring expression (aref): [AREF] region caption -> x0 y0 x1 y1         (box as location tokens)
    grounded captioning (gcap):  [GCAP] x0 y0 x1 y1     -> region caption

One region per sample and step (drawn from its valid regions by seed, step and key) serves
both region tasks; a sample without regions has only the captioning task. Parallel prediction
(CapPa): with probability `loss.locca.parallel_fraction` per sample and step, every captioning
input after the task token is a mask token, so each position predicts its token from the image
and its position alone. The decoder keeps its causal mask then (the inputs carry no tokens,
so the mask hides nothing but the other positions' image reads); CapPa drops the mask.

    L_locca = mean over samples of (CE_cap + CE_aref + CE_gcap),

each CE the mean over that sequence's target tokens (0 for a task the sample does not have):
a sum of per-sample values with a fixed divisor, so the same for any split of the step into
micro-batches and data-parallel ranks. docs/losses.md, "LocCa".
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from tulip_mega.config.streams import decoder_length

__all__ = ["TASKS", "LoccaTargets", "LoccaVocab", "build_targets", "decoder_length", "locca_loss"]

TASKS = ("cap", "aref", "gcap")


@dataclass(frozen=True)
class LoccaVocab:
    """The decoder's vocabulary: the text tokenizer's ids, then `bins` location tokens, then
    the three task tokens and the mask token; padded to a multiple of `tensor_parallel` (the
    output layer is vocabulary-parallel)."""

    text: int  # model.text.vocab_size
    bins: int
    tensor_parallel: int = 1

    def location(self, coords: torch.Tensor) -> torch.Tensor:
        """Coordinates in [0, 1] -> location token ids (bin floor(c * bins), the last bin closed)."""
        return self.text + (coords * self.bins).long().clamp(0, self.bins - 1)

    def task(self, name: str) -> int:
        return self.text + self.bins + TASKS.index(name)

    @property
    def mask(self) -> int:
        return self.text + self.bins + len(TASKS)

    @property
    def size(self) -> int:
        n = self.text + self.bins + len(TASKS) + 1
        return -(-n // self.tensor_parallel) * self.tensor_parallel

    def box(self, tokens: torch.Tensor) -> torch.Tensor:
        """Location token ids [..., 4] -> box coordinates at the bins' centres."""
        return ((tokens - self.text).float() + 0.5) / self.bins


def _draw(seed: int, step: int, key: str, what: str) -> float:
    """A uniform number in [0, 1) from (seed, step, sample key): the same on every rank and layout."""
    return zlib.crc32(f"{seed}:{step}:{key}|locca_{what}".encode("utf-8")) / 2**32


@dataclass(frozen=True)
class LoccaTargets:
    """Decoder inputs, targets and target weights of one micro-batch, task-major: rows
    [cap of every sample | aref of every sample | gcap of every sample]."""

    inputs: torch.Tensor  # [3b, Ld] int64
    targets: torch.Tensor  # [3b, Ld] int64 (pad where weight 0)
    weights: torch.Tensor  # [3b, Ld] float32, 1 on the tokens each task predicts


def _sequence(prefix: list[int], target: list[int], length: int, pad: int) -> tuple[list[int], list[int], list[float]]:
    """(inputs, targets, weights) of prefix + target, shifted by one, padded to `length`."""
    seq = prefix + target
    inputs, targets = seq[:-1], seq[1:]
    weights = [0.0] * (len(prefix) - 1) + [1.0] * len(target)
    fill = length - len(inputs)
    if fill < 0:
        raise ValueError(f"LocCa sequence of {len(inputs)} positions does not fit the decoder's {length}")
    return inputs + [pad] * fill, targets + [pad] * fill, weights + [0.0] * fill


def _text(row: torch.Tensor, pad: int) -> list[int]:
    """A tokenised text's ids up to its first padding (its EOS included)."""
    ids = row.tolist()
    return ids[: ids.index(pad)] if pad in ids else ids


def build_targets(batch, keys: Sequence[str], step: int, seed: int, vocab: LoccaVocab, length: int,
                  parallel_fraction: float, pad_id: int) -> LoccaTargets:
    """The LocCa sequences of one micro-batch (see the module docstring) from its captions
    `batch.tokens` [b, L] and regions (`region_tokens` [b, R, L], `region_boxes` [b, R, 4],
    `region_valid` [b, R]). Built on the host: a few hundred short lists per micro-batch."""
    tokens, valid = batch.tokens.cpu(), batch.region_valid.cpu()
    region_tokens, boxes = batch.region_tokens.cpu(), vocab.location(batch.region_boxes.cpu())
    rows: dict[str, list[tuple[list[int], list[int], list[float]]]] = {t: [] for t in TASKS}
    for i, key in enumerate(keys):
        caption = _text(tokens[i], pad_id)
        inputs, targets, weights = _sequence([vocab.task("cap")], caption, length, pad_id)
        if _draw(seed, step, key, "parallel") < parallel_fraction:
            inputs = [inputs[0]] + [vocab.mask if w else pad_id for w in weights[1:]]
        rows["cap"].append((inputs, targets, weights))
        have = valid[i].nonzero().flatten().tolist()
        if not have:
            empty = ([pad_id] * length, [pad_id] * length, [0.0] * length)
            rows["aref"].append(empty)
            rows["gcap"].append(empty)
            continue
        r = have[int(_draw(seed, step, key, "region") * len(have))]
        region, box = _text(region_tokens[i, r], pad_id), boxes[i, r].tolist()
        rows["aref"].append(_sequence([vocab.task("aref")] + region, box, length, pad_id))
        rows["gcap"].append(_sequence([vocab.task("gcap")] + box, region, length, pad_id))
    ordered = [row for task in TASKS for row in rows[task]]
    return LoccaTargets(
        inputs=torch.tensor([r[0] for r in ordered], dtype=torch.long),
        targets=torch.tensor([r[1] for r in ordered], dtype=torch.long),
        weights=torch.tensor([r[2] for r in ordered], dtype=torch.float32),
    )


def locca_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """logits [Ld, 3b, V_local] (vocabulary-parallel over the TP group when megatron's parallel
    state is initialised; float32 logits are overwritten, as megatron's cross entropy does),
    targets/weights [3b, Ld] -> L_locca (module docstring), a 0-dim float32 tensor."""
    from megatron.core import parallel_state

    tokens = targets.t().contiguous().to(logits.device)  # [Ld, 3b]
    if tuple(tokens.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"LocCa targets {tuple(targets.shape)} do not match logits {tuple(logits.shape)}")
    if parallel_state.model_parallel_is_initialized():
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        per_token = vocab_parallel_cross_entropy(logits.float().contiguous(), tokens)  # [Ld, 3b]
    else:
        v = logits.shape[-1]
        per_token = F.cross_entropy(logits.float().reshape(-1, v), tokens.reshape(-1),
                                    reduction="none").reshape(tokens.shape)
    w = weights.t().to(per_token.device)
    per_sequence = (per_token * w).sum(0) / w.sum(0).clamp(min=1.0)  # [3b]
    return per_sequence.view(len(TASKS), -1).sum(0).mean()
