"""The loader interface shared by the simple (PIL) loader and the DALI loader.

Training code depends only on this Protocol, so swapping the CPU loader for a GPU decoding
pipeline changes no training code: both yield ``Batch`` objects, expose their exact position
as a plain (JSON-serialisable) dict for checkpoints, and report how much bad data they skipped.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields, replace
from typing import Optional, Protocol, runtime_checkable

import torch

__all__ = ["IMAGE_MEAN", "IMAGE_STD", "Batch", "BatchLoader"]

# SigLIP normalisation: (x/255 - 0.5) / 0.5, i.e. pixels in [-1, 1].
IMAGE_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
IMAGE_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)


@dataclass
class Batch:
    """One training micro-batch. Only `images`, `tokens` and `keys` are always present; the
    optional fields are filled exactly when `tulip_mega.config.streams.input_streams(cfg)` says
    the recipe's loss terms need them (and are None otherwise).

    Images are float32, normalised with IMAGE_MEAN / IMAGE_STD (pixels in [-1, 1]); token
    tensors are int64 padded/truncated to model.text.context_length (L). B = micro-batch size.
    """

    images: torch.Tensor  # [B, 3, H, W] view 0: the view paired with the caption
    tokens: torch.Tensor  # [B, L] the caption
    keys: list[str]
    # Further full-resolution crops of the same image (streams.extra_global_crops of them).
    crops: Optional[torch.Tensor] = None  # [B, G-1, 3, H, W]
    # Low-resolution crops (streams.local_crops of them, side data.views.local_size).
    local_crops: Optional[torch.Tensor] = None  # [B, n_local, 3, h, w]
    # GeCo image edits: index 0 = key.pos.jpg (same meaning), 1 = key.neg.jpg (changed meaning).
    edits: Optional[torch.Tensor] = None  # [B, 2, 3, H, W]; a missing edit is all zeros
    edit_valid: Optional[torch.Tensor] = None  # [B, 2] bool; False = missing (its pairs are ignored)
    # GeCo texts from key.json, tokenised; missing ones are padding with valid False.
    paraphrases: Optional[torch.Tensor] = None  # [B, P, L]
    paraphrase_valid: Optional[torch.Tensor] = None  # [B, P] bool
    negatives: Optional[torch.Tensor] = None  # [B, N, L]
    negative_valid: Optional[torch.Tensor] = None  # [B, N] bool
    # EDA-augmented caption (clip-rocket), tokenised.
    eda_tokens: Optional[torch.Tensor] = None  # [B, L]
    # Region captions and boxes from key.json "regions" (LocCa); missing ones are padding, valid False.
    region_tokens: Optional[torch.Tensor] = None  # [B, R, L]
    region_boxes: Optional[torch.Tensor] = None  # [B, R, 4] float32 (x0, y0, x1, y1), fractions of view 0
    region_valid: Optional[torch.Tensor] = None  # [B, R] bool

    def __len__(self) -> int:
        return len(self.keys)

    def tensor_fields(self) -> dict[str, torch.Tensor]:
        """Every tensor field that is set, by name."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)}

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """Move the tensors (keys stay on the host)."""
        moved = {k: v.to(device, non_blocking=non_blocking) for k, v in self.tensor_fields().items()}
        return replace(self, **moved)

    @classmethod
    def concat(cls, batches: list[Batch]) -> Batch:
        """The samples of several micro-batches as one batch, in order (the global-batch
        contrastive loss reads the GeCo validity masks of every micro-batch at once)."""
        first = batches[0]
        cat = {k: torch.cat([getattr(b, k) for b in batches]) for k in first.tensor_fields()}
        return replace(first, keys=[k for b in batches for k in b.keys], **cat)

    def slice(self, start: int, stop: int) -> Batch:
        """Samples [start, stop) of every field (tests cut global batches into micro-batches)."""
        cut = {k: v[start:stop] for k, v in self.tensor_fields().items()}
        return replace(self, keys=self.keys[start:stop], **cut)


@runtime_checkable
class BatchLoader(Protocol):
    """An (usually infinite) iterator of batches with an exact, resumable position."""

    def __iter__(self) -> Iterator[Batch]:
        """Yield batches from the current position (the one ``state_dict`` describes)."""
        ...

    def state_dict(self) -> dict:
        """The position after the last yielded batch: enough to continue exactly."""
        ...

    def load_state_dict(self, state: dict) -> None:
        """Restore a position; the next iteration yields the batch an uninterrupted run would."""
        ...

    def stats(self) -> dict[str, int]:
        """Counters such as ``{"samples": n, "skipped": k}`` (skipped = bad data dropped)."""
        ...
