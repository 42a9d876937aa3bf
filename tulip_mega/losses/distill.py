"""SigLIP 2's self-distillation losses (Tschannen et al. 2025, section 2.3): DINO's
cross-entropy between a centred, sharpened teacher distribution and the student's.

    L = mean over student rows r of  - sum_k  softmax((t_r - c) / tau_t)_k  log softmax(s_r / tau_s)_k

self_distill (SILC, Naeem et al. 2024): the rows are the student's local crops, each against the
teacher's one global crop of the same image (t broadcast over the crops). masked_prediction
(TIPS, Maninis et al. 2025; iBOT's patch loss): the rows are the masked patches of the student's
view, each against the teacher's feature of the same patch in the unmasked view. The teacher
side carries no gradient. docs/losses.md gives the formulas and where each default comes from.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def distill_cross_entropy(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor,
                          student_temperature: float, teacher_temperature: float) -> torch.Tensor:
    """student [..., K] logits; teacher [..., K] broadcastable to it (no gradient flows into it);
    center [K]. Returns the mean over the student's rows of the cross-entropy above, float32."""
    target = F.softmax((teacher.detach().float() - center.float()) / teacher_temperature, dim=-1)
    log_student = F.log_softmax(student.float() / student_temperature, dim=-1)
    return -(target * log_student).sum(-1).mean()


def distill_chance_loss(prototypes: int) -> float:
    """The loss of a student that has learned nothing (a uniform distribution over the K
    prototypes), whatever the teacher: log K."""
    return math.log(prototypes)
