"""The loader interface shared by the simple (PIL) loader and the future DALI loader.

Training code depends only on this Protocol, so swapping the CPU loader for a GPU decoding
pipeline changes no training code: both yield ``Batch`` objects, expose their exact position
as a plain (JSON-serialisable) dict for checkpoints, and report how much bad data they skipped.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

__all__ = ["IMAGE_MEAN", "IMAGE_STD", "Batch", "BatchLoader"]

# SigLIP normalisation: (x/255 - 0.5) / 0.5, i.e. pixels in [-1, 1].
IMAGE_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
IMAGE_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)


@dataclass
class Batch:
    """One training batch: normalised images, fixed-length token ids, and sample keys."""

    images: torch.Tensor  # float32 [B, 3, H, W], normalised with IMAGE_MEAN / IMAGE_STD
    tokens: torch.Tensor  # int64 [B, L]
    keys: list[str]

    def __len__(self) -> int:
        return len(self.keys)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """Move the tensors (keys stay on the host)."""
        return Batch(
            self.images.to(device, non_blocking=non_blocking),
            self.tokens.to(device, non_blocking=non_blocking),
            self.keys,
        )


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
