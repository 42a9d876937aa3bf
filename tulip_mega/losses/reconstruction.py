"""Reconstruction losses of TULIP: masked-image modelling (MAE) and causal caption decoding.

MAE (He et al. 2022): per-pixel MSE on the MASKED patches against per-patch normalised pixels,
exactly as facebookresearch/mae `patchify` / `forward_loss` (unbiased variance, eps 1e-6). The
mask of a sample is a function of (seed, step, sample key) only, so every parallel layout and
a resumed run see the same masks. The caption decoder's logits are vocab-parallel; its cross
entropy is megatron-core's `vocab_parallel_cross_entropy`, which never gathers the vocabulary.
"""

from __future__ import annotations

import zlib
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from tulip_mega.losses.common import require_all

__all__ = ["causal_text_loss", "mae_loss", "mae_mask", "mae_targets", "patchify"]


# --------------------------------------------------------------------------------------------
# MAE
# --------------------------------------------------------------------------------------------


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, S, p*p*C] patches, S = (H/p) * (W/p).

    Patch index = row * (W/p) + col, the order of a stride-p Conv2d's flattened output (the
    vision tower's patch order); inside a patch the layout is (p, p, C), channel last, as in
    MAE's `patchify`.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
    b, c, h, w = images.shape
    if patch < 1 or h % patch or w % patch:
        raise ValueError(f"image size {h}x{w} must be divisible by patch={patch}")
    gh, gw = h // patch, w // patch
    x = images.reshape(b, c, gh, patch, gw, patch)
    x = x.permute(0, 2, 4, 3, 5, 1)  # [B, gh, gw, p, p, C]
    return x.reshape(b, gh * gw, patch * patch * c)


def mae_targets(images: torch.Tensor, patch: int, norm_pix: bool, eps: float = 1e-6) -> torch.Tensor:
    """[B, S, p*p*C] reconstruction targets; with norm_pix each patch is (x - mean) / sqrt(var + eps).

    mean/var are over the p*p*C values of the patch; var is UNBIASED (divides by n - 1)
    because MAE's official code uses torch's default `.var(dim=-1)`. Computed in float32 for
    half inputs.
    """
    target = patchify(images, patch)
    target = target.to(torch.promote_types(target.dtype, torch.float32))
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)  # unbiased, as MAE
        target = (target - mean) / (var + eps) ** 0.5
    return target


def mae_loss(pred: torch.Tensor, images: torch.Tensor, masked_idx: torch.Tensor, patch: int,
             norm_pix: bool) -> torch.Tensor:
    """Mean over masked patches of the per-pixel MSE between pred and the (normalised) pixels.

    Args:
        pred: [B, M, p*p*C] decoder predictions for the masked patches, in masked_idx order.
        images: [B, C, H, W] the un-masked input images.
        masked_idx: [B, M] int64 patch indices (see `mae_mask`).
    Returns a 0-dim float32 (or float64) tensor. Equal to MAE's
    ((pred - target)**2).mean(-1) * mask).sum() / mask.sum(), as every sample masks M patches.
    """
    target = mae_targets(images, patch, norm_pix)  # [B, S, P]
    b, s, p = target.shape
    if masked_idx.dim() != 2 or masked_idx.shape[0] != b or masked_idx.dtype != torch.int64:
        raise ValueError(f"masked_idx must be int64 [B={b}, M], got {masked_idx.dtype} of shape "
                         f"{tuple(masked_idx.shape)}")
    m = masked_idx.shape[1]
    if tuple(pred.shape) != (b, m, p):
        raise ValueError(f"pred must have shape [B, M, p*p*C] = ({b}, {m}, {p}), got {tuple(pred.shape)}")
    if m == 0:
        raise ValueError("masked_idx selects no patch: the MAE loss is undefined")
    idx = masked_idx.to(target.device)[:, :, None].expand(b, m, p)  # [B, M, P]
    masked_target = torch.gather(target, 1, idx)  # [B, M, P]
    return F.mse_loss(pred.to(target.dtype), masked_target)


def _sample_seed(seed: int, step: int, key: str, salt: str = "") -> int:
    """Stable 32-bit seed for one sample: crc32 of "seed:step:key" (Python's hash is salted),
    with `salt` appended for a mask other than MAE's."""
    return zlib.crc32(f"{seed}:{step}:{key}{salt}".encode("utf-8"))


def mae_mask(keys: Sequence[str], step: int, seed: int, num_patches: int, num_visible: int,
             device: Optional[torch.device] = None, salt: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """(visible_idx [B, num_visible], masked_idx [B, num_patches - num_visible]), int64, sorted.

    Sample i's mask is a random permutation of the patches drawn from a torch.Generator
    seeded with crc32(f"{seed}:{step}:{keys[i]}"): the first num_visible patches are visible,
    the rest masked. It depends only on (seed, step, key), never on the batch composition,
    the DP rank or the TP/PP layout. Equal keys in one batch get equal masks. Another `salt`
    draws an independent mask (masked_prediction's, "|masked_prediction").
    """
    if not 0 < num_visible < num_patches:
        raise ValueError(f"num_visible must be in [1, num_patches - 1] = [1, {num_patches - 1}], "
                         f"got {num_visible} (num_patches={num_patches})")
    perms = []
    for key in keys:
        g = torch.Generator().manual_seed(_sample_seed(seed, step, str(key), salt))
        perms.append(torch.randperm(num_patches, generator=g))
    if not perms:
        raise ValueError("mae_mask needs at least one key")
    perm = torch.stack(perms)  # [B, S]
    visible = perm[:, :num_visible].sort(dim=1).values
    masked = perm[:, num_visible:].sort(dim=1).values
    if device is not None:
        visible, masked = visible.to(device), masked.to(device)
    return visible, masked


# --------------------------------------------------------------------------------------------
# Causal text reconstruction
# --------------------------------------------------------------------------------------------


def causal_text_loss(logits: torch.Tensor, targets: torch.Tensor, pad_id: int,
                     divisor: Optional[float] = None) -> torch.Tensor:
    """Token cross entropy summed over the positions whose target is not padding, divided by
    `divisor`; by default their number (the mean token cross entropy of this batch).

    Args:
        logits: [L, B, V_local] vocab-parallel: each tensor-parallel rank holds a contiguous
            V/tp slice of the vocabulary (megatron's convention). Position t's logits predict
            targets[:, t]: the caller does the causal shift. Like megatron, float32 logits
            are overwritten in place (saves an [L, B, V] copy); pass a clone if you need them.
        targets: [B, L] int64 token ids in [0, V).
        pad_id: the ignored target id, the tokenizer's pad id.
        divisor: the training step passes the step's token count per micro-batch
            (losses/token_count.py), so that the step's loss is the mean over all of its
            tokens whatever the split into micro-batches and data-parallel ranks.

    Uses megatron.core.tensor_parallel.vocab_parallel_cross_entropy over the TP group when
    megatron's parallel state is initialised (any TP, 1 included); without it the logits
    are taken as the full vocabulary (single-process use). Returns a 0-dim float32 tensor;
    0 (with zero gradients) when every target is padding.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be [L, B, V_local], got shape {tuple(logits.shape)}")
    seq, batch, v_local = logits.shape
    if targets.dim() != 2 or tuple(targets.shape) != (batch, seq) or targets.dtype != torch.int64:
        raise ValueError(f"targets must be int64 [B, L] = ({batch}, {seq}) to match logits "
                         f"{tuple(logits.shape)}, got {targets.dtype} of shape {tuple(targets.shape)}")
    from megatron.core import parallel_state

    tp = 1
    if parallel_state.model_parallel_is_initialized():
        tp = parallel_state.get_tensor_model_parallel_world_size()
    vocab = v_local * tp
    in_vocab = (targets >= 0) & (targets < vocab)
    require_all(in_vocab, lambda: f"targets must be token ids in [0, {vocab}) (V_local={v_local} x tp={tp}), "
                                  f"found e.g. {targets[~in_vocab][:5].tolist()}")

    tokens = targets.T.contiguous()  # [L, B], the logits' layout
    if parallel_state.model_parallel_is_initialized():
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        per_token = vocab_parallel_cross_entropy(logits.contiguous(), tokens)  # [L, B] float32
    else:
        per_token = F.cross_entropy(logits.float().reshape(-1, v_local), tokens.reshape(-1),
                                    reduction="none").reshape(seq, batch)  # [L, B]
    keep = (tokens != pad_id).to(per_token.dtype)  # [L, B]
    total = (per_token * keep).sum()
    if divisor is None:
        return total / keep.sum().clamp(min=1.0)
    if not divisor > 0:
        raise ValueError(f"divisor must be > 0, got {divisor}")
    return total / divisor
