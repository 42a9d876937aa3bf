"""Reconstruction decoders and the aug projector of the TULIP loss stack (last pipeline stage).

- `MAEDecoder` (facebookresearch/mae): fills the masked positions with a learned mask token and
  predicts the pixels of the masked patches from the visible patches' encodings.
- `CausalTextDecoder`: reconstructs the caption from the text embedding by teacher forcing.
- `AugProjector` (clip-rocket): the MLP projector of the aug <-> aug InfoNCE term.
- `DistillHead` (DINO, used by SILC and TIPS): the projection head of the self-distillation terms.

The decoders are megatron `TransformerBlock`s (TP-split, sequence-parallel); their small
projections are replicated across TP, the caption decoder's vocabulary layers vocab-parallel.
Every parameter is in `sharded_state_dict()`, so models/init.py initialises it under any layout.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, VocabParallelEmbedding
from megatron.core.tensor_parallel.mappings import (
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig

from tulip_mega.models.specs import block_spec


def _check_sequence_split(config: TransformerConfig, seq: int, what: str, owner: str) -> None:
    if config.sequence_parallel and seq % config.tensor_model_parallel_size:
        raise ValueError(
            f"{owner}: {what}={seq} is not divisible by tensor_parallel={config.tensor_model_parallel_size}, "
            "which sequence parallel needs (the sequence is split evenly across TP ranks)"
        )


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [s, b, d], idx [b, n] -> [n, b, d] with out[j, i] = x[idx[i, j], i]."""
    return x.gather(0, idx.t().unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class MAEDecoder(MegatronModule):
    """Lightweight MAE decoder (He et al. 2022) on the last pipeline stage.

    visible tokens -> Linear(h_v, d) -> scattered into the full patch sequence with a learned
    mask token at the masked positions -> + learned decoder position embedding -> bidirectional
    TransformerBlock (+ final LayerNorm) -> masked positions only -> Linear(d, p*p*3).
    The prediction's last dimension is a patch in MAE's `patchify` order (p, p, 3), which the
    loss (`tulip_mega.losses.reconstruction`) defines. MAE uses fixed 2-D sin-cos decoder
    positions; learned ones are used here (as for the towers), initialised with the rest.
    """

    def __init__(
        self,
        config: TransformerConfig,
        vision_hidden: int,
        num_patches: int,
        patch_size: int,
        use_te: Optional[bool] = None,
    ) -> None:
        super().__init__(config=config)
        _check_sequence_split(config, num_patches, "num_patches", "MAEDecoder")
        d = config.hidden_size
        self.num_patches = num_patches
        self.decoder_embed = torch.nn.Linear(vision_hidden, d)
        self.mask_token = torch.nn.Parameter(torch.empty(1, 1, d))
        self.position_embedding = torch.nn.Parameter(torch.empty(num_patches, d))
        self.decoder = TransformerBlock(config, block_spec(config, use_te), pre_process=True, post_process=True)
        self.decoder_pred = torch.nn.Linear(d, patch_size * patch_size * 3)

    def forward(self, visible: torch.Tensor, visible_idx: torch.Tensor, masked_idx: torch.Tensor) -> torch.Tensor:
        """visible [k, b, h_v]: the vision tower's final (normed) hidden states of the visible
        patches, full sequence on every TP rank (not SP-split); visible_idx [b, k] and
        masked_idx [b, m] (k + m = num_patches) int64, ascending.
        Returns pred [b, m, patch*patch*3] for the masked patches in masked_idx order."""
        k, b, _ = visible.shape
        m = masked_idx.shape[-1]
        if tuple(visible_idx.shape) != (b, k) or masked_idx.dim() != 2 or masked_idx.shape[0] != b:
            raise ValueError(
                f"MAEDecoder: visible [k={k}, b={b}, h] needs visible_idx [{b}, {k}] and masked_idx [{b}, m]; "
                f"got visible_idx {tuple(visible_idx.shape)}, masked_idx {tuple(masked_idx.shape)}"
            )
        if k + m != self.num_patches:
            raise ValueError(f"MAEDecoder: {k} visible + {m} masked patches != num_patches={self.num_patches}")
        x = self.decoder_embed(visible)  # [k, b, d]
        d = x.shape[-1]
        full = self.mask_token.to(x.dtype).expand(self.num_patches, b, d)  # [P, b, d]
        index = visible_idx.to(device=x.device, dtype=torch.long).t().unsqueeze(-1).expand(k, b, d)
        full = full.scatter(0, index, x)  # visible tokens at their positions, mask token elsewhere
        full = full + self.position_embedding.to(x.dtype).unsqueeze(1)
        if self.config.sequence_parallel:
            full = scatter_to_sequence_parallel_region(full)  # [P/tp, b, d]
        hidden = self.decoder(full.contiguous(), attention_mask=None)  # [P(/tp), b, d], final-normed
        if self.config.sequence_parallel:
            # The prediction head is replicated: every TP rank needs the whole sequence.
            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
        hidden = gather_rows(hidden, masked_idx.to(device=hidden.device, dtype=torch.long))  # [m, b, d]
        return self.decoder_pred(hidden).transpose(0, 1)  # [b, m, p*p*3]


class CausalTextDecoder(MegatronModule):
    """Causal caption decoder conditioned on the text embedding, teacher forcing (TULIP's text
    reconstruction).

    Input sequence of length L: position 0 is Linear(e, d)(text_emb), the conditioning prefix;
    positions 1..L-1 are the token embeddings of tokens[:, :-1]; learned absolute positions
    are added to all L. Causal self-attention, final LayerNorm, vocabulary-parallel output
    layer: position i sees the prefix and tokens[:, :i] and predicts tokens[:, i], never the
    token it predicts. Conditioning by a prefix token is what a decoder-only model does; a
    T5-style decoder would instead cross-attend to the embedding as a one-vector memory, which
    is equivalent up to a projection (attention over a single key returns its value for every
    query) but costs a cross-attention per layer.
    """

    def __init__(
        self,
        config: TransformerConfig,
        embed_dim: int,
        vocab_size: int,
        context_length: int,
        use_te: Optional[bool] = None,
    ) -> None:
        super().__init__(config=config)
        _check_sequence_split(config, context_length, "context_length", "CausalTextDecoder")
        if vocab_size % config.tensor_model_parallel_size:
            raise ValueError(
                f"CausalTextDecoder: vocab_size={vocab_size} is not divisible by "
                f"tensor_parallel={config.tensor_model_parallel_size} (the vocabulary is split across TP)"
            )
        d = config.hidden_size
        self.context_length = context_length
        self.prefix_projection = torch.nn.Linear(embed_dim, d)
        self.word_embeddings = VocabParallelEmbedding(
            vocab_size, d, init_method=config.init_method, config=config
        )
        self.position_embeddings = torch.nn.Embedding(context_length, d)
        self.decoder = TransformerBlock(
            config, block_spec(config, use_te, causal=True), pre_process=True, post_process=True
        )
        # Under sequence parallel this layer all-gathers its SP-split input itself (as GPT's).
        self.output_layer = ColumnParallelLinear(
            d, vocab_size, config=config, init_method=config.init_method, bias=False, gather_output=False
        )

    def forward(self, text_emb: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """text_emb [b, e] (the text head's output), tokens [b, L] (caption ids, right-padded,
        L <= context_length). Returns logits [L, b, vocab/tp], vocabulary-parallel (each TP rank
        a contiguous slice, megatron's convention); position i predicts tokens[:, i]."""
        b, L = tokens.shape
        if L > self.context_length or tuple(text_emb.shape[:1]) != (b,):
            raise ValueError(
                f"CausalTextDecoder: tokens [b, L] with L <= context_length={self.context_length} and "
                f"text_emb [b, e] with the same b; got tokens {tuple(tokens.shape)}, text_emb {tuple(text_emb.shape)}"
            )
        prefix = self.prefix_projection(text_emb.to(self.prefix_projection.weight.dtype))  # [b, d]
        words = self.word_embeddings(tokens[:, :-1])  # [b, L-1, d], complete on every TP rank
        x = torch.cat([prefix.unsqueeze(1).to(words.dtype), words], dim=1)  # [b, L, d]
        x = x + self.position_embeddings.weight[:L].to(x.dtype)
        x = x.transpose(0, 1).contiguous()  # [L, b, d]
        if self.config.sequence_parallel:
            x = scatter_to_sequence_parallel_region(x)  # [L/tp, b, d]
        hidden = self.decoder(x, attention_mask=None)  # causal mask built by megatron
        logits, _ = self.output_layer(hidden)  # [L, b, vocab/tp]
        return logits


class AugProjector(torch.nn.Module):
    """clip-rocket's separate MLP projector for the aug <-> aug InfoNCE:
    Linear(e, hidden) -> GELU -> Linear(hidden, e).

    Small next to the towers, so replicated on the TP ranks (a plain torch module: megatron's
    default sharded state dict treats it as replicated)."""

    def __init__(self, embed_dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(embed_dim, hidden)
        self.act = torch.nn.GELU()
        self.fc2 = torch.nn.Linear(hidden, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., e] -> [..., e]."""
        return self.fc2(self.act(self.fc1(x)))


class DistillHead(torch.nn.Module):
    """DINO's projection head (Caron et al. 2021, `DINOHead`), which SILC and TIPS use for
    SigLIP 2's self-distillation terms: a three-layer MLP (GELU) to a bottleneck, L2
    normalisation, then a bias-free layer onto K prototypes whose rows are L2-normalised at
    every forward (DINO's weight-normalised last layer with the norm fixed to 1).

    Small next to the towers (K x bottleneck dominates), so replicated on the TP ranks."""

    def __init__(self, in_dim: int, hidden: int, bottleneck: int, prototypes: int) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(in_dim, hidden)
        self.fc2 = torch.nn.Linear(hidden, hidden)
        self.fc3 = torch.nn.Linear(hidden, bottleneck)
        self.prototypes = torch.nn.Linear(bottleneck, prototypes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_dim] -> logits [..., prototypes] (float32 softmax inputs come later)."""
        x = self.fc3(F.gelu(self.fc2(F.gelu(self.fc1(x)))))
        x = F.normalize(x, dim=-1)
        return F.linear(x, F.normalize(self.prototypes.weight, dim=-1))


class LoccaDecoder(MegatronModule):
    """SigLIP 2's LocCa decoder (Wan et al. 2024): a causal transformer decoder whose layers
    cross-attend to the vision tower's un-pooled patch tokens of view 0, over its own
    vocabulary (text tokens, location tokens, task tokens, mask; losses/locca.py).

    Input: learned token + position embeddings of the task-major sequences [cap | aref | gcap];
    context: Linear(h_v, d) of the patch tokens, shared by the three sequences of an image.
    Layers TP-split like the towers (megatron's CrossAttention in the T5 decoder layout); the
    output layer vocabulary-parallel, as the caption decoder's.
    """

    def __init__(self, config: TransformerConfig, vision_hidden: int, vocab_size: int, length: int,
                 use_te: Optional[bool] = None) -> None:
        super().__init__(config=config)
        _check_sequence_split(config, length, "the LocCa sequence length", "LoccaDecoder")
        if vocab_size % config.tensor_model_parallel_size:
            raise ValueError(f"LoccaDecoder: vocab_size={vocab_size} is not divisible by "
                             f"tensor_parallel={config.tensor_model_parallel_size}")
        d = config.hidden_size
        self.length = length
        self.context_projection = torch.nn.Linear(vision_hidden, d)
        self.word_embeddings = VocabParallelEmbedding(vocab_size, d, init_method=config.init_method, config=config)
        self.position_embeddings = torch.nn.Embedding(length, d)
        self.decoder = TransformerBlock(
            config, block_spec(config, use_te, cross_attention=True), pre_process=True, post_process=True
        )
        self.output_layer = ColumnParallelLinear(
            d, vocab_size, config=config, init_method=config.init_method, bias=False, gather_output=False
        )

    def forward(self, patches: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """patches [P, b, h_v]: view 0's final (normed) patch tokens, full sequence on every TP
        rank; inputs [k * b, Ld] int64, k sequences per image, task-major (row t*b + i belongs
        to image i). Returns logits [Ld, k * b, vocab / TP]."""
        n, length = inputs.shape
        b = patches.shape[1]
        if n % b or length != self.length:
            raise ValueError(f"LoccaDecoder: inputs [k*b, {self.length}] for b={b} images, got {tuple(inputs.shape)}")
        context = self.context_projection(patches.to(self.context_projection.weight.dtype))  # [P, b, d]
        context = context.repeat(1, n // b, 1)  # [P, k*b, d], the same image for its k sequences
        x = self.word_embeddings(inputs)  # [k*b, Ld, d]
        x = (x + self.position_embeddings.weight.to(x.dtype)).transpose(0, 1).contiguous()  # [Ld, k*b, d]
        if self.config.sequence_parallel:
            x = scatter_to_sequence_parallel_region(x)
            context = scatter_to_sequence_parallel_region(context.contiguous())
        hidden = self.decoder(x, attention_mask=None, context=context.to(x.dtype), context_mask=None)
        logits, _ = self.output_layer(hidden)
        return logits
