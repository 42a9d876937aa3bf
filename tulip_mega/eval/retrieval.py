"""Image-text retrieval: recall@K in both directions over a set of N image-caption pairs.

Image i and caption i are the one true match. image->text: for each image, rank all N captions
by cosine similarity; a hit at K when caption i is among the K best. text->image likewise.
A candidate tied with the true match counts as ranked above it (a pessimistic, deterministic
convention). Captions that are textually identical to the true one still count as misses, as
in the standard COCO/Flickr protocol (they are different pairs).
"""

from __future__ import annotations

from typing import Sequence

import torch

KS = (1, 5, 10)


def _ranks(query: torch.Tensor, candidates: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Rank (0 = best) of candidate i for query i: candidates scoring >= the true one, minus itself."""
    n = query.shape[0]
    out = torch.empty(n, dtype=torch.long, device=query.device)
    for lo in range(0, n, chunk):  # [chunk, N] similarities at a time: bounded memory for big sets
        sims = query[lo : lo + chunk].float() @ candidates.float().T
        true = sims[torch.arange(sims.shape[0]), torch.arange(lo, lo + sims.shape[0])]
        out[lo : lo + chunk] = (sims >= true.unsqueeze(1)).sum(dim=1) - 1
    return out


def retrieval_recall(image_emb: torch.Tensor, text_emb: torch.Tensor, ks: Sequence[int] = KS) -> dict[str, float]:
    """{'image_to_text_r{K}', 'text_to_image_r{K}'} for each K, over pairs (image i, text i)."""
    if image_emb.shape != text_emb.shape or image_emb.dim() != 2:
        raise ValueError(f"need paired [N, e] embeddings, got {tuple(image_emb.shape)} and {tuple(text_emb.shape)}")
    if image_emb.shape[0] == 0:
        raise ValueError("no pairs to score")
    i2t, t2i = _ranks(image_emb, text_emb), _ranks(text_emb, image_emb)
    out = {}
    for k in ks:
        out[f"image_to_text_r{k}"] = (i2t < k).float().mean().item()
        out[f"text_to_image_r{k}"] = (t2i < k).float().mean().item()
    return out
