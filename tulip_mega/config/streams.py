"""Which inputs one step feeds through the towers, derived from the recipe in one place.

The loss weights decide what must be computed ("a term with weight 0 costs no compute"), and
that decides what the loader emits, what the vision and text towers encode, how the pipeline
packs activations between stages, and how many FLOPs a sample costs. All of those read this
`Streams` object instead of re-deriving it from the weights, so they cannot disagree.

A *stream* is one batched call of a tower: every view in it has the same sequence length.
Inside a stream the views are laid out view-major: [view 0 of every sample, view 1 of every
sample, ...], i.e. a tower input of batch `views * micro_batch`.

Pure Python (no torch) so config validation, `plan` and FLOP counts stay instant.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


# The loss terms (loss.weights.*), split by what their value depends on: the contrastive terms
# compare pairs of the batch they see (so the batch matters, loss.contrastive_batch); the
# reconstruction terms are means over samples (the same for any split of the batch).
CONTRASTIVE_TERMS = ("image_text", "image_image", "text_text", "aug_contrastive")
RECONSTRUCTION_TERMS = ("mae", "text_recon", "locca")
# The EMA-teacher terms (SigLIP 2): means over samples like the reconstruction terms, switched
# on at loss.distill.start_fraction of training.
DISTILL_TERMS = ("self_distill", "masked_prediction")
SAMPLE_MEAN_TERMS = RECONSTRUCTION_TERMS + DISTILL_TERMS


def contrastive_terms_on(cfg) -> tuple[str, ...]:
    """The contrastive terms the recipe switches on."""
    return tuple(name for name in CONTRASTIVE_TERMS if getattr(cfg.loss.weights, name) > 0)


@dataclass(frozen=True)
class VisionStream:
    name: str  # "global" | "local" | "mae" | "teacher" | "masked"
    image_size: int  # pixels per side of the views in this stream
    views: int  # views per sample
    seq: int  # tokens per view entering the tower (visible patches only for "mae")


@dataclass(frozen=True)
class Streams:
    """What the towers encode per sample, and the slices of each stream.

    global stream layout: [view 0 (caption view) | extra global crops (G-1) | GeCo edits (pos, neg)]
    text stream layout:   [caption | paraphrases (P) | negatives (N) | EDA caption (0/1)]
    """

    extra_global_crops: int  # global crops after view 0 that reach the tower
    local_crops: int
    geco_edits: bool  # pos/neg edited images as two more global views
    paraphrases: int  # P texts per sample
    negatives: int  # N texts per sample
    eda_caption: bool
    mae_visible: int  # visible patches of view 0 encoded for MAE; 0 = MAE off
    image_size: int
    local_size: int
    patches: int  # tokens per full-resolution view
    local_patches: int
    text_recon: bool = False  # the last stage decodes the caption from its embedding
    # The EMA teacher (SigLIP 2): it encodes the first extra global crop (batch.crops[:, 0]);
    # the self_distill student is the local crops, the masked_prediction student the same crop
    # with `masked_patches` of its patches replaced by a mask token.
    teacher_view: bool = False
    masked_patches: int = 0
    image_image_locals: bool = True  # the local crops serve image_image (else only self_distill)
    # LocCa (SigLIP 2): the last stage decodes captions, boxes and region captions from view 0's
    # patch tokens; the loader reads up to `locca_regions` regions per sample.
    locca_regions: int = 0

    # --- vision ---------------------------------------------------------------------------
    @property
    def global_views(self) -> int:
        return 1 + self.extra_global_crops + (2 if self.geco_edits else 0)

    @property
    def vision(self) -> tuple[VisionStream, ...]:
        out = [VisionStream("global", self.image_size, self.global_views, self.patches)]
        if self.local_crops:
            out.append(VisionStream("local", self.local_size, self.local_crops, self.local_patches))
        if self.mae_visible:
            out.append(VisionStream("mae", self.image_size, 1, self.mae_visible))
        if self.teacher_view:
            out.append(VisionStream("teacher", self.image_size, 1, self.patches))
        if self.masked_patches:
            out.append(VisionStream("masked", self.image_size, 1, self.patches))
        return tuple(out)

    @property
    def loader_crops(self) -> int:
        """Extra global crops the loader emits: the student's, or the teacher's one crop."""
        return max(self.extra_global_crops, 1 if self.teacher_view else 0)

    def without_distill(self) -> "Streams":
        """The streams before the EMA teacher starts (loss.distill.start_fraction): no teacher
        view, no masked view, and the local crops only if image_image reads them."""
        return replace(self, teacher_view=False, masked_patches=0,
                       local_crops=self.local_crops if self.image_image_locals else 0, image_image_locals=True)

    def contrastive_only(self) -> "Streams":
        """The streams the contrastive terms read: everything but the MAE visible patches, the
        caption decoder and the EMA-teacher views. The embedding-cache forward of
        `loss.contrastive_batch=global` runs only these (docs/losses.md)."""
        return replace(self.without_distill(), mae_visible=0, text_recon=False, locca_regions=0)

    # --- text -----------------------------------------------------------------------------
    @property
    def texts(self) -> int:
        """Texts per sample through the text tower."""
        return 1 + self.paraphrases + self.negatives + (1 if self.eda_caption else 0)

    def text_slice(self, part: str) -> slice:
        """Rows (in units of samples) of one part of the text stream: caption, paraphrases,
        negatives or eda."""
        return _part_slice({"caption": 1, "paraphrases": self.paraphrases, "negatives": self.negatives,
                            "eda": 1 if self.eda_caption else 0}, part, "text")

    def global_slice(self, part: str) -> slice:
        """Views (in units of samples) of one part of the global stream: first, crops or edits."""
        return _part_slice({"first": 1, "crops": self.extra_global_crops, "edits": 2 if self.geco_edits else 0},
                           part, "global")


def _part_slice(sizes: dict[str, int], part: str, stream: str) -> slice:
    """The slice of `part` in a stream made of consecutive parts of the given sizes."""
    start = 0
    for name, n in sizes.items():
        if name == part:
            return slice(start, start + n)
        start += n
    raise KeyError(f"unknown {stream} part {part!r}; valid: {', '.join(sizes)}")


@dataclass(frozen=True)
class Heads:
    """Which loss-only parameters and modules the model's last stage holds, derived once
    from the recipe's loss weights (`model_heads`). The loss stack gives them their meaning:
    the ii/tt logit scale and bias are the image-image / text-text sigmoid terms' own (else
    those terms use the image-text ones), the aug projectors and scale serve the clip-rocket
    aug InfoNCE, the decoders the reconstruction terms."""

    image_image_logit: bool  # own ii_logit_scale / ii_logit_bias
    text_text_logit: bool  # own tt_logit_scale / tt_logit_bias
    aug_projector: bool  # aug_image/text_projector + aug_logit_scale
    mae_decoder: bool
    text_decoder: bool
    distill_head: bool = False  # self_distill's projection head (and the teacher's copy)
    patch_head: bool = False  # masked_prediction's per-patch projection head (and the teacher's)
    locca_decoder: bool = False  # the LocCa decoder (cross-attention to view 0's patch tokens)

    @property
    def teacher(self) -> bool:
        """Whether the model holds an EMA teacher of the vision tower."""
        return self.distill_head or self.patch_head


def model_heads(cfg) -> Heads:
    """The heads the recipe's non-zero loss terms need (see `Heads`)."""
    w, separate = cfg.loss.weights, cfg.model.separate_logit_params
    return Heads(
        image_image_logit=separate and w.image_image > 0,
        text_text_logit=separate and w.text_text > 0,
        aug_projector=w.aug_contrastive > 0,
        mae_decoder=w.mae > 0,
        text_decoder=w.text_recon > 0,
        distill_head=w.self_distill > 0,
        patch_head=w.masked_prediction > 0,
        locca_decoder=w.locca > 0,
    )


def distill_start_step(cfg) -> int | None:
    """The optimizer step (0-based count of completed steps) at which the EMA teacher is copied
    from the student and the self-distillation terms switch on; None when both are off."""
    w = cfg.loss.weights
    if w.self_distill <= 0 and w.masked_prediction <= 0:
        return None
    return int(cfg.train.steps * cfg.loss.distill.start_fraction)


def decoder_length(context_length: int, multiple: int = 1) -> int:
    """Positions of every LocCa sequence (losses/locca.py): the longest is [AREF] + a region
    caption (at most `context_length` tokens) + 4 location tokens, less the last (inputs are
    shifted); rounded up to `multiple` (the TP size under sequence parallel)."""
    n = context_length + 4
    return -(-n // multiple) * multiple


def mae_visible_patches(patches: int, mask_ratio: float) -> int:
    """Visible (kept) patches per image, as in MAE: int(L * (1 - mask_ratio)), at least 1."""
    return max(1, int(patches * (1.0 - mask_ratio)))


def input_streams(cfg) -> Streams:
    """The streams the recipe's non-zero loss terms need (see the module docstring)."""
    w, views, loss = cfg.loss.weights, cfg.data.views, cfg.loss
    v = cfg.model.vision
    patches = (v.image_size // v.patch_size) ** 2
    uses_ii = w.image_image > 0
    uses_aug = w.aug_contrastive > 0
    uses_distill, uses_masked = w.self_distill > 0, w.masked_prediction > 0
    extra_global = views.global_crops - 1 if (uses_ii or uses_aug) else 0
    hard_negatives = w.image_text > 0 and loss.contrastive == "sigmoid" and loss.hard_negatives
    return Streams(
        extra_global_crops=extra_global,
        local_crops=views.local_crops if (uses_ii or uses_distill) else 0,
        geco_edits=views.geco_images and uses_ii,
        paraphrases=views.paraphrases if w.text_text > 0 else 0,
        negatives=views.negatives if (w.text_text > 0 or hard_negatives) else 0,
        eda_caption=views.eda and uses_aug,
        mae_visible=mae_visible_patches(patches, loss.mae_mask_ratio) if w.mae > 0 else 0,
        image_size=v.image_size,
        local_size=views.local_size,
        patches=patches,
        local_patches=(views.local_size // v.patch_size) ** 2,
        text_recon=w.text_recon > 0,
        teacher_view=uses_distill or uses_masked,
        masked_patches=int(patches * loss.distill.mask_ratio) if uses_masked else 0,
        image_image_locals=uses_ii,
        locca_regions=loss.locca.regions if w.locca > 0 else 0,
    )
