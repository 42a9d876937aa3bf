"""The TULIP loss stack: from the model's outputs and the recipe weights to the weighted total.

    total = w_it * L_image_text      (sigmoid, GeCo caption negatives as extra -1 columns; or InfoNCE)
          + w_ii * L_image_image     (sigmoid between views: crops/local crops +1, GeCo edits +1/-1/0)
          + w_tt * L_text_text       (sigmoid: caption vs its paraphrases +1 and negatives -1)
          + w_mae * L_mae            (normalised-pixel MSE on the masked patches of view 0)
          + w_trec * L_text_recon    (causal decoder cross entropy on the caption)
          + w_aug * L_aug            (clip-rocket: InfoNCE, augmented crop <-> EDA caption, own projector)
          + w_sd * L_self_distill    (SigLIP 2 / SILC: local crops against the EMA teacher's global crop)
          + w_mp * L_masked_prediction (SigLIP 2 / TIPS: masked patches against the teacher's patches)

`LOSS_TERMS` is the table of terms, in this order; only those with a non-zero weight run.
Contrastive terms see the whole data-parallel batch (other ranks' columns are negatives, or
ignored where a GeCo field is missing); docs/losses.md gives the formulas and the batch each
term is computed over.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist

from tulip_mega.config.streams import CONTRASTIVE_TERMS, DISTILL_TERMS, SAMPLE_MEAN_TERMS, Streams
from tulip_mega.losses.chance import Number, infonce_chance_loss, sigmoid_chance_loss, weighted_pairs_chance_loss
from tulip_mega.losses.common import rank_and_world
from tulip_mega.losses.distill import distill_chance_loss, distill_cross_entropy
from tulip_mega.losses.locca import locca_loss
from tulip_mega.losses.infonce import DistributedInfoNCELoss
from tulip_mega.losses.outputs import ModelOutputs
from tulip_mega.losses.pairwise import DistributedPairSigmoidLoss, same_sample_weights
from tulip_mega.losses.reconstruction import causal_text_loss, mae_loss
from tulip_mega.losses.sigmoid import DistributedSigmoidLoss


@dataclass(frozen=True)
class TermInputs:
    """What a term reads besides the model outputs: the batch (targets, GeCo validity masks),
    the MAE patch indices (visible, masked) and text_recon's divisor (losses/token_count.py)."""

    batch: Any = None
    mae_idx: Optional[tuple[torch.Tensor, torch.Tensor]] = None
    text_divisor: Optional[float] = None
    locca: Any = None  # losses/locca.LoccaTargets of the micro-batch


def pair_weights(
    same_sample: torch.Tensor, valid: torch.Tensor, self_view: Sequence[Optional[int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights of I row views against J column views of the same b samples (view-major), for
    DistributedPairSigmoidLoss.

    same_sample [J, b]: the weight of column (view j, sample d) for a row of the SAME sample
    (+1 positive, -1 hard negative, 0 ignore); valid [J, b] (bool): whether that column exists
    (a missing GeCo field does not). A row of another sample sees a valid column as a
    negative (-1) and an invalid one as 0. `self_view[i]` is the column view that IS row view i
    (the same embedding: weight 0), or None.

    Returns (local [I*b, J*b], remote [J*b]): the weights for this rank's rows, and how the
    rows of every other data-parallel rank see this rank's columns.
    """
    J, b = same_sample.shape
    dev = same_sample.device
    samples = torch.arange(b, device=dev)
    row_object = torch.cat([samples + j * b if j is not None else -1 - samples - i * b
                            for i, j in enumerate(self_view)])  # the column index a row IS, or a unique negative id
    return same_sample_weights(
        row_sample=samples.repeat(len(self_view)),
        col_sample=samples.repeat(J),
        col_weight=same_sample.reshape(-1),
        col_valid=valid.reshape(-1),
        same_object=(row_object, torch.arange(J * b, device=dev)),
    )


class TulipLossStack(torch.nn.Module):
    """Weighted sum of the enabled TULIP / clip-rocket terms (see the module docstring)."""

    def __init__(self, cfg, streams: Streams, group: Optional[dist.ProcessGroup], pad_id: int) -> None:
        super().__init__()
        loss = cfg.loss
        self.streams = streams
        self.weights = {name: float(getattr(loss.weights, name)) for name in TERMS}
        self.terms = tuple(name for name in TERMS if self.weights[name] > 0)
        self.contrastive_terms = tuple(name for name in self.terms if name in CONTRASTIVE_TERMS)
        # Means over samples (reconstruction and EMA-teacher terms): with the embedding cache
        # they are computed per micro-batch in the gradient pass.
        self.sample_mean_terms = tuple(name for name in self.terms if name in SAMPLE_MEAN_TERMS)
        self.distill_terms = tuple(name for name in self.terms if name in DISTILL_TERMS)
        self.chance_terms = self.contrastive_terms + self.distill_terms + (("locca",) if "locca" in self.terms else ())
        d = loss.distill
        self.distill_temperatures = (d.student_temperature, d.teacher_temperature)
        self.prototypes = d.prototypes
        self.contrastive = loss.contrastive
        self.max_infonce_scale = float(loss.infonce_max_logit_scale)
        self.hard_negatives = bool(loss.hard_negatives and loss.contrastive == "sigmoid" and streams.negatives)
        self.patch_size = cfg.model.vision.patch_size
        self.mae_norm_pix = loss.mae_norm_pix
        self.pad_id = pad_id
        self.sigmoid = DistributedSigmoidLoss(group=group, impl="gather" if loss.sigmoid_impl == "gather" else "ring")
        self.pairwise = DistributedPairSigmoidLoss(group=group)
        self.infonce = DistributedInfoNCELoss(group=group, label_smoothing=loss.label_smoothing)
        self.aug_infonce = DistributedInfoNCELoss(group=group, label_smoothing=loss.aug_label_smoothing)
        self.dp_size = rank_and_world(group)[1]

    @property
    def needs_batch(self) -> bool:
        """Whether the last stage must read the batch (targets, GeCo validity masks, the keys
        masked_prediction's patch mask is drawn from)."""
        s = self.streams
        return bool(s.mae_visible or s.text_recon or s.geco_edits or s.paraphrases or s.negatives
                    or s.masked_patches or s.locca_regions)

    def forward(self, out: ModelOutputs, batch=None, mae_idx=None, terms: Optional[Sequence[str]] = None,
                text_divisor: Optional[float] = None, locca=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(weighted total, {term: unweighted value}) on this rank, over the enabled `terms`
        (default: all enabled terms; the training step passes the contrastive or the
        reconstruction ones when it computes them separately). `text_divisor`: what
        text_recon divides its summed token cross entropy by (losses/token_count.py: the
        training step's per-micro-batch share of the step's token count); by default this
        batch's token count."""
        names = self.terms if terms is None else terms
        inputs = TermInputs(batch, mae_idx, text_divisor, locca)
        values = {}
        for name in names:
            term = TERMS_BY_NAME[name]
            term.check(out)
            values[name] = term.loss(self, out, inputs)
        total = sum(self.weights[name] * value for name, value in values.items())
        return total, values

    def active_terms(self, teacher_running: bool) -> tuple[str, ...]:
        """The enabled terms of a step: the EMA-teacher terms only once the teacher runs."""
        return tuple(n for n in self.terms if teacher_running or n not in DISTILL_TERMS)

    def chance(self, out: ModelOutputs, batch=None, terms: Optional[Sequence[str]] = None) -> dict[str, torch.Tensor]:
        """{term: the loss a model that has learned nothing gets at this batch} for the enabled
        contrastive and EMA-teacher `terms` (losses/chance.py, losses/distill.py). Tensor ops
        only: no device sync."""
        names = [n for n in (self.chance_terms if terms is None else terms) if n in self.chance_terms]
        return {name: torch.as_tensor(TERMS_BY_NAME[name].chance(self, out, batch), dtype=torch.float32,
                                      device=out.image_emb.device)
                for name in names}

    # --- image_text ----------------------------------------------------------------------------
    def _image_text(self, out: ModelOutputs, inputs: TermInputs) -> torch.Tensor:
        image, text = out.image_emb, out.text_emb
        if self.contrastive == "infonce":
            return self.infonce(image, text, out.logit_scale.clamp(max=self.max_infonce_scale))
        if not self.hard_negatives:
            return self.sigmoid(image, text, out.logit_scale, out.logit_bias)
        return self.pairwise(*self._image_text_pairs(out, inputs.batch), out.logit_scale, out.logit_bias)

    def _image_text_chance(self, out: ModelOutputs, batch) -> Number:
        columns = out.image_emb.shape[0] * self.dp_size
        if self.contrastive == "infonce":
            return infonce_chance_loss(columns)
        if not self.hard_negatives:
            return sigmoid_chance_loss(1.0, columns - 1.0)
        return self._pairs_chance(self._image_text_pairs(out, batch))

    def _image_text_pairs(self, out: ModelOutputs, batch) -> tuple[torch.Tensor, ...]:
        """(rows, columns, local weights, remote weights) of image-text with GeCo hard negatives."""
        image, text = out.image_emb, out.text_emb
        s = self.streams
        negatives = out.texts_emb[s.text_slice("negatives")]  # [N, b, e]
        b = image.shape[0]
        ones = torch.ones(1, b, device=image.device)
        valid_neg = batch.negative_valid[:, : s.negatives].t().to(image.device)  # [N, b]
        same = torch.cat([ones, -valid_neg.float()])  # own caption +1, own GeCo negatives -1
        valid = torch.cat([ones.bool(), valid_neg.bool()])
        local, remote = pair_weights(same, valid, [None])
        cols = torch.cat([text.unsqueeze(0), negatives]).reshape(-1, text.shape[-1])
        return image, cols, local, remote

    # --- image_image ---------------------------------------------------------------------------
    def _image_image(self, out: ModelOutputs, inputs: TermInputs) -> torch.Tensor:
        return self.pairwise(*self._image_image_pairs(out, inputs.batch), out.ii_logit_scale, out.ii_logit_bias)

    def _image_image_chance(self, out: ModelOutputs, batch) -> Number:
        return self._pairs_chance(self._image_image_pairs(out, batch))

    def _image_image_pairs(self, out: ModelOutputs, batch) -> tuple[torch.Tensor, ...]:
        """(rows, columns, local weights, remote weights) between the image views."""
        s = self.streams
        views = out.view_emb  # [V, b, e]: first, crops, edits, local crops
        V, b, _ = views.shape
        same = torch.ones(V, b, device=views.device)
        valid = torch.ones(V, b, dtype=torch.bool, device=views.device)
        if s.geco_edits:
            edits = s.global_slice("edits")
            edit_valid = batch.edit_valid.t().to(views.device).bool()  # [2, b]: pos, neg
            valid[edits] = edit_valid
            same[edits] = torch.stack([edit_valid[0].float(), -edit_valid[1].float()])
        anchors = 1 + s.extra_global_crops  # the global crops (not the edits) are the anchors
        local, remote = pair_weights(same, valid, list(range(anchors)))
        rows = views[:anchors].reshape(anchors * b, -1)
        return rows, views.reshape(V * b, -1), local, remote

    # --- text_text -----------------------------------------------------------------------------
    def _text_text(self, out: ModelOutputs, inputs: TermInputs) -> torch.Tensor:
        return self.pairwise(*self._text_text_pairs(out, inputs.batch), out.tt_logit_scale, out.tt_logit_bias)

    def _text_text_chance(self, out: ModelOutputs, batch) -> Number:
        return self._pairs_chance(self._text_text_pairs(out, batch))

    def _text_text_pairs(self, out: ModelOutputs, batch) -> tuple[torch.Tensor, ...]:
        """(rows, columns, local weights, remote weights): the caption against its GeCo texts."""
        s = self.streams
        n_texts = 1 + s.paraphrases + s.negatives  # the EDA caption (if any) is not a GeCo text
        texts = out.texts_emb[:n_texts]  # [1+P+N, b, e]
        b = texts.shape[1]
        dev = texts.device
        parts_valid = [torch.ones(1, b, dtype=torch.bool, device=dev)]
        parts_same = [torch.zeros(1, b, device=dev)]  # the caption itself (self pair, weight 0)
        if s.paraphrases:
            pv = batch.paraphrase_valid[:, : s.paraphrases].t().to(dev).bool()
            parts_valid.append(pv)
            parts_same.append(pv.float())
        if s.negatives:
            nv = batch.negative_valid[:, : s.negatives].t().to(dev).bool()
            parts_valid.append(nv)
            parts_same.append(-nv.float())
        local, remote = pair_weights(torch.cat(parts_same), torch.cat(parts_valid), [0])
        return texts[0], texts.reshape(n_texts * b, -1), local, remote

    def _pairs_chance(self, pairs: tuple[torch.Tensor, ...]) -> Number:
        local, remote = pairs[2:4]
        return weighted_pairs_chance_loss(local, remote, self.dp_size)

    # --- reconstruction and clip-rocket --------------------------------------------------------
    def _mae(self, out: ModelOutputs, inputs: TermInputs) -> torch.Tensor:
        images = inputs.batch.images.to(out.mae_pred.device)
        return mae_loss(out.mae_pred.float(), images.float(), inputs.mae_idx[1], self.patch_size, self.mae_norm_pix)

    def _text_recon(self, out: ModelOutputs, inputs: TermInputs) -> torch.Tensor:
        targets = inputs.batch.tokens.to(out.text_logits.device)
        return causal_text_loss(out.text_logits, targets, self.pad_id, inputs.text_divisor)

    def _locca(self, out: ModelOutputs, inputs: TermInputs) -> torch.Tensor:
        return locca_loss(out.locca_logits, inputs.locca.targets, inputs.locca.weights)

    def _locca_chance(self, out: ModelOutputs, batch) -> Number:
        """A decoder that has learned nothing (uniform over its vocabulary V) scores log V per
        task: captioning for every sample, the two region tasks for those with a region."""
        from megatron.core import parallel_state

        tp = parallel_state.get_tensor_model_parallel_world_size() if parallel_state.model_parallel_is_initialized() else 1
        tasks = 1.0 + 2.0 * batch.region_valid.any(-1).float().mean()
        return tasks * math.log(out.locca_logits.shape[-1] * tp)

    def _aug_contrastive(self, out: ModelOutputs, inputs: TermInputs) -> torch.Tensor:
        scale = out.aug_logit_scale.clamp(max=self.max_infonce_scale)
        return self.aug_infonce(out.aug_image, out.aug_text, scale)

    def _aug_contrastive_chance(self, out: ModelOutputs, batch) -> Number:
        return infonce_chance_loss(out.image_emb.shape[0] * self.dp_size)

    # --- SigLIP 2's EMA-teacher terms (losses/distill.py) -------------------------------------
    def _self_distill(self, out: ModelOutputs, inputs: TermInputs) -> torch.Tensor:
        return distill_cross_entropy(out.distill_student, out.distill_teacher, out.distill_center,
                                     *self.distill_temperatures)

    def _masked_prediction(self, out: ModelOutputs, inputs: TermInputs) -> torch.Tensor:
        return distill_cross_entropy(out.masked_student, out.masked_teacher, out.patch_center,
                                     *self.distill_temperatures)

    def _distill_chance(self, out: ModelOutputs, batch) -> Number:
        return distill_chance_loss(self.prototypes)


@dataclass(frozen=True)
class LossTerm:
    """One term of the stack: its recipe name (`loss.weights.<name>`), the ModelOutputs fields
    it reads, how its loss is computed, and (contrastive terms) its chance level."""

    name: str
    reads: tuple[str, ...]
    loss: Callable[[TulipLossStack, ModelOutputs, TermInputs], torch.Tensor]
    chance: Optional[Callable[[TulipLossStack, ModelOutputs, Any], Number]] = None

    def check(self, out: ModelOutputs) -> None:
        """Raise if the model did not produce a field this term reads (its head or stream is off)."""
        missing = [field for field in self.reads if getattr(out, field) is None]
        if missing:
            raise ValueError(f"loss term {self.name} reads ModelOutputs.{', '.join(missing)}, which the model "
                             "did not produce (its input stream or head is off)")


LOSS_TERMS: tuple[LossTerm, ...] = (
    LossTerm("image_text", ("image_emb", "text_emb", "logit_scale", "logit_bias"),
             TulipLossStack._image_text, TulipLossStack._image_text_chance),
    LossTerm("image_image", ("view_emb", "ii_logit_scale", "ii_logit_bias"),
             TulipLossStack._image_image, TulipLossStack._image_image_chance),
    LossTerm("text_text", ("texts_emb", "tt_logit_scale", "tt_logit_bias"),
             TulipLossStack._text_text, TulipLossStack._text_text_chance),
    LossTerm("mae", ("mae_pred",), TulipLossStack._mae),
    LossTerm("text_recon", ("text_logits",), TulipLossStack._text_recon),
    LossTerm("locca", ("locca_logits",), TulipLossStack._locca, TulipLossStack._locca_chance),
    LossTerm("aug_contrastive", ("aug_image", "aug_text", "aug_logit_scale"),
             TulipLossStack._aug_contrastive, TulipLossStack._aug_contrastive_chance),
    LossTerm("self_distill", ("distill_student", "distill_teacher", "distill_center"),
             TulipLossStack._self_distill, TulipLossStack._distill_chance),
    LossTerm("masked_prediction", ("masked_student", "masked_teacher", "patch_center"),
             TulipLossStack._masked_prediction, TulipLossStack._distill_chance),
)
TERMS_BY_NAME = {term.name: term for term in LOSS_TERMS}
TERMS = tuple(TERMS_BY_NAME)
