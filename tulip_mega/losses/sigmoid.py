"""SigLIP sigmoid contrastive loss (Zhai et al. 2023), dense and data-parallel.

    logits = s * x @ y.T + b          x [B, D] images, y [N, D] texts (L2-normalised), s = exp(t)
    loss   = -(1/B) * sum_ij log sigmoid(z_ij * logits_ij),   z_ij = +1 positive, -1 negative

Every pair is an independent binary classification, so the global loss splits into blocks of
rows x columns with no global normaliser: the data-parallel "ring" version streams text blocks
around the DP ring instead of materialising the global logits. -log sigmoid(u) = softplus(-u),
so a block with a positive diagonal costs sum(softplus(logits)) - trace(logits), with no label
tensor; matmuls stay in the embeddings' dtype, the element-wise part and sums run in float32.
"""

from __future__ import annotations

from dataclasses import dataclass
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

__all__ = ["sigmoid_loss", "DistributedSigmoidLoss"]


# P2P tags. NCCL ignores tags (it matches messages per peer in issue order, which our fixed
# schedule keeps identical on all ranks); gloo matches on (peer, tag), and with 2 ranks the left
# and right neighbour are the same process, so each logical stream gets its own tag.
_TAG_TEXT_RIGHT = 0  # text block travelling to the right (rank + 1)
_TAG_TEXT_LEFT = 1  # text block travelling to the left (rank - 1)
_TAG_GRAD_RIGHT = 2  # gradient accumulator travelling with a right-going block
_TAG_GRAD_LEFT = 3  # gradient accumulator travelling with a left-going block
_TAG_RETURN_RIGHT = 4  # final hop: accumulator of a right-going block back to its owner
_TAG_RETURN_LEFT = 5  # final hop: accumulator of a left-going block back to its owner

_IMPLS = ("ring", "gather")


# --------------------------------------------------------------------------------------------
# Validation and small helpers
# --------------------------------------------------------------------------------------------


def _diag_positive_loss(
    x: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    col_offset: int = 0,
) -> torch.Tensor:
    """Autograd-differentiable loss of rows x [B, D] against columns y [N, D].

    The positives are (i, col_offset + i) for i < B; every other pair is negative. Normalised
    by B (the number of rows). Used by the dense default path and by the "gather" impl, where
    y is the gathered global text batch and col_offset the rank's first global row.
    """
    rows = x.shape[0]
    logits = pair_logits(x, y, scale, bias)  # [B, N]
    positives = logits[:, col_offset : col_offset + rows].diagonal()  # [B]
    return (F.softplus(logits).sum() - positives.sum()) / rows


# --------------------------------------------------------------------------------------------
# Dense single-process reference
# --------------------------------------------------------------------------------------------


def sigmoid_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: ScalarLike,
    logit_bias: ScalarLike,
    pair_weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Dense SigLIP loss: -(1/B) * sum_ij log sigmoid(z_ij * (s * x_i . y_j + b)).

    This is the single-process reference every distributed variant is checked against, and the
    path used when the data-parallel group has one rank.

    Args:
        image_emb: [B, D], L2-normalised.
        text_emb: [N, D], L2-normalised.
        logit_scale: scalar s, ALREADY exponentiated (pass `t.exp()`, not `t`).
        logit_bias: scalar b.
        pair_weights: optional [B, N] with entries in {+1, -1, 0}: +1 positive, -1 negative,
            0 ignored (the pair contributes nothing). Default: B == N, positives on the diagonal.
            Checking the values syncs with the device; fine for a reference, not for a hot loop.

    Returns:
        A 0-dim tensor (float32 for half-precision inputs). The normalisation is by B, the
        number of rows, also when pairs are ignored, so that masking a pair never rescales the
        other terms.
    """
    check_embeddings(("image_emb", "text_emb"), image_emb, text_emb)
    scale = as_scalar("logit_scale", logit_scale, image_emb)
    bias = as_scalar("logit_bias", logit_bias, image_emb)
    rows, cols = image_emb.shape[0], text_emb.shape[0]
    if pair_weights is None:
        if rows != cols:
            raise ValueError(
                "without pair_weights the positives are the diagonal, so image_emb and text_emb "
                f"need the same batch size, got shapes {tuple(image_emb.shape)} and "
                f"{tuple(text_emb.shape)}"
            )
        return _diag_positive_loss(image_emb, text_emb, scale, bias)

    check_weights("pair_weights", pair_weights, (rows, cols), (1.0, -1.0, 0.0))
    logits = pair_logits(image_emb, text_emb, scale, bias)  # [B, N]
    z = pair_weights.to(device=logits.device, dtype=logits.dtype)  # [B, N] in {-1, 0, 1}
    # -log sigmoid(z*l) = softplus(-z*l); |z| zeroes the ignored pairs (their gradient too).
    return (z.abs() * F.softplus(-z * logits)).sum() / rows


# --------------------------------------------------------------------------------------------
# Ring implementation: text blocks travel around the DP ring, logits are never global
# --------------------------------------------------------------------------------------------


def _exchange(
    sends: list[tuple[torch.Tensor, int, int]],
    recvs: list[tuple[torch.Tensor, int, int]],
    group: Optional[dist.ProcessGroup],
) -> None:
    """Post all sends/recvs ((tensor, global peer rank, tag)) as one batch and wait for them.

    batch_isend_irecv groups the ops (ncclGroupStart/End on NCCL), so two ranks that send to
    each other before receiving cannot deadlock; gloo runs them as independent async ops.
    """
    ops = [dist.P2POp(dist.isend, t, peer, group, tag) for t, peer, tag in sends]
    ops += [dist.P2POp(dist.irecv, t, peer, group, tag) for t, peer, tag in recvs]
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()


class _RingSchedule:
    """Who talks to whom in the bidirectional ring, in global ranks.

    W-1 foreign text blocks must visit every rank. Blocks go both ways at once: after
    `n_bidir` = (W-1)//2 steps each rank has seen the blocks of ranks r-1..r-n_bidir (arrived
    from the left, travelling right) and r+1..r+n_bidir (travelling left); when W-1 is odd one
    more right-going step brings block r-n_bidir-1. So `right_hops` = n_bidir + remainder.
    """

    def __init__(self, group: Optional[dist.ProcessGroup], rank: int, world: int) -> None:
        def global_rank(group_rank: int) -> int:
            # `group` may be a DP subgroup of a TP x PP x DP world: P2P peers are GLOBAL ranks.
            group_rank %= world
            if group is None or group is dist.group.WORLD:
                return group_rank
            return dist.get_global_rank(group, group_rank)

        self.n_bidir, self.remainder = divmod(world - 1, 2)
        self.right_hops = self.n_bidir + self.remainder
        self.left_hops = self.n_bidir
        self.right = global_rank(rank + 1)
        self.left = global_rank(rank - 1)
        # Final hop of the backward: the accumulator of the right-going block I hold belongs to
        # r - right_hops; mine (right-going) ended at r + right_hops. Mirror for left-going.
        self.owner_of_right_block = global_rank(rank - self.right_hops)
        self.holder_of_my_right_block = global_rank(rank + self.right_hops)
        self.owner_of_left_block = global_rank(rank + self.left_hops)
        self.holder_of_my_left_block = global_rank(rank - self.left_hops)


def _block_grads(
    x: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    coef: torch.Tensor,
    positive_diagonal: bool,
    need_x: bool,
    need_y: bool,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Gradients of coef * sum_ij softplus(-z_ij * l_ij) for one [B, B] block (logits recomputed).

    d/dl softplus(l) = sigmoid(l) for negatives, sigmoid(l) - 1 on a positive diagonal.
    Returns (d/dx [B, D], d/dy [B, D], d/ds, d/db) in the compute dtype.
    """
    cdtype = compute_dtype(x.dtype)
    raw = (x @ y.T).to(cdtype)  # [B_x, B_y]
    dlogits = torch.sigmoid(raw * scale + bias)  # [B_x, B_y]
    if positive_diagonal:
        dlogits.diagonal().sub_(1.0)
    dlogits.mul_(coef)
    grad_scale = torch.dot(dlogits.reshape(-1), raw.reshape(-1))  # sum(dL * raw)
    grad_bias = dlogits.sum()
    del raw
    d_in = dlogits.to(x.dtype)  # matmuls stay in the embeddings' dtype
    grad_x = (d_in @ y).to(cdtype).mul_(scale) if need_x else None  # [B_x, D]
    grad_y = (d_in.T @ x).to(cdtype).mul_(scale) if need_y else None  # [B_y, D]
    return grad_x, grad_y, grad_scale, grad_bias


def _block_loss_sum(
    x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, positive_diagonal: bool
) -> torch.Tensor:
    """sum_ij -log sigmoid(z_ij * l_ij) for one block, no autograd (called inside forward)."""
    logits = (x @ y.T).to(scale.dtype).mul_(scale).add_(bias)  # [B_x, B_y]
    total = F.softplus(logits).sum()
    if positive_diagonal:
        total = total - logits.diagonal().sum()
    return total


class _RingSigmoidLoss(torch.autograd.Function):
    """Rank-local rows x all global columns, with text blocks streamed around the ring.

    Forward: keep the own block (positives on its diagonal), then exchange text blocks with
    both neighbours; every received block is only negatives. Nothing but the inputs is saved.

    Backward: replays the same ring, recomputing each [B, B] block of logits (activation
    recomputation: saving them would cost O(W * B^2) per rank and defeat the ring). The
    gradient for a foreign text block is accumulated into a buffer that travels with the
    block; after the last step one P2P hop returns each accumulator to the block's owner. So
    peak memory per rank is O(B^2 + B*D) whatever the DP size, and every rank must call
    backward (as with DDP).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: torch.Tensor,
        y: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor,
        group: Optional[dist.ProcessGroup],
        rank: int,
        world: int,
    ) -> torch.Tensor:
        ctx.save_for_backward(x, y, scale, bias)
        ctx.group, ctx.rank, ctx.world = group, rank, world
        cdtype = compute_dtype(x.dtype)
        s = scale.detach().reshape(()).to(cdtype)
        b = bias.detach().reshape(()).to(cdtype)
        x, y = x.detach(), y.detach().contiguous()
        sched = _RingSchedule(group, rank, world)

        total = _block_loss_sum(x, y, s, b, positive_diagonal=True)
        to_right = to_left = y  # [B, D] each
        for _ in range(sched.n_bidir):
            from_left, from_right = torch.empty_like(y), torch.empty_like(y)
            _exchange(
                [(to_right, sched.right, _TAG_TEXT_RIGHT), (to_left, sched.left, _TAG_TEXT_LEFT)],
                [(from_left, sched.left, _TAG_TEXT_RIGHT), (from_right, sched.right, _TAG_TEXT_LEFT)],
                group,
            )
            to_right, to_left = from_left, from_right  # frees the blocks just sent
            total = total + _block_loss_sum(x, from_left, s, b, False)
            total = total + _block_loss_sum(x, from_right, s, b, False)
        if sched.remainder:
            from_left = torch.empty_like(y)
            _exchange(
                [(to_right, sched.right, _TAG_TEXT_RIGHT)],
                [(from_left, sched.left, _TAG_TEXT_RIGHT)],
                group,
            )
            total = total + _block_loss_sum(x, from_left, s, b, False)
        return total / x.shape[0]

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        ring = _RingBackward(ctx, grad_out)
        ring.replay()
        ring.return_accumulators()
        return (*ring.input_grads(ctx.needs_input_grad), None, None, None)


@dataclass(frozen=True)
class _Way:
    """One direction around the ring: where its blocks go, where they come from, their tags."""

    name: str
    send_to: int
    recv_from: int
    text_tag: int
    grad_tag: int


class _RingBackward:
    """The backward of `_RingSigmoidLoss` on one rank.

    Replays the forward's ring, recomputing each block's logits; the gradient for a foreign
    text block goes into an accumulator [B, D] (compute dtype) that travels with the block from
    the second step on, and `return_accumulators` hands each one back to the block's owner.
    """

    def __init__(self, ctx, grad_out: torch.Tensor) -> None:
        x, y, scale, bias = ctx.saved_tensors
        self.group, self.world = ctx.group, ctx.world
        self.sched = sched = _RingSchedule(ctx.group, ctx.rank, ctx.world)
        self.need_x, self.need_y = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        cdtype = compute_dtype(x.dtype)
        self.s = scale.detach().reshape(()).to(cdtype)
        self.b = bias.detach().reshape(()).to(cdtype)
        self.x, self.y = x.detach(), y.detach().contiguous()
        self.scale, self.bias = scale, bias
        self.coef = grad_out.detach().reshape(()).to(cdtype) / x.shape[0]
        self.grad_x, self.grad_y, self.grad_s, self.grad_b = _block_grads(
            self.x, self.y, self.s, self.b, self.coef, True, self.need_x, self.need_y)
        self.right = _Way("right", sched.right, sched.left, _TAG_TEXT_RIGHT, _TAG_GRAD_RIGHT)
        self.left = _Way("left", sched.left, sched.right, _TAG_TEXT_LEFT, _TAG_GRAD_LEFT)
        self.blocks = {"right": self.y, "left": self.y}  # the text block travelling each way
        self.accs: dict[str, Optional[torch.Tensor]] = {"right": None, "left": None}  # and its accumulator

    def replay(self) -> None:
        """The forward's schedule: n_bidir steps both ways, then one more to the right if W-1 is odd."""
        for _ in range(self.sched.n_bidir):
            self._hop((self.right, self.left))
        if self.sched.remainder:
            self._hop((self.right,))

    def _hop(self, ways: tuple[_Way, ...]) -> None:
        """Pass each way's block (and accumulator, once it exists) on, receive the next, absorb it."""
        arrived = [torch.empty_like(self.y) for _ in ways]
        sends = [(self.blocks[w.name], w.send_to, w.text_tag) for w in ways]
        recvs = [(block, w.recv_from, w.text_tag) for w, block in zip(ways, arrived)]
        acc_arrived: list[Optional[torch.Tensor]] = [None] * len(ways)
        for i, w in enumerate(ways):
            acc = self.accs[w.name]
            if acc is not None:
                acc_arrived[i] = torch.empty_like(acc)
                sends.append((acc, w.send_to, w.grad_tag))
                recvs.append((acc_arrived[i], w.recv_from, w.grad_tag))
        _exchange(sends, recvs, self.group)
        del sends  # drop the blocks/accumulators just sent before computing (peak memory)
        for w, block in zip(ways, arrived):
            self.blocks[w.name], self.accs[w.name] = block, None
        for w, block, acc in zip(ways, arrived, acc_arrived):
            self.accs[w.name] = self._absorb(block, acc)

    def _absorb(self, block: torch.Tensor, acc: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Add one foreign block's contribution; returns its updated travelling accumulator."""
        gx, gy, gs, gb = _block_grads(self.x, block, self.s, self.b, self.coef, False, self.need_x, self.need_y)
        if self.need_x:
            self.grad_x.add_(gx)
        self.grad_s, self.grad_b = self.grad_s + gs, self.grad_b + gb
        if not self.need_y:
            return None
        return gy if acc is None else acc.add_(gy)

    def return_accumulators(self) -> None:
        """Final hop: hand each travelling accumulator back to the rank that owns the block."""
        if not (self.need_y and self.world > 1):
            return
        sched = self.sched
        mine_right = torch.empty_like(self.grad_y)
        sends = [(self.accs["right"], sched.owner_of_right_block, _TAG_RETURN_RIGHT)]
        recvs = [(mine_right, sched.holder_of_my_right_block, _TAG_RETURN_RIGHT)]
        mine_left = None
        if sched.left_hops:
            mine_left = torch.empty_like(self.grad_y)
            sends.append((self.accs["left"], sched.owner_of_left_block, _TAG_RETURN_LEFT))
            recvs.append((mine_left, sched.holder_of_my_left_block, _TAG_RETURN_LEFT))
        _exchange(sends, recvs, self.group)
        self.grad_y.add_(mine_right)
        if mine_left is not None:
            self.grad_y.add_(mine_left)

    def input_grads(self, needs: tuple[bool, ...]) -> tuple[Optional[torch.Tensor], ...]:
        """(d/dx, d/dy, d/dscale, d/dbias) in the inputs' dtypes and shapes, None where not needed."""
        return (
            self.grad_x.to(self.x.dtype) if self.need_x else None,
            self.grad_y.to(self.y.dtype) if self.need_y else None,
            self.grad_s.reshape(self.scale.shape).to(self.scale.dtype) if needs[2] else None,
            self.grad_b.reshape(self.bias.shape).to(self.bias.dtype) if needs[3] else None,
        )


# --------------------------------------------------------------------------------------------
# Public module
# --------------------------------------------------------------------------------------------


class DistributedSigmoidLoss(torch.nn.Module):
    """SigLIP loss over the global batch of a data-parallel group, returned per rank.

    Each rank passes its local batch (B_local image/text pairs, the same B_local on every rank;
    positives on the local diagonal, every other pair in the global batch negative) and gets
    back -(1/B_local) * sum over ITS rows against ALL global columns. Hence:

      * mean over DP ranks of the returned losses == sigmoid_loss on the concatenated batch;
      * after every rank calls backward on its own loss, the gradient on each rank's
        embeddings divided by the DP size equals the dense gradient for those rows, and the
        logit_scale / logit_bias gradients averaged over ranks equal the dense ones. That is
        exactly what megatron's DDP (gradient averaging over DP) expects.

    Args:
        group: the DATA-PARALLEL process group. Under tensor/pipeline parallelism the world
            also holds the other model-parallel ranks, so passing the world would mix batches
            that are not separate samples. None = the default (world) group.
        impl: "ring" (default): text blocks travel around the DP ring with bidirectional P2P
            neighbour exchange (open_clip-style); per-rank memory O(B_local^2 + B_local*D),
            independent of the DP size. "gather": all-gather the texts with gradient and
            compute the local rows against all columns densely; simpler and fewer messages,
            but memory O(B_local * B_global).

    With one rank in the group (or torch.distributed not initialised and group None) this is
    the dense loss.
    """

    def __init__(self, group: Optional[dist.ProcessGroup] = None, impl: str = "ring") -> None:
        super().__init__()
        if impl not in _IMPLS:
            raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
        self.group = group
        self.impl = impl

    def extra_repr(self) -> str:
        return f"impl={self.impl!r}"

    def forward(
        self,
        image_emb_local: torch.Tensor,
        text_emb_local: torch.Tensor,
        logit_scale: ScalarLike,
        logit_bias: ScalarLike,
    ) -> torch.Tensor:
        """Per-rank loss for local [B_local, D] image/text pairs (see the class docstring)."""
        check_embeddings(("image_emb", "text_emb"), image_emb_local, text_emb_local)
        if image_emb_local.shape[0] != text_emb_local.shape[0]:
            raise ValueError(
                "image_emb_local and text_emb_local must hold the same pairs, got shapes "
                f"{tuple(image_emb_local.shape)} and {tuple(text_emb_local.shape)}"
            )
        scale = as_scalar("logit_scale", logit_scale, image_emb_local)
        bias = as_scalar("logit_bias", logit_bias, image_emb_local)
        rank, world = rank_and_world(self.group)
        if world == 1:
            return _diag_positive_loss(image_emb_local, text_emb_local, scale, bias)
        if self.impl == "ring":
            return _RingSigmoidLoss.apply(
                image_emb_local, text_emb_local, scale, bias, self.group, rank, world
            )
        texts = AllGatherRows.apply(text_emb_local, self.group, world)  # [W*B_local, D]
        return _diag_positive_loss(
            image_emb_local, texts, scale, bias, col_offset=rank * image_emb_local.shape[0]
        )
