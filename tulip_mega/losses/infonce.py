"""CLIP InfoNCE (softmax contrastive) loss, dense and data-parallel, with label smoothing.

    loss = (CE(s * x @ y.T, arange(N)) + CE(s * y @ x.T, arange(N))) / 2     s = exp(t)

Label smoothing as torch's F.cross_entropy. Each row's softmax spans ALL global columns, so the
data-parallel version all-gathers both embeddings (with gradient) and each rank computes its own
rows in both directions; the mean over ranks is the dense loss (memory O(B_local * B_global)).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tulip_mega.losses.common import AllGatherRows, ScalarLike, as_scalar, check_embeddings, compute_dtype, rank_and_world

__all__ = ["DistributedInfoNCELoss", "infonce_loss"]


def _check_inputs(image_emb: torch.Tensor, text_emb: torch.Tensor, label_smoothing: float) -> None:
    check_embeddings(("image_emb", "text_emb"), image_emb, text_emb)
    if image_emb.shape[0] != text_emb.shape[0]:
        raise ValueError(
            "image_emb and text_emb must hold the same pairs (row i of each is one pair), got "
            f"shapes {tuple(image_emb.shape)} and {tuple(text_emb.shape)}"
        )
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")


def _rows_ce(rows: torch.Tensor, cols: torch.Tensor, scale: torch.Tensor, offset: int,
             label_smoothing: float) -> torch.Tensor:
    """Mean CE of rows [B, D] against cols [N, D]; row i's positive is column offset + i.

    The matmul stays in the embeddings' dtype; softmax and reduction run in float32 (or
    float64), like the sigmoid loss.
    """
    cdtype = compute_dtype(rows.dtype)
    logits = (rows @ cols.T).to(cdtype) * scale.reshape(()).to(cdtype)  # [B, N]
    target = torch.arange(offset, offset + rows.shape[0], device=rows.device)  # [B]
    return F.cross_entropy(logits, target, label_smoothing=label_smoothing)


def infonce_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: ScalarLike,
                 label_smoothing: float = 0.0) -> torch.Tensor:
    """Dense symmetric InfoNCE on one batch: (CE(s x y^T) + CE(s y x^T)) / 2.

    image_emb, text_emb: [N, D] L2-normalised, row i of each forms a positive pair.
    logit_scale: s, ALREADY exponentiated. label_smoothing: torch's semantics (see module doc).
    Returns a 0-dim tensor (float32 for half inputs). The single-process reference for
    DistributedInfoNCELoss and the path it takes with one rank.
    """
    _check_inputs(image_emb, text_emb, label_smoothing)
    scale = as_scalar("logit_scale", logit_scale, image_emb)
    return 0.5 * (_rows_ce(image_emb, text_emb, scale, 0, label_smoothing)
                  + _rows_ce(text_emb, image_emb, scale, 0, label_smoothing))


class DistributedInfoNCELoss(torch.nn.Module):
    """InfoNCE over the global batch of a data-parallel group, returned per rank.

    Each rank passes its B_local pairs (the same B_local on every rank) and gets back
    (1/2) * [(1/B_local) * sum over its images of CE against all global texts
             + (1/B_local) * sum over its texts of CE against all global images].
    Hence the mean over DP ranks equals infonce_loss on the concatenated batch, and after
    every rank's backward the embedding gradients divided by the DP size (megatron DDP's
    averaging) and the rank-averaged logit_scale gradient equal the dense gradients.

    Args:
        group: the DATA-PARALLEL process group (not the world under TP/PP). None = default
            group; with one rank, or torch.distributed not initialised, this is the dense loss.
        label_smoothing: in [0, 1), torch's F.cross_entropy semantics over the global columns.
    """

    def __init__(self, group: Optional[dist.ProcessGroup] = None, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.group = group
        self.label_smoothing = float(label_smoothing)

    def extra_repr(self) -> str:
        return f"label_smoothing={self.label_smoothing}"

    def forward(
        self, image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: ScalarLike
    ) -> torch.Tensor:
        """Per-rank loss for local [B_local, D] image/text pairs (see the class docstring)."""
        _check_inputs(image_emb, text_emb, self.label_smoothing)
        scale = as_scalar("logit_scale", logit_scale, image_emb)
        rank, world = rank_and_world(self.group)
        if world == 1:
            return infonce_loss(image_emb, text_emb, scale, self.label_smoothing)
        all_images = AllGatherRows.apply(image_emb, self.group, world)  # [W*B, D]
        all_texts = AllGatherRows.apply(text_emb, self.group, world)  # [W*B, D]
        offset = rank * image_emb.shape[0]  # my pairs' position in the global batch
        return 0.5 * (_rows_ce(image_emb, all_texts, scale, offset, self.label_smoothing)
                      + _rows_ce(text_emb, all_images, scale, offset, self.label_smoothing))
