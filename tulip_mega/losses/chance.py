"""The loss of a model that has learned nothing: the plateau a contrastive term sits on.

With one logit z for every pair, per row with P positive and N negative pair weight:
  sigmoid:  min_z P softplus(-z) + N softplus(z) = P log(1 + N/P) + N log(1 + P/N)
  InfoNCE over B columns: log B (whatever the label smoothing).
The trainer logs it beside each term (`chance/<term>`) and warns when a term stays within 1%
of it (training/plateau.py); docs/losses.md "Plateau".
"""

from __future__ import annotations

import math
from typing import Union

import torch

Number = Union[float, torch.Tensor]


def sigmoid_chance_loss(positive: Number, negative: Number) -> Number:
    """min over a shared logit of P softplus(-z) + N softplus(z) (closed form, see above);
    `positive`/`negative` are the per-row pair weights. 0 when either is 0 (then a constant
    logit drives the loss to 0)."""
    if isinstance(positive, torch.Tensor) or isinstance(negative, torch.Tensor):
        p = torch.as_tensor(positive, dtype=torch.float64)
        n = torch.as_tensor(negative, dtype=torch.float64)
        value = p * torch.log1p(n / p) + n * torch.log1p(p / n)
        return torch.where((p > 0) & (n > 0), value, torch.zeros_like(value))
    if positive <= 0 or negative <= 0:
        return 0.0
    return positive * math.log1p(negative / positive) + negative * math.log1p(positive / negative)


def infonce_chance_loss(columns: int) -> float:
    """log B: the symmetric InfoNCE of equal logits over B columns."""
    return math.log(columns)


def weighted_pairs_chance_loss(local: torch.Tensor, remote: torch.Tensor, dp_size: int) -> torch.Tensor:
    """The sigmoid chance loss of a weighted pair term (losses/pairwise.py): `local` [rows, cols]
    are this rank's row weights (+ positive, - negative, 0 ignored); `remote` [cols] how the
    rows of another data-parallel rank see this rank's columns. Every rank is assumed to hold
    as many valid columns as this one (exact for full batches). Tensor ops only: no sync."""
    rows = local.shape[0]
    positive = local.clamp(min=0).sum(dtype=torch.float64) / rows
    negative = local.clamp(max=0).abs().sum(dtype=torch.float64) / rows + (dp_size - 1) * remote.abs().sum(
        dtype=torch.float64)
    return sigmoid_chance_loss(positive, negative)
