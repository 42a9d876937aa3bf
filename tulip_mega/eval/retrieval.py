"""Image-text retrieval by the COCO / Flickr30k protocol: recall@K in both directions.

A set has N images and M >= N captions; `text_image[j]` is the image caption j describes (COCO
and Flickr30k have five per image). image->text: for each image, rank all M captions by cosine
similarity; a hit at K when ANY of the image's own captions is among the K best. text->image:
for each caption, rank all N images; a hit at K when its image is among the K best. With one
caption per image (text_image = 0..N-1) this is the usual paired recall.

A candidate tied with the best true match counts as ranked above it (a pessimistic,
deterministic convention). Captions that are textually identical but belong to another image
still count as misses, as in the standard protocol (they describe a different image).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

KS = (1, 5, 10)


def _ranks(query: torch.Tensor, candidates: torch.Tensor, positive_of: torch.Tensor, query_side: bool,
           chunk: int = 4096) -> torch.Tensor:
    """Rank (0 = best) of each query's best true candidate: the false candidates scoring >= it.

    `positive_of` is the caption -> image index; `query_side` says whether it indexes the
    queries (the queries are captions: text->image) or the candidates (image->text)."""
    n = query.shape[0]
    out = torch.empty(n, dtype=torch.long, device=query.device)
    for lo in range(0, n, chunk):  # [chunk, M] similarities at a time: bounded memory for big sets
        sims = query[lo : lo + chunk].float() @ candidates.float().T
        rows = torch.arange(lo, lo + sims.shape[0], device=query.device)
        if query_side:  # caption j's one true image
            positive = torch.zeros_like(sims, dtype=torch.bool)
            positive[torch.arange(sims.shape[0]), positive_of[rows]] = True
        else:  # image i's captions
            positive = positive_of.unsqueeze(0) == rows.unsqueeze(1)
        best = sims.masked_fill(~positive, float("-inf")).amax(dim=1, keepdim=True)
        out[lo : lo + sims.shape[0]] = ((sims >= best) & ~positive).sum(dim=1)
    return out


def retrieval_recall(image_emb: torch.Tensor, text_emb: torch.Tensor, ks: Sequence[int] = KS,
                     text_image: Optional[torch.Tensor] = None) -> dict[str, float]:
    """{'image_to_text_r{K}', 'text_to_image_r{K}'} for each K.

    image_emb [N, e], text_emb [M, e]; `text_image` [M] maps each caption to its image (None:
    M == N and caption i belongs to image i). Every image needs at least one caption."""
    if image_emb.dim() != 2 or text_emb.dim() != 2 or image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(f"need [N, e] image and [M, e] caption embeddings, got {tuple(image_emb.shape)} and "
                         f"{tuple(text_emb.shape)}")
    n, m = image_emb.shape[0], text_emb.shape[0]
    if n == 0:
        raise ValueError("no pairs to score")
    if text_image is None:
        if m != n:
            raise ValueError(f"need paired embeddings (one caption per image) without text_image, got {n} images "
                             f"and {m} captions")
        text_image = torch.arange(n)
    text_image = text_image.long().to(image_emb.device)
    if text_image.shape != (m,) or (m and (text_image.min() < 0 or text_image.max() >= n)):
        raise ValueError(f"text_image must map each of the {m} captions to an image in [0, {n})")
    without = torch.nonzero(torch.bincount(text_image, minlength=n) == 0).flatten().tolist()
    if without:
        raise ValueError(f"images {without[:5]} have no caption ({len(without)} of {n})")
    i2t = _ranks(image_emb, text_emb, text_image, query_side=False)
    t2i = _ranks(text_emb, image_emb, text_image, query_side=True)
    out = {}
    for k in ks:
        out[f"image_to_text_r{k}"] = (i2t < k).float().mean().item()
        out[f"text_to_image_r{k}"] = (t2i < k).float().mean().item()
    return out
