"""Weighted sigmoid loss between arbitrary row and column sets, across data parallel.

TULIP's image-image, text-text and hard-negative image-text terms are SigLIP losses whose
positives are not a diagonal, so the loss takes pair weights w in {+1, -1, 0} (positive,
negative, ignored):  loss = (1/R) * sum_rc |w_rc| * softplus(-w_rc * (s * rows @ cols.T + b)).

Under data parallelism the columns are every rank's columns in group-rank order. A rank gives
how its rows weigh its own columns (`local_weights`) and one number per column for how every
other rank's rows see it (`remote_col_weights`: -1 or 0): pairs across ranks are different
samples, so they can only be negatives. `same_sample_weights` builds both from sample labels.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tulip_mega.losses.common import (
    AllGatherRows,
    ScalarLike,
    as_scalar,
    check_embeddings,
    check_weights,
    compute_dtype,
    pair_logits,
    rank_and_world,
)

__all__ = ["DistributedPairSigmoidLoss", "pair_sigmoid_loss", "same_sample_weights"]


# --------------------------------------------------------------------------------------------
# Validation and process-group helpers (also used by infonce.py)
# --------------------------------------------------------------------------------------------


def _weighted_loss(rows: torch.Tensor, cols: torch.Tensor, weights: torch.Tensor,
                   scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """(1/R) * sum |w| * softplus(-w * logits), element-wise part in float32 (or float64)."""
    logits = pair_logits(rows, cols, scale, bias)  # [R, C]
    w = weights.to(device=logits.device, dtype=logits.dtype)  # [R, C]
    # |w| zeroes the ignored pairs, and their gradient, exactly.
    return (w.abs() * F.softplus(-w * logits)).sum() / rows.shape[0]


# --------------------------------------------------------------------------------------------
# Dense reference and the weight-matrix helper
# --------------------------------------------------------------------------------------------


def pair_sigmoid_loss(rows: torch.Tensor, cols: torch.Tensor, weights: torch.Tensor,
                      logit_scale: ScalarLike, logit_bias: ScalarLike) -> torch.Tensor:
    """Dense weighted sigmoid loss (1/R) * sum_rc |w_rc| softplus(-w_rc (s <x_r, y_c> + b)).

    rows [R, D] and cols [C, D] L2-normalised, weights [R, C] in {+1, -1, 0}, logit_scale
    already exponentiated. Returns a 0-dim tensor (float32 for half inputs). The
    normalisation is by R whatever the number of ignored pairs, so masking a pair never
    rescales the others.
    """
    check_embeddings(("rows", "cols"), rows, cols)
    check_weights("weights", weights, (rows.shape[0], cols.shape[0]), (1.0, -1.0, 0.0))
    scale = as_scalar("logit_scale", logit_scale, rows)
    bias = as_scalar("logit_bias", logit_bias, rows)
    return _weighted_loss(rows, cols, weights, scale, bias)


def same_sample_weights(
    row_sample: torch.Tensor,
    col_sample: torch.Tensor,
    col_weight: torch.Tensor,
    col_valid: Optional[torch.Tensor] = None,
    same_object: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(local_weights [R, C], remote_col_weights [C]) for DistributedPairSigmoidLoss.

    Rows and columns are labelled with the LOCAL sample they come from (e.g. view v of image i
    has sample label i). The weight of row r against column c is

        0              if column c is not valid (padding slot, missing GeCo field),
        0              if (r, c) is the same object (an embedding against itself),
        col_weight[c]  if they come from the same sample (+1 crop / paraphrase, -1 GeCo
                       negative, 0 to ignore),
        -1             otherwise (another sample: a plain negative).

    Every other rank's rows come from other samples, so they see column c as -1 when it is
    valid and 0 otherwise: that is `remote_col_weights`.

    Args:
        row_sample: [R] integer sample label of each row.
        col_sample: [C] integer sample label of each column.
        col_weight: [C] in {+1, -1, 0}: how rows of the column's own sample weigh it.
        col_valid: [C] bool, whether the column exists. Default: col_weight != 0 (a column
            that does not even pair with its own sample is treated as absent).
        same_object: optional (row_object [R], col_object [C]) integer ids; a pair with equal
            ids is one embedding against itself and is ignored. For image-image with the same
            views as rows and columns pass (arange(V), arange(V)).

    Returns float32 tensors on col_weight's device.
    """
    for name, t in (("row_sample", row_sample), ("col_sample", col_sample)):
        if t.dim() != 1 or t.is_floating_point() or t.dtype == torch.bool:
            raise ValueError(f"{name} must be a 1-D integer tensor, got {t.dtype} of shape {tuple(t.shape)}")
    num_cols = col_sample.shape[0]
    check_weights("col_weight", col_weight, (num_cols,), (1.0, -1.0, 0.0))
    if col_valid is None:
        col_valid = col_weight != 0
    elif col_valid.dtype != torch.bool or tuple(col_valid.shape) != (num_cols,):
        raise ValueError(f"col_valid must be a bool tensor of shape ({num_cols},), got "
                         f"{col_valid.dtype} of shape {tuple(col_valid.shape)}")
    valid = col_valid.to(torch.float32)  # [C]
    same = row_sample[:, None] == col_sample[None, :]  # [R, C]
    weights = torch.where(same, col_weight.to(torch.float32)[None, :], -1.0) * valid[None, :]
    if same_object is not None:
        row_object, col_object = same_object
        if tuple(row_object.shape) != tuple(row_sample.shape) or tuple(col_object.shape) != (num_cols,):
            raise ValueError(
                f"same_object must be (row_object {tuple(row_sample.shape)}, col_object ({num_cols},)), "
                f"got shapes {tuple(row_object.shape)} and {tuple(col_object.shape)}"
            )
        weights = weights.masked_fill(row_object[:, None] == col_object[None, :], 0.0)
    return weights, -valid


# --------------------------------------------------------------------------------------------
# Public module
# --------------------------------------------------------------------------------------------


class DistributedPairSigmoidLoss(torch.nn.Module):
    """Weighted sigmoid loss of this rank's rows against the columns of the whole DP group.

    Per rank: (1/R) * sum over MY rows r and ALL global columns c of |w| softplus(-w l_rc),
    where the global columns are every rank's `cols` concatenated in group-rank order, and
    w = local_weights[r, c] for my own columns, remote_col_weights_p[c] for column c of
    rank p != me. Implemented by all-gathering the columns with gradient (the backward
    reduce-scatters, i.e. sums, each column's gradient back to its owner) and the remote
    weights without gradient, then one dense [R, W*C] block in float32. Memory O(R * W*C).

    Contract (with the same R and C on every rank; pad columns with weight 0 if needed):
      * the mean over ranks of the returned losses equals pair_sigmoid_loss on the
        concatenated rows/columns with the block weight matrix [local on the diagonal
        blocks, remote column weights elsewhere];
      * after every rank's backward, gradients divided by the DP size (what megatron's DDP
        averaging does) equal that dense loss's gradients for rows, columns, scale and bias.

    Args:
        group: the DATA-PARALLEL group (not the world under TP/PP). None = default group;
            with one rank, or torch.distributed not initialised, this is the dense loss.
    """

    def __init__(self, group: Optional[dist.ProcessGroup] = None) -> None:
        super().__init__()
        self.group = group

    def forward(
        self,
        rows: torch.Tensor,
        cols: torch.Tensor,
        local_weights: torch.Tensor,
        remote_col_weights: torch.Tensor,
        logit_scale: ScalarLike,
        logit_bias: ScalarLike,
        row_valid: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """This rank's 0-dim loss.

        rows [R, D], cols [C, D] (L2-normalised), local_weights [R, C] in {+1,-1,0},
        remote_col_weights [C] in {-1, 0}. row_valid: optional [R] bool; a False row (a padding
        anchor, e.g. a missing GeCo image edit) is ignored against EVERY column, local and
        remote, which local_weights alone cannot express. The normalisation stays 1/R.
        """
        check_embeddings(("rows", "cols"), rows, cols)
        num_rows, num_cols = rows.shape[0], cols.shape[0]
        check_weights("local_weights", local_weights, (num_rows, num_cols), (1.0, -1.0, 0.0))
        check_weights("remote_col_weights", remote_col_weights, (num_cols,), (-1.0, 0.0))
        if row_valid is not None and (row_valid.dtype != torch.bool or tuple(row_valid.shape) != (num_rows,)):
            raise ValueError(f"row_valid must be a bool tensor of shape ({num_rows},), got "
                             f"{row_valid.dtype} of shape {tuple(row_valid.shape)}")
        scale = as_scalar("logit_scale", logit_scale, rows)
        bias = as_scalar("logit_bias", logit_bias, rows)
        rank, world = rank_and_world(self.group)
        if world == 1:
            weights = local_weights
            if row_valid is not None:
                weights = weights * row_valid.to(device=weights.device, dtype=weights.dtype)[:, None]
            return _weighted_loss(rows, cols, weights, scale, bias)

        all_cols = AllGatherRows.apply(cols, self.group, world)  # [W*C, D]
        cdtype = compute_dtype(rows.dtype)
        remote = remote_col_weights.detach().to(device=cols.device, dtype=cdtype).contiguous()
        all_remote = remote.new_empty(world * num_cols)  # [W*C]
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(all_remote, remote, group=self.group)
        weights = all_remote[None, :].repeat(num_rows, 1)  # [R, W*C]: how I see foreign columns
        own = slice(rank * num_cols, (rank + 1) * num_cols)
        weights[:, own] = local_weights.to(device=weights.device, dtype=cdtype)
        if row_valid is not None:
            weights *= row_valid.to(device=weights.device, dtype=cdtype)[:, None]
        return _weighted_loss(rows, all_cols, weights, scale, bias)
