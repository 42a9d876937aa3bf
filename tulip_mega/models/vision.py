"""Vision tower pieces around the megatron TransformerBlock: patch embedding and MAP head.

SigLIP layout: conv patchify (with bias) + learned position embedding, no class token, no
pre-LayerNorm; after the block a final LayerNorm (the block's) and a multi-head
attention-pooling (MAP) head whose output is the image embedding.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel.mappings import scatter_to_sequence_parallel_region
from megatron.core.transformer.transformer_config import TransformerConfig

from tulip_mega.models.megatron_config import gelu_tanh


class PatchEmbedding(torch.nn.Module):
    """Images [b, 3, H, W] -> patch tokens [s, b, h] (sequence-scattered under SP)."""

    def __init__(self, config: TransformerConfig, image_size: int, patch_size: int) -> None:
        super().__init__()
        self.config = config
        self.num_patches = (image_size // patch_size) ** 2
        self.patch_embedding = torch.nn.Conv2d(
            3, config.hidden_size, kernel_size=patch_size, stride=patch_size, bias=True
        )
        self.position_embedding = torch.nn.Parameter(torch.empty(self.num_patches, config.hidden_size))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(images.to(self.patch_embedding.weight.dtype))  # [b, h, gh, gw]
        x = x.flatten(2).permute(2, 0, 1)  # [s, b, h]
        x = x + self.position_embedding.unsqueeze(1)
        if self.config.sequence_parallel:
            x = scatter_to_sequence_parallel_region(x)  # [s/tp, b, h]
        return x.contiguous()


class MLP(torch.nn.Module):
    """fc1 -> tanh-GELU -> fc2 (the MAP head's MLP, same names as Hugging Face SigLIP)."""

    def __init__(self, hidden: int, ffn: int) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(hidden, ffn)
        self.fc2 = torch.nn.Linear(ffn, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(gelu_tanh(self.fc1(x)))


class MAPHead(torch.nn.Module):
    """Multi-head attention pooling: one learned query attends over all patch tokens.

    Small (one query), so it is replicated on the TP ranks rather than split.
    """

    def __init__(self, hidden: int, num_heads: int, ffn: int, eps: float) -> None:
        super().__init__()
        self.probe = torch.nn.Parameter(torch.empty(1, 1, hidden))
        self.attention = torch.nn.MultiheadAttention(hidden, num_heads, batch_first=True)
        self.layernorm = torch.nn.LayerNorm(hidden, eps=eps)
        self.mlp = MLP(hidden, ffn)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [b, s, h] -> pooled [b, h]."""
        probe = self.probe.expand(tokens.shape[0], -1, -1)  # [b, 1, h]
        x = self.attention(probe, tokens, tokens, need_weights=False)[0]  # [b, 1, h]
        x = x + self.mlp(self.layernorm(x))
        return x[:, 0]
