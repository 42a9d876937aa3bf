"""Core attention for the local (no Transformer Engine) layer spec, on torch's fused SDPA.

megatron-core's `DotProductAttention` materialises the [b, np, sq, sk] scores and runs an
unfused softmax: slow and memory hungry on a GPU without Transformer Engine.
`SDPACoreAttention` replaces the `core_attention` submodule of megatron's `SelfAttention` (same
constructor keywords, forward signature, layouts, softmax scale and dropout) with
`F.scaled_dot_product_attention`. It supports what our towers use, no mask and causal
self-attention (with grouped-query attention); any other setting raises, naming it.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import is_layer_window_attention
from megatron.core.utils import divide

_SUPPORTED_MASKS = (AttnMaskType.no_mask, AttnMaskType.causal)


def _check_supported(config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType) -> None:
    """Raise for a setting SDPA cannot compute like megatron's attention (named in the error)."""
    if config.context_parallel_size != 1:
        raise NotImplementedError(
            f"SDPACoreAttention: context_parallel_size={config.context_parallel_size} is not "
            "supported (context parallelism needs TEDotProductAttention)"
        )
    if config.softmax_type != "vanilla":
        raise NotImplementedError(
            f"SDPACoreAttention: softmax_type={config.softmax_type!r} is not supported "
            "(only 'vanilla'; use megatron's DotProductAttention)"
        )
    if config.qk_clip:
        raise NotImplementedError(
            "SDPACoreAttention: qk_clip needs the attention logits, which SDPA does not expose"
        )
    if is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number):
        raise NotImplementedError(
            f"SDPACoreAttention: sliding-window attention (window_size={config.window_size}) "
            "is not supported"
        )
    if attn_mask_type not in _SUPPORTED_MASKS:
        raise NotImplementedError(
            f"SDPACoreAttention: attn_mask_type={attn_mask_type} is not supported "
            "(only no_mask and causal)"
        )


def _check_inputs(attention_mask: Optional[torch.Tensor], attention_bias: Optional[torch.Tensor],
                  packed_seq_params: Optional[PackedSeqParams], mask_type: AttnMaskType) -> None:
    """Raise for forward inputs SDPACoreAttention does not support."""
    if packed_seq_params is not None:
        raise NotImplementedError("SDPACoreAttention: packed sequences (packed_seq_params) are not supported")
    if attention_bias is not None:
        raise NotImplementedError("SDPACoreAttention: attention_bias is not supported")
    if attention_mask is not None:
        raise NotImplementedError(
            "SDPACoreAttention: an explicit attention_mask (padding / arbitrary mask) is not "
            f"supported, got a tensor of shape {tuple(attention_mask.shape)}; pass "
            "attention_mask=None with attn_mask_type no_mask or causal"
        )
    if mask_type not in _SUPPORTED_MASKS:
        raise NotImplementedError(
            f"SDPACoreAttention: attn_mask_type={mask_type} is not supported (only no_mask and causal)"
        )


class SDPACoreAttention(MegatronModule):
    """megatron `core_attention` computed with `F.scaled_dot_product_attention`.

    Constructor keywords are the ones megatron-core 0.16.1's `Attention.__init__` passes to
    `submodules.core_attention` (see `CoreAttentionBuilder` in
    megatron/core/transformer/attention.py); `attention_dropout` overrides
    `config.attention_dropout` as in `DotProductAttention`. The module has no parameters, so
    checkpoints of the local spec are unchanged.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ) -> None:
        super().__init__(config=config)
        self.config: TransformerConfig = config
        _check_supported(config, layer_number, attn_mask_type)

        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type

        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        elif not hasattr(pg_collection, "tp"):
            raise ValueError("SDPACoreAttention: pg_collection must have a 'tp' process group")
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp  # MegatronModule.sharded_state_dict reads it

        # Per attention head and per TP partition sizes, as in DotProductAttention.
        tp_size = pg_collection.tp.size()
        projection_size = config.kv_channels * config.num_attention_heads
        self.hidden_size_per_partition = divide(projection_size, tp_size)
        self.hidden_size_per_attention_head = divide(projection_size, config.num_attention_heads)
        self.num_attention_heads_per_partition = divide(config.num_attention_heads, tp_size)
        self.num_query_groups_per_partition = divide(config.num_query_groups, tp_size)

        # DotProductAttention multiplies q.k by softmax_scale / layer_number and then (with
        # apply_query_key_layer_scaling) the softmax input by layer_number again: a guard
        # against fp16 overflow of the unfused scores, with net scale `softmax_scale`. SDPA's
        # kernels accumulate the scores in fp32, so only the net scale is applied here.
        if softmax_scale is None:
            softmax_scale = 1.0 / math.sqrt(self.hidden_size_per_attention_head)
        self.softmax_scale = softmax_scale
        self.dropout_p = float(config.attention_dropout if attention_dropout is None else attention_dropout)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> torch.Tensor:
        """query [sq, b, np, hn], key/value [sk, b, ng, hn] -> context [sq, b, np * hn].

        `attn_mask_type` (what SelfAttention and its selective-recompute wrapper pass) wins
        over the constructor's when given; the mask itself must be None (megatron builds the
        causal mask itself; SDPA's is_causal does the same without a tensor).
        """
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        _check_inputs(attention_mask, attention_bias, packed_seq_params, mask_type)
        sq, sk = query.size(0), key.size(0)
        # DotProductAttention: a single query (KV-cache decoding) attends to everything.
        is_causal = mask_type == AttnMaskType.causal and sq > 1
        if is_causal and sq != sk:
            raise ValueError(f"SDPACoreAttention: causal mask is only for self attention, got sq={sq}, sk={sk}")

        # Grouped-query attention: repeat each key/value group over its query heads, as
        # DotProductAttention does. [sk, b, ng, hn] -> [sk, b, np, hn]
        groups = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        if groups > 1:
            key = key.repeat_interleave(groups, dim=2)
            value = value.repeat_interleave(groups, dim=2)

        # [s, b, n, hn] -> [b, n, s, hn] (views; SDPA needs only the last dim contiguous)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        context = self._attend(q, k, v, is_causal)
        # [b, np, sq, hn] -> [sq, b, np, hn] -> [sq, b, np * hn]
        context = context.permute(2, 0, 1, 3).contiguous()
        return context.view(sq, context.size(1), self.hidden_size_per_partition)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool) -> torch.Tensor:
        """SDPA over [b, n, s, hn] views, with dropout only in training."""
        dropout_p = self.dropout_p if self.training else 0.0
        # Same RNG stream as DotProductAttention: TP ranks hold different heads, so dropout
        # draws from the model-parallel tracker (different per TP rank).
        fork = dropout_p > 0.0 and not self.config.sequence_parallel
        with tensor_parallel.get_cuda_rng_tracker().fork() if fork else contextlib.nullcontext():
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=is_causal,
                                                  scale=self.softmax_scale)
