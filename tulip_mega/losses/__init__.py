"""Contrastive and reconstruction losses for TULIP / SigLIP / CLIP pretraining."""

from tulip_mega.losses.infonce import DistributedInfoNCELoss, infonce_loss
from tulip_mega.losses.pairwise import DistributedPairSigmoidLoss, pair_sigmoid_loss, same_sample_weights
from tulip_mega.losses.reconstruction import causal_text_loss, mae_loss, mae_mask, mae_targets, patchify
from tulip_mega.losses.sigmoid import DistributedSigmoidLoss, sigmoid_loss

__all__ = [
    "DistributedInfoNCELoss",
    "DistributedPairSigmoidLoss",
    "DistributedSigmoidLoss",
    "causal_text_loss",
    "infonce_loss",
    "mae_loss",
    "mae_mask",
    "mae_targets",
    "pair_sigmoid_loss",
    "patchify",
    "same_sample_weights",
    "sigmoid_loss",
]
