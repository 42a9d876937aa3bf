"""`ModelOutputs`: what the model's last stage hands the loss stack (and eval).

One frozen record instead of a dict of optional string keys: every field the towers always
produce is required; the fields of switched-off terms are None. Each contrastive term has its
own logit scale and bias; where the recipe shares them (`model.separate_logit_params: false`)
the model fills the image-text ones in, so the loss never falls back to another field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class ModelOutputs:
    """Embeddings are L2-normalised float32; scales are exp(learned log-scale)."""

    image_emb: torch.Tensor  # [b, e] the first global view
    text_emb: torch.Tensor  # [b, e] the caption
    logit_scale: torch.Tensor  # image_text (and aug's InfoNCE shares nothing with it)
    logit_bias: torch.Tensor
    ii_logit_scale: torch.Tensor  # image_image
    ii_logit_bias: torch.Tensor
    tt_logit_scale: torch.Tensor  # text_text
    tt_logit_bias: torch.Tensor
    view_emb: Optional[torch.Tensor] = None  # [V, b, e] every image view, view-major (first, crops, edits, locals)
    texts_emb: Optional[torch.Tensor] = None  # [T, b, e] every text (caption, paraphrases, negatives, EDA)
    aug_image: Optional[torch.Tensor] = None  # [b, e] clip-rocket: projected augmented crop
    aug_text: Optional[torch.Tensor] = None  # [b, e] clip-rocket: projected EDA caption
    aug_logit_scale: Optional[torch.Tensor] = None
    mae_pred: Optional[torch.Tensor] = None  # [b, masked, 3 p^2] predicted pixels of the masked patches
    text_logits: Optional[torch.Tensor] = None  # [L, b, vocab / TP] causal caption decoder
    # SigLIP 2's EMA-teacher terms: head logits over the K prototypes (float32), the teacher's
    # without gradient, and the centres its softmax is taken against.
    distill_student: Optional[torch.Tensor] = None  # [n_local, b, K] the student's local crops
    distill_teacher: Optional[torch.Tensor] = None  # [b, K] the teacher's global crop
    distill_center: Optional[torch.Tensor] = None  # [K]
    masked_student: Optional[torch.Tensor] = None  # [m, b, K] the student's masked patches
    masked_teacher: Optional[torch.Tensor] = None  # [m, b, K] the teacher's same patches, unmasked input
    patch_center: Optional[torch.Tensor] = None  # [K]
    locca_logits: Optional[torch.Tensor] = None  # [Ld, 3b, vocab / TP] LocCa decoder (task-major rows)

    def tensors(self) -> dict[str, torch.Tensor]:
        """{field: tensor} of the fields that are set (the embedding cache keeps and replays these)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> ModelOutputs:
        """The inverse of `tensors()`: a record of exactly these fields."""
        return cls(**tensors)

    def pair_logits(self, term: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, bias) of a sigmoid contrastive term: image_text, image_image or text_text."""
        return _PAIR_LOGITS[term](self)


_PAIR_LOGITS = {
    "image_text": lambda o: (o.logit_scale, o.logit_bias),
    "image_image": lambda o: (o.ii_logit_scale, o.ii_logit_bias),
    "text_text": lambda o: (o.tt_logit_scale, o.tt_logit_bias),
}
