"""Vision tower pieces around the megatron TransformerBlock: patch embedding and MAP head.

SigLIP layout: conv patchify (with bias) + learned position embedding (resized for inputs of
another size), no class token, no pre-LayerNorm; after the block a final LayerNorm (the
block's) and a multi-head attention-pooling (MAP) head whose output is the image embedding.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.mappings import scatter_to_sequence_parallel_region
from megatron.core.transformer.transformer_config import TransformerConfig

from tulip_mega.models.megatron_config import gelu_tanh


class PatchEmbedding(torch.nn.Module):
    """Images [b, 3, H, W] -> patch tokens [s, b, h] (sequence-scattered under SP).

    Any square input whose side is a multiple of the patch size is accepted: the local crops
    of multi-crop training (e.g. 96 px into a 224 px model) run through the same weights with
    the learned g x g position grid resized to their grid. With `keep_idx` only the listed
    patches are kept (MAE's visible patches), after their position embeddings were added.
    """

    def __init__(self, config: TransformerConfig, image_size: int, patch_size: int) -> None:
        super().__init__()
        self.config = config
        self.patch_size = patch_size
        self.grid = image_size // patch_size
        self.num_patches = self.grid**2
        self.patch_embedding = torch.nn.Conv2d(
            3, config.hidden_size, kernel_size=patch_size, stride=patch_size, bias=True
        )
        self.position_embedding = torch.nn.Parameter(torch.empty(self.num_patches, config.hidden_size))
        # (grid, device) -> resize operator [grid^2, g^2] (float32); a plain attribute, not a
        # buffer or parameter, so it is never saved, trained or counted.
        self._resize_ops: dict[tuple[int, torch.device], torch.Tensor] = {}

    def forward(self, images: torch.Tensor, keep_idx: Optional[torch.Tensor] = None,
                mask: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """images [b, 3, H, W] (H = W, a multiple of the patch size); keep_idx [b, k] int64,
        ascending patch indices (row-major over the grid) to keep per sample, or None for all;
        mask = (masked_idx [b, m], token [h]): those patches' embeddings are replaced by the
        token before the position embedding is added (iBOT / TIPS masked prediction).

        Returns [s, b, h] with s = (H / patch)^2, or [k, b, h] with keep_idx; divided by TP
        along the sequence under sequence parallel.
        """
        grid = self._grid_of(images)
        x = self.patch_embedding(images.to(self.patch_embedding.weight.dtype))  # [b, h, g', g']
        x = x.flatten(2).permute(2, 0, 1)  # [s, b, h]
        if mask is not None:
            x = self._mask(x, *mask)
        x = x + self.position_embedding_for(grid).unsqueeze(1)
        if keep_idx is not None:
            x = self._keep(x, keep_idx)  # [k, b, h]
        if self.config.sequence_parallel:
            tp = self.config.tensor_model_parallel_size
            if x.shape[0] % tp:
                what = "kept (MAE visible) patches" if keep_idx is not None else f"patches of a {grid}x{grid} grid"
                raise ValueError(
                    f"PatchEmbedding: {x.shape[0]} {what} cannot be split evenly over "
                    f"tensor_parallel={tp} under sequence parallel"
                )
            x = scatter_to_sequence_parallel_region(x)  # [s/tp, b, h]
        return x.contiguous()

    def _grid_of(self, images: torch.Tensor) -> int:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"PatchEmbedding: expected images [b, 3, H, W], got shape {tuple(images.shape)}")
        h, w = images.shape[-2:]
        if h != w or h % self.patch_size:
            raise ValueError(
                f"PatchEmbedding: images must be square with a side that is a multiple of "
                f"model.vision.patch_size={self.patch_size}; got H={h}, W={w}"
            )
        return h // self.patch_size

    def position_embedding_for(self, grid: int) -> torch.Tensor:
        """The position embedding [grid^2, h] of a grid x grid input.

        The native grid returns the parameter itself (bit-identical to a fixed-size model).
        Other grids get the learned g x g grid resized by bicubic interpolation with
        align_corners=False and no antialiasing, i.e. exactly
        `F.interpolate(pos [1, h, g, g], size=(grid, grid), mode="bicubic", align_corners=False)`
        as in DINO / Hugging Face `interpolate_pos_encoding` (SigLIP's too), so an exported
        model reproduces it. Interpolation is linear in the embedding, so it is applied as a
        cached [grid^2, g^2] matrix (built once per grid size by interpolating the unit basis)
        times the parameter: recomputed every forward, gradients flow into `position_embedding`
        and the result never goes stale after an optimizer step.
        """
        pos = self.position_embedding
        if grid == self.grid:
            return pos
        key = (grid, pos.device)
        op = self._resize_ops.get(key)
        if op is None:
            op = _bicubic_resize_operator(self.grid, grid).to(device=pos.device, dtype=torch.float32)
            self._resize_ops[key] = op
        # float32 weights and accumulation (as F.interpolate does for bf16), one rounding at the end.
        return (op @ pos.float()).to(pos.dtype)  # [grid^2, h]

    @staticmethod
    def _mask(x: torch.Tensor, masked_idx: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        """x [s, b, h] with rows masked_idx[i] of sample i replaced by `token` [h]."""
        s, b, h = x.shape
        if masked_idx.dim() != 2 or masked_idx.shape[0] != b or masked_idx.shape[1] >= s:
            raise ValueError(f"PatchEmbedding: masked_idx must be [batch={b}, m < {s}], got {tuple(masked_idx.shape)}")
        idx = masked_idx.to(device=x.device, dtype=torch.long).t()  # [m, b]
        hit = torch.zeros(s, b, 1, dtype=torch.bool, device=x.device).scatter_(0, idx.unsqueeze(-1), True)
        return torch.where(hit, token.to(x.dtype).view(1, 1, h), x)

    @staticmethod
    def _keep(x: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
        """x [s, b, h], keep_idx [b, k] -> [k, b, h] with out[j, i] = x[keep_idx[i, j], i]."""
        s, b, h = x.shape
        if keep_idx.dim() != 2 or keep_idx.shape[0] != b:
            raise ValueError(
                f"PatchEmbedding: keep_idx must be [batch={b}, k], got shape {tuple(keep_idx.shape)}"
            )
        if keep_idx.shape[1] > s:
            raise ValueError(f"PatchEmbedding: keep_idx keeps {keep_idx.shape[1]} of only {s} patches")
        idx = keep_idx.to(device=x.device, dtype=torch.long).t()  # [k, b]
        return x.gather(0, idx.unsqueeze(-1).expand(-1, -1, h))


def _bicubic_resize_operator(src: int, dst: int) -> torch.Tensor:
    """The matrix A [dst^2, src^2] with A @ flat(P) = flat(bicubic_resize(P)) for any src x src
    grid P (row-major flattening), built by resizing every unit basis grid; float64 so the
    cached operator adds no rounding of its own."""
    basis = torch.eye(src * src, dtype=torch.float64).view(src * src, 1, src, src)
    out = F.interpolate(basis, size=(dst, dst), mode="bicubic", align_corners=False)  # [src^2, 1, dst, dst]
    return out.view(src * src, dst * dst).t().contiguous()


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
