"""The two-tower TULIP / SigLIP model as one megatron module per pipeline stage.

Like big_vision's two_towers: towers, pool, project, normalise; the model owns the logit
scales and biases and hands the loss a `ModelOutputs`. Every stage holds a slice of the vision
AND the text layers (first stage: embeddings; last stage: heads and reconstruction decoders);
activations between stages travel packed in one tensor (models/packing.py). One step calls the
vision tower once per input stream and the text tower once over all texts; which streams and
heads exist is decided once from the recipe (config/streams.py) and handed in. With SigLIP 2's
terms the last stage also holds the LocCa decoder, and every stage its slice of the EMA teacher
(models/teacher.py: the vision tower under `teacher_` names, encoding one more stream).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig

from tulip_mega.config.streams import Heads, Streams, decoder_length
from tulip_mega.losses.locca import LoccaVocab
from tulip_mega.losses.outputs import ModelOutputs
from tulip_mega.models.decoders import (
    AugProjector,
    CausalTextDecoder,
    DistillHead,
    LoccaDecoder,
    MAEDecoder,
    gather_rows,
)
from tulip_mega.models.packing import ActivationPacker, PackedPart
from tulip_mega.models.specs import block_spec
from tulip_mega.models.teacher import TEACHER_PREFIX, TeacherState
from tulip_mega.models.vision import MAPHead, PatchEmbedding


# Modules that exist only for training losses: not part of SigLIP, not exported by `convert`,
# and absent from a Hugging Face checkpoint used as init.
TRAINING_ONLY = ("mae_decoder", "text_decoder", "locca_decoder", "aug_image_projector", "aug_text_projector", "aug_logit_scale",
                 "ii_logit_", "tt_logit_", TEACHER_PREFIX, "distill_head", "patch_head", "distill_mask_token",
                 "distill_center", "patch_center")


def base_streams(streams: Streams) -> Streams:
    """Only view 0 and the caption: what evaluation and the plain SigLIP loss need."""
    return dataclasses.replace(streams, extra_global_crops=0, local_crops=0, geco_edits=False, paraphrases=0,
                               negatives=0, eda_caption=False, mae_visible=0, text_recon=False,
                               teacher_view=False, masked_patches=0, locca_regions=0)


def _logit_params(model_cfg) -> tuple[torch.nn.Parameter, torch.nn.Parameter]:
    """A fresh (log-scale, bias) pair of sigmoid logit parameters at the recipe's initial values."""
    scale = torch.nn.Parameter(torch.tensor(math.log(model_cfg.temperature_init)))
    bias = torch.nn.Parameter(torch.tensor(float(model_cfg.bias_init)))
    return scale, bias


def _view_major(x: torch.Tensor) -> torch.Tensor:
    """[b, v, ...] -> [v*b, ...] (all samples' view 0, then all samples' view 1, ...)."""
    return x.transpose(0, 1).reshape(-1, *x.shape[2:])


class TulipModel(MegatronModule):
    """One pipeline stage of the two-tower model (plus, on the last stage, the loss-stack heads);
    under interleaved virtual stages one model chunk (`vp_stage`) of a stage.

    forward(images [b,3,H,W], tokens [b,L], batch=None, mae_idx=None, streams=None) returns,
    on the last stage, a `ModelOutputs` (losses/outputs.py: the embeddings, each term's logit
    scale and bias, the decoder outputs the streams ask for); on other stages the packed
    activations for the next stage.
    """

    def __init__(
        self,
        vision_config: TransformerConfig,
        text_config: TransformerConfig,
        model_cfg,
        streams: Streams,
        heads: Heads,
        pre_process: bool = True,
        post_process: bool = True,
        use_te: Optional[bool] = None,
        decoder_configs: Optional[dict[str, TransformerConfig]] = None,
        vp_stage: Optional[int] = None,
        loss_cfg=None,
    ) -> None:
        """`loss_cfg`: the recipe's loss section (the EMA-teacher heads' sizes, LocCa's
        vocabulary) when `heads.teacher` or `heads.locca_decoder`."""
        # The vision config doubles as the model's config for megatron's schedules/DDP.
        super().__init__(config=vision_config)
        self.model_type = ModelType.encoder_or_decoder  # one pipeline of stages (both towers per stage)
        self.share_embeddings_and_output_weights = False  # no tied input/output embedding to sync across PP
        self.pre_process = pre_process
        self.post_process = post_process
        # The model chunk (virtual stage) of this rank under interleaving, else None: megatron
        # derives the chunk's layers and their global numbers (checkpoint keys) from it.
        self.vp_stage = vp_stage
        self.text_config = text_config
        self.context_length = model_cfg.text.context_length
        self.train_streams = streams
        self.heads = heads
        self.eval_streams = base_streams(self.train_streams)
        self._sp_tp = vision_config.tensor_model_parallel_size if vision_config.sequence_parallel else 1
        self._received: Optional[torch.Tensor] = None
        # Created in this order (the seed-driven init and the checkpoint keys follow it).
        if pre_process:
            self._build_embeddings(vision_config, text_config, model_cfg)
        self.vision_block = TransformerBlock(
            vision_config, block_spec(vision_config, use_te, vp_stage=vp_stage), pre_process=pre_process,
            post_process=post_process, vp_stage=vp_stage,
        )
        self.text_block = TransformerBlock(
            text_config, block_spec(text_config, use_te, vp_stage=vp_stage), pre_process=pre_process,
            post_process=post_process, vp_stage=vp_stage,
        )
        if heads.teacher:  # the EMA teacher's slice of the vision tower: same layers, same sharding
            self.teacher_vision_block = TransformerBlock(
                vision_config, block_spec(vision_config, use_te, vp_stage=vp_stage), pre_process=pre_process,
                post_process=post_process, vp_stage=vp_stage,
            )
        if post_process:
            self._build_heads(model_cfg, heads)
            self._build_decoders(model_cfg, heads, decoder_configs, use_te, loss_cfg)
            if heads.teacher:
                self._build_distill_heads(model_cfg, heads, loss_cfg.distill)
        self.teacher = TeacherState(self) if heads.teacher else None

    def _build_embeddings(self, vision_config: TransformerConfig, text_config: TransformerConfig, model_cfg) -> None:
        """First stage: the patch embedding and the token + position embedding."""
        v, t = model_cfg.vision, model_cfg.text
        self.vision_embed = PatchEmbedding(vision_config, v.image_size, v.patch_size)
        if self.heads.teacher:
            self.teacher_vision_embed = PatchEmbedding(vision_config, v.image_size, v.patch_size)
        if self.heads.patch_head:  # what the masked-prediction student sees at a masked patch
            self.distill_mask_token = torch.nn.Parameter(torch.empty(vision_config.hidden_size))
        self.text_embed = LanguageModelEmbedding(
            config=text_config,
            vocab_size=t.vocab_size,
            max_sequence_length=t.context_length,
            position_embedding_type="learned_absolute",
        )

    def _build_heads(self, model_cfg, heads: Heads) -> None:
        """Last stage: the pooling/projection heads, the logit scales and biases, the aug projectors.

        SigLIP: the image embedding is the MAP output (width = vision hidden); the text head
        projects the last token to that width."""
        v, t = model_cfg.vision, model_cfg.text
        embed_dim = v.hidden_size
        self.vision_head = MAPHead(v.hidden_size, v.num_heads, v.ffn_hidden_size, model_cfg.layernorm_eps)
        self.text_head = torch.nn.Linear(t.hidden_size, embed_dim)
        self.logit_scale, self.logit_bias = _logit_params(model_cfg)
        if heads.image_image_logit:
            self.ii_logit_scale, self.ii_logit_bias = _logit_params(model_cfg)
        if heads.text_text_logit:
            self.tt_logit_scale, self.tt_logit_bias = _logit_params(model_cfg)
        if heads.aug_projector:
            self.aug_image_projector = AugProjector(embed_dim, model_cfg.aug_projector_hidden)
            self.aug_text_projector = AugProjector(embed_dim, model_cfg.aug_projector_hidden)
            self.aug_logit_scale = torch.nn.Parameter(torch.tensor(math.log(model_cfg.aug_temperature_init)))

    def _build_decoders(self, model_cfg, heads: Heads, decoder_configs: Optional[dict[str, TransformerConfig]],
                        use_te: Optional[bool], loss_cfg=None) -> None:
        """Last stage: the decoders the recipe's loss terms need."""
        v, t = model_cfg.vision, model_cfg.text
        if heads.mae_decoder:
            self.mae_decoder = MAEDecoder(
                decoder_configs["mae"], v.hidden_size, self.train_streams.patches, v.patch_size, use_te
            )
        if heads.text_decoder:
            self.text_decoder = CausalTextDecoder(
                decoder_configs["text"], v.hidden_size, t.vocab_size, t.context_length, use_te
            )
        if heads.locca_decoder:
            config = decoder_configs["locca"]
            tp = config.tensor_model_parallel_size
            vocab = LoccaVocab(t.vocab_size, loss_cfg.locca.box_bins, tp)
            length = decoder_length(t.context_length, tp if config.sequence_parallel else 1)
            self.locca_decoder = LoccaDecoder(config, v.hidden_size, vocab.size, length, use_te)

    def _build_distill_heads(self, model_cfg, heads: Heads, d) -> None:
        """Last stage: the self-distillation projection heads, each with its teacher copy, and
        the teacher-output centres (DINO centering, float32 buffers updated after each step)."""
        v = model_cfg.vision
        self.teacher_vision_head = MAPHead(v.hidden_size, v.num_heads, v.ffn_hidden_size, model_cfg.layernorm_eps)
        for name, on in (("distill", heads.distill_head), ("patch", heads.patch_head)):
            if on:
                for prefix in ("", TEACHER_PREFIX):
                    setattr(self, f"{prefix}{name}_head",
                            DistillHead(v.hidden_size, d.head_hidden, d.head_bottleneck, d.prototypes))
                self.register_buffer(f"{name}_center", torch.zeros(d.prototypes))

    # --- pipeline plumbing -------------------------------------------------------------------
    def packer(self, streams: Optional[Streams] = None) -> ActivationPacker:
        """The p2p layout of a forward over `streams` (default: evaluation, view 0 + caption)."""
        streams = streams or self.eval_streams
        vision_hidden, text_hidden = self.config.hidden_size, self.text_config.hidden_size
        parts = [PackedPart(s.name, s.seq // self._sp_tp, s.views, vision_hidden) for s in streams.vision]
        parts.append(PackedPart("text", self.context_length // self._sp_tp, streams.texts, text_hidden))
        return ActivationPacker(tuple(parts), width=vision_hidden)  # the schedule's config.hidden_size

    def packed_shape(self, micro_batch: int, streams: Optional[Streams] = None) -> tuple[int, int, int]:
        """The (rows, micro_batch, width) tensor this stage sends to / receives from its pipeline
        neighbours for a forward of `micro_batch` samples over `streams`: megatron's default p2p
        shape for seq_length = `schedule_seq_length(...)`."""
        return self.packer(streams).shape(micro_batch)

    def schedule_seq_length(self, packed_shape: tuple[int, int, int]) -> int:
        """The `seq_length` to give megatron's schedules so that their default p2p shape
        (seq_length [/ TP under sequence parallel], micro_batch, hidden_size) is `packed_shape`."""
        return packed_shape[0] * self._sp_tp

    def set_input_tensor(self, input_tensor) -> None:
        """Called by megatron's schedule with the tensor received from the previous stage; it is
        unpacked in `forward`, which knows the streams of this forward."""
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self._received = input_tensor

    # --- forward -----------------------------------------------------------------------------
    def forward(
        self,
        images: Optional[torch.Tensor] = None,
        tokens: Optional[torch.Tensor] = None,
        batch=None,
        mae_idx: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
        streams: Optional[Streams] = None,
        patch_mask: Optional[torch.Tensor] = None,
        locca_inputs: Optional[torch.Tensor] = None,
    ):
        """See the class docstring. `batch` (a tulip_mega.data.base.Batch) carries the extra views
        and texts on the first stage and the caption tokens on the last; `mae_idx` is
        (visible_idx [b, k], masked_idx [b, m]) when the streams include MAE; `patch_mask`
        [b, m] the masked-prediction student's masked patches when they include it;
        `locca_inputs` [3b, Ld] the LocCa decoder's input sequences (last stage)."""
        streams = streams or self.eval_streams
        if self.pre_process:
            inputs = self._embed_inputs(images, tokens, batch, mae_idx, streams, patch_mask)
        else:
            inputs = self.packer(streams).unpack(self._received)
        hidden = {}
        for name, x in inputs.items():
            if name == "teacher":
                hidden[name] = self.teacher.encode(self.teacher_vision_block, x, self.pre_process)
                continue
            block = self.text_block if name == "text" else self.vision_block
            if not self.pre_process:
                block.set_input_tensor(x)  # blocks without an embedding read their input from here
            hidden[name] = block(x, attention_mask=None)
        if not self.post_process:
            return self.packer(streams).pack(hidden)  # [rows, b, W]
        if tokens is None and batch is not None:
            tokens = batch.tokens
        out = self._heads(hidden, tokens, mae_idx, streams, patch_mask)
        if streams.locca_regions:
            b = out.image_emb.shape[0]
            patches = self._full_sequence(hidden["global"])[:, :b]  # view 0's patch tokens [P, b, h]
            out = dataclasses.replace(out, locca_logits=self.locca_decoder(patches, locca_inputs))
        return out

    def _embed_inputs(self, images, tokens, batch, mae_idx, streams: Streams,
                      patch_mask: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """First stage: every stream's token embeddings, {name: [s, views*b, h]}."""
        out = {}
        views = [images]
        if streams.extra_global_crops:
            views.append(_view_major(batch.crops[:, : streams.extra_global_crops]))
        if streams.geco_edits:
            views.append(_view_major(batch.edits))
        out["global"] = self.vision_embed(torch.cat(views) if len(views) > 1 else images)  # [s, G*b, h]
        if streams.local_crops:
            out["local"] = self.vision_embed(_view_major(batch.local_crops[:, : streams.local_crops]))
        if streams.mae_visible:
            out["mae"] = self.vision_embed(images, keep_idx=mae_idx[0])  # [k, b, h]
        if streams.teacher_view:  # the first extra global crop, for the teacher and the masked student
            crop = batch.crops[:, 0]
            out["teacher"] = self.teacher.embed(self.teacher_vision_embed, crop, out["global"].dtype)
            if streams.masked_patches:
                out["masked"] = self.vision_embed(crop, mask=(patch_mask, self.distill_mask_token))
        texts = [tokens]
        for name, n in (("paraphrases", streams.paraphrases), ("negatives", streams.negatives)):
            if n:
                texts.append(_view_major(getattr(batch, name)[:, :n]))
        if streams.eda_caption:
            texts.append(batch.eda_tokens)
        all_tokens = torch.cat(texts) if len(texts) > 1 else tokens  # [T*b, L]
        n, L = all_tokens.shape
        position_ids = torch.arange(L, device=all_tokens.device).unsqueeze(0).expand(n, L)
        out["text"] = self.text_embed(all_tokens, position_ids)  # [L, T*b, h]
        return out

    def _full_sequence(self, x: torch.Tensor) -> torch.Tensor:
        # Heads and decoders are replicated across TP: every rank needs the full sequences.
        if self.config.sequence_parallel:
            return gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False)
        return x

    def _pair_logits(self) -> dict[str, torch.Tensor]:
        """exp(scale) and bias of each sigmoid term, keyed by ModelOutputs field: image_image's
        and text_text's own parameters where the recipe separates them
        (`model.separate_logit_params`), else image_text's."""
        it = (self.logit_scale, self.logit_bias)
        ii = (self.ii_logit_scale, self.ii_logit_bias) if self.heads.image_image_logit else it
        tt = (self.tt_logit_scale, self.tt_logit_bias) if self.heads.text_text_logit else it
        fields = (("logit_scale", "logit_bias", it), ("ii_logit_scale", "ii_logit_bias", ii),
                  ("tt_logit_scale", "tt_logit_bias", tt))
        out = {}
        for scale_field, bias_field, (scale, bias) in fields:
            out[scale_field] = scale.float().exp()
            out[bias_field] = bias.float()
        return out

    def _heads(self, hidden: dict[str, torch.Tensor], tokens, mae_idx, streams: Streams,
               patch_mask: Optional[torch.Tensor] = None) -> ModelOutputs:
        """Last stage: final hidden states -> embeddings, scales, decoder outputs."""
        b = hidden["text"].shape[1] // streams.texts
        pooled = [self.vision_head(self._full_sequence(hidden["global"]).transpose(0, 1))]  # [G*b, e]
        if streams.local_crops:
            pooled.append(self.vision_head(self._full_sequence(hidden["local"]).transpose(0, 1)))
        views_raw = torch.cat(pooled).view(-1, b, pooled[0].shape[-1])  # [V, b, e]
        text_last = self._full_sequence(hidden["text"])[-1]  # last token of every text, [T*b, h_t]
        texts_raw = self.text_head(text_last).view(streams.texts, b, -1)  # [T, b, e]
        views_emb = F.normalize(views_raw.float(), dim=-1)
        # image_image's views: the local crops only when it reads them (not when only self_distill does)
        pair_views = views_emb if streams.image_image_locals else views_emb[:streams.global_views]
        texts_emb = F.normalize(texts_raw.float(), dim=-1)
        logits = self._pair_logits()
        aug = {}
        if streams.eda_caption and streams.extra_global_crops:
            aug = self._aug_outputs(views_raw, texts_raw, streams)
        mae_pred = text_logits = None
        if streams.mae_visible:
            visible_idx, masked_idx = mae_idx
            mae_pred = self.mae_decoder(self._full_sequence(hidden["mae"]), visible_idx, masked_idx)
        if streams.text_recon:
            text_logits = self.text_decoder(texts_raw[0], tokens)  # [L, b, vocab/TP]
        distill = self._distill_outputs(hidden, views_raw, patch_mask, streams) if streams.teacher_view else {}
        return ModelOutputs(
            image_emb=views_emb[0], text_emb=texts_emb[0], **logits, **aug, **distill,
            view_emb=pair_views if pair_views.shape[0] > 1 else None,
            texts_emb=texts_emb if streams.texts > 1 else None,
            mae_pred=mae_pred, text_logits=text_logits,
        )

    def _distill_outputs(self, hidden: dict[str, torch.Tensor], views_raw: torch.Tensor,
                         patch_mask: Optional[torch.Tensor], streams: Streams) -> dict[str, torch.Tensor]:
        """Last stage, the EMA-teacher terms: the student's and the teacher's head outputs
        (logits over the prototypes), and the centres the teacher's are sharpened against.
        The teacher side is computed without gradient, in float32 (its weights' dtype)."""
        fields = {}
        with torch.no_grad():
            teacher_tokens = self._full_sequence(hidden["teacher"]).float()  # [P, b, h]
        if self.heads.distill_head:
            local_rows = views_raw[streams.global_views:]  # [n_local, b, e], pooled, unnormalised
            with torch.no_grad():
                pooled = self.teacher_vision_head(teacher_tokens.transpose(0, 1))  # [b, h]
                fields["distill_teacher"] = self.teacher_distill_head(pooled).float()
            fields["distill_student"] = self.distill_head(local_rows).float()  # [n_local, b, K]
            fields["distill_center"] = self.distill_center
        if self.heads.patch_head and streams.masked_patches:
            idx = patch_mask.to(device=teacher_tokens.device, dtype=torch.long)
            student = gather_rows(self._full_sequence(hidden["masked"]), idx)  # [m, b, h]
            with torch.no_grad():
                fields["masked_teacher"] = self.teacher_patch_head(gather_rows(teacher_tokens, idx)).float()
            fields["masked_student"] = self.patch_head(student).float()  # [m, b, K]
            fields["patch_center"] = self.patch_center
        self.teacher.observe(fields)
        return fields

    def _aug_outputs(self, views_raw: torch.Tensor, texts_raw: torch.Tensor,
                     streams: Streams) -> dict[str, torch.Tensor]:
        """clip-rocket: the first extra global crop and the EDA caption through their projectors."""
        crop = streams.global_slice("crops").start
        eda = streams.text_slice("eda").start
        return {
            "aug_image": F.normalize(self.aug_image_projector(views_raw[crop]).float(), dim=-1),
            "aug_text": F.normalize(self.aug_text_projector(texts_raw[eda]).float(), dim=-1),
            "aug_logit_scale": self.aug_logit_scale.float().exp(),
        }
