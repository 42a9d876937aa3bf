"""Contrastive losses for TULIP / SigLIP pretraining."""

from tulip_mega.losses.sigmoid import DistributedSigmoidLoss, sigmoid_loss

__all__ = ["DistributedSigmoidLoss", "sigmoid_loss"]
