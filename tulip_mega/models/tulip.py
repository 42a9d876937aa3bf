"""The two-tower TULIP / SigLIP model as one megatron module per pipeline stage.

Like big_vision's two_towers: towers, pool, project, normalise; the model owns the logit
scale and bias and returns the embeddings. Under pipeline parallel every stage holds a
contiguous slice of the vision layers AND of the text layers; the first stage also holds the
embeddings, the last stage the final norms, the heads and the logit scale/bias. Between
stages both towers' activations travel packed in one tensor (models/packing.py).
"""

from __future__ import annotations

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

from tulip_mega.models.packing import TowerActivationPacker
from tulip_mega.models.specs import block_spec
from tulip_mega.models.vision import MAPHead, PatchEmbedding


class TulipModel(MegatronModule):
    """One pipeline stage of the two-tower model.

    forward(images [b,3,H,W], tokens [b,L]) returns, on the last stage, a dict with
    L2-normalised `image_emb` / `text_emb` [b, e], `logit_scale` (already exp'd) and
    `logit_bias`; on other stages the packed activations for the next stage.
    """

    def __init__(
        self,
        vision_config: TransformerConfig,
        text_config: TransformerConfig,
        model_cfg,
        pre_process: bool = True,
        post_process: bool = True,
        use_te: Optional[bool] = None,
    ) -> None:
        # The vision config doubles as the model's config for megatron's schedules/DDP.
        super().__init__(config=vision_config)
        self.model_type = ModelType.encoder_or_decoder  # one pipeline of stages (both towers per stage)
        self.share_embeddings_and_output_weights = False  # no tied input/output embedding to sync across PP
        v, t = model_cfg.vision, model_cfg.text
        self.pre_process = pre_process
        self.post_process = post_process
        self.text_config = text_config
        self.context_length = t.context_length
        if pre_process:
            self.vision_embed = PatchEmbedding(vision_config, v.image_size, v.patch_size)
            self.text_embed = LanguageModelEmbedding(
                config=text_config,
                vocab_size=t.vocab_size,
                max_sequence_length=t.context_length,
                position_embedding_type="learned_absolute",
            )
        self.vision_block = TransformerBlock(
            vision_config, block_spec(vision_config, use_te), pre_process=pre_process, post_process=post_process
        )
        self.text_block = TransformerBlock(
            text_config, block_spec(text_config, use_te), pre_process=pre_process, post_process=post_process
        )
        if post_process:
            # SigLIP: the image embedding is the MAP output (width = vision hidden); the text
            # head projects the last token to that width.
            self.vision_head = MAPHead(v.hidden_size, v.num_heads, v.ffn_hidden_size, model_cfg.layernorm_eps)
            self.text_head = torch.nn.Linear(t.hidden_size, v.hidden_size)
            self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(model_cfg.temperature_init)))
            self.logit_bias = torch.nn.Parameter(torch.tensor(float(model_cfg.bias_init)))
        tp = vision_config.tensor_model_parallel_size if vision_config.sequence_parallel else 1
        self.packer = TowerActivationPacker(
            vision_seq=(v.image_size // v.patch_size) ** 2 // tp,
            vision_hidden=v.hidden_size,
            text_seq=t.context_length // tp,
            text_hidden=t.hidden_size,
        )

    def packed_shape(self, micro_batch: int) -> tuple[int, int, int]:
        """The (rows, micro_batch, width) tensor this stage sends to / receives from its pipeline
        neighbours for a forward of `micro_batch` samples (pass to the schedule's
        adjust_tensor_shapes_fn)."""
        return self.packer.shape(micro_batch)

    def set_input_tensor(self, input_tensor) -> None:
        """Called by megatron's schedule with the tensor received from the previous stage."""
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        if input_tensor is None:
            return
        vision, text = self.packer.unpack(input_tensor)
        self.vision_block.set_input_tensor(vision)
        self.text_block.set_input_tensor(text)

    def forward(self, images: Optional[torch.Tensor] = None, tokens: Optional[torch.Tensor] = None):
        vision = text = None
        if self.pre_process:
            vision = self.vision_embed(images)  # [s_v, b, h_v]
            b, L = tokens.shape
            position_ids = torch.arange(L, device=tokens.device).unsqueeze(0).expand(b, L)
            text = self.text_embed(tokens, position_ids)  # [s_t, b, h_t]
        vision = self.vision_block(vision, attention_mask=None)
        text = self.text_block(text, attention_mask=None)
        if not self.post_process:
            return self.packer.pack(vision, text)  # [rows, b, W]
        return self.embed(vision, text)

    def embed(self, vision: torch.Tensor, text: torch.Tensor) -> dict:
        """Final hidden states -> normalised embeddings, scale and bias (last stage only)."""
        if self.config.sequence_parallel:
            # Heads are replicated across TP: every rank needs the full sequences.
            vision = gather_from_sequence_parallel_region(vision, tensor_parallel_output_grad=False)
            text = gather_from_sequence_parallel_region(text, tensor_parallel_output_grad=False)
        image_emb = self.vision_head(vision.transpose(0, 1))  # [b, h_v]
        text_emb = self.text_head(text[-1])  # last token -> [b, h_v]
        return {
            "image_emb": F.normalize(image_emb.float(), dim=-1),
            "text_emb": F.normalize(text_emb.float(), dim=-1),
            "logit_scale": self.logit_scale.float().exp(),
            "logit_bias": self.logit_bias.float(),
        }
