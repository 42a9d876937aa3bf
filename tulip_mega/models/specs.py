"""Layer specs: Transformer Engine when it imports, megatron-core's local (pure PyTorch) otherwise."""

from __future__ import annotations

import functools
import importlib
from typing import Optional

import torch
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules


@functools.lru_cache(maxsize=None)
def transformer_engine_available() -> bool:
    """True when `transformer_engine.pytorch` imports (it needs CUDA, cuDNN and a GPU build)."""
    try:
        importlib.import_module("transformer_engine.pytorch")
    except Exception:  # ImportError, OSError (missing libcudnn), RuntimeError (no CUDA)
        return False
    return True


class SequenceParallelLayerNorm(torch.nn.LayerNorm):
    """torch LayerNorm that accepts sequence parallel (megatron's WrappedTorchNorm refuses it).

    Under sequence parallel each TP rank normalises a different slice of the sequence, so the
    weight and bias gradients are partial sums; marking the parameters `sequence_parallel`
    makes megatron's `finalize_model_grads` all-reduce them over the TP group.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__(hidden_size, eps=eps)
        for p in self.parameters():
            setattr(p, "sequence_parallel", bool(config.sequence_parallel))


def _attention_spec(linear_qkv, core_attention, linear_proj) -> ModuleSpec:
    # Both towers attend bidirectionally (SigLIP): no causal mask, no padding mask.
    return ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": AttnMaskType.no_mask},
        submodules=SelfAttentionSubmodules(
            linear_qkv=linear_qkv, core_attention=core_attention, linear_proj=linear_proj
        ),
    )


def local_layer_spec() -> ModuleSpec:
    """Pre-norm encoder layer from megatron-core's pure-PyTorch modules (CPU, tests)."""
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=SequenceParallelLayerNorm,
            self_attention=_attention_spec(ColumnParallelLinear, DotProductAttention, RowParallelLinear),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=SequenceParallelLayerNorm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def te_layer_spec() -> ModuleSpec:
    """Pre-norm encoder layer from Transformer Engine modules (fused LN+GEMM, FP8 capable)."""
    from megatron.core.extensions.transformer_engine import (
        TEDotProductAttention,
        TELayerNormColumnParallelLinear,
        TERowParallelLinear,
    )

    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            # The input LayerNorm is fused into linear_qkv, the pre-MLP one into linear_fc1.
            self_attention=_attention_spec(
                TELayerNormColumnParallelLinear, TEDotProductAttention, TERowParallelLinear
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=IdentityOp,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(
                    linear_fc1=TELayerNormColumnParallelLinear, linear_fc2=TERowParallelLinear
                ),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def final_norm_cls(use_te: bool):
    """The norm class for a tower's final LayerNorm (and the MAP head's)."""
    if use_te:
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    return SequenceParallelLayerNorm


def encoder_layer_spec(use_te: Optional[bool] = None) -> ModuleSpec:
    """The single TE-vs-local decision: TE when it imports (unless told otherwise)."""
    if use_te is None:
        use_te = transformer_engine_available()
    return te_layer_spec() if use_te else local_layer_spec()


def block_spec(config: TransformerConfig, use_te: Optional[bool] = None) -> TransformerBlockSubmodules:
    """A tower's TransformerBlock spec: this pipeline stage's encoder layers and a final LayerNorm."""
    if use_te is None:
        use_te = transformer_engine_available()
    return TransformerBlockSubmodules(
        layer_specs=[encoder_layer_spec(use_te)] * get_num_layers_to_build(config),
        layer_norm=final_norm_cls(use_te),
    )
