"""Layer specs: Transformer Engine when it imports, megatron-core's local (pure PyTorch) otherwise.

The one place the layer implementation is decided: `use_transformer_engine(impl)` reads the
recipe's `model.transformer_impl` (auto | te | local) and is the only caller of the TE import
probe; every block (towers, decoders) and its final norm get their spec from `block_spec`.
What TE needs is checked here too (`check_layer_support`: FP8 GEMMs and `transformer_impl:
te`; which blocks' GEMMs TE can run in FP8 is config/fp8_shapes.py), and the parameter names
the TE spec uses are in models/te_names.py beside it.
"""

from __future__ import annotations

import functools
import importlib
from typing import Optional

import torch
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import (
    CrossAttention,
    CrossAttentionSubmodules,
    SelfAttention,
    SelfAttentionSubmodules,
)
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

from tulip_mega.models.attention import SDPACoreAttention


@functools.lru_cache(maxsize=None)
def transformer_engine_available() -> bool:
    """True when `transformer_engine.pytorch` imports (it needs CUDA, cuDNN and a GPU build)."""
    try:
        importlib.import_module("transformer_engine.pytorch")
    except Exception:  # ImportError, OSError (missing libcudnn), RuntimeError (no CUDA)
        return False
    return True


def use_transformer_engine(impl: str = "auto") -> bool:
    """The single TE-vs-local decision for `model.transformer_impl`: 'auto' = TE when it
    imports, 'te' = TE or a clear error, 'local' = megatron-core's local layers."""
    if impl == "local":
        return False
    available = transformer_engine_available()
    if impl == "te" and not available:
        from tulip_mega.config import ConfigError

        raise ConfigError("model.transformer_impl=te needs Transformer Engine, which does not import on this "
                          "machine; set model.transformer_impl=auto (or local), or install tulip-mega[gpu] on a GPU machine")
    if impl not in ("auto", "te"):
        raise ValueError(f"model.transformer_impl={impl!r}: expected auto, te or local")
    return available


def overrides_where_te_absent() -> list[str]:
    """Recipe overrides that read a Transformer Engine run's checkpoint where TE does not import
    (eval, reshard): local layers and no FP8; nothing where TE imports."""
    if transformer_engine_available():
        return []
    return ["model.transformer_impl=local", "precision.fp8=null"]


def check_layer_support(model_cfg, precision) -> None:
    """The FP8 gate: recipe settings the layer implementation of this machine cannot run,
    refused at launch before any process group exists. FP8 GEMMs need Transformer Engine layers."""
    from tulip_mega.config import ConfigError

    use_te = use_transformer_engine(model_cfg.transformer_impl)
    if precision.fp8 is not None and not use_te:
        why = ("model.transformer_impl=local" if model_cfg.transformer_impl == "local"
               else "Transformer Engine, which does not import on this machine")
        raise ConfigError(
            f"precision.fp8={precision.fp8!r} needs Transformer Engine layers, but this run uses local layers "
            f"({why}); set precision.fp8=null, or install tulip-mega[gpu] on a GPU machine"
        )


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


def _attention_spec(linear_qkv, core_attention, linear_proj, causal: bool = False) -> ModuleSpec:
    # Both towers (and the MAE decoder) attend bidirectionally (SigLIP): no causal mask, no
    # padding mask. Only the caption decoder is causal; megatron builds that mask itself
    # (attention_mask=None), so no mask tensor travels through the block.
    return ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": AttnMaskType.causal if causal else AttnMaskType.no_mask},
        submodules=SelfAttentionSubmodules(
            linear_qkv=linear_qkv, core_attention=core_attention, linear_proj=linear_proj
        ),
    )


def local_layer_spec(causal: bool = False) -> ModuleSpec:
    """Pre-norm encoder layer from megatron-core's pure-PyTorch modules (CPU, tests).

    causal=True gives the same layer with causal self-attention (a decoder layer without
    cross-attention). Core attention is torch's fused SDPA (models/attention.py) rather than
    megatron's DotProductAttention, which materialises the [b, np, s, s] scores.
    """
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=SequenceParallelLayerNorm,
            self_attention=_attention_spec(ColumnParallelLinear, SDPACoreAttention, RowParallelLinear, causal),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=SequenceParallelLayerNorm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def te_layer_spec(causal: bool = False) -> ModuleSpec:
    """Pre-norm encoder layer from Transformer Engine modules (fused LN+GEMM, FP8 capable);
    causal=True makes its self-attention causal."""
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
                TELayerNormColumnParallelLinear, TEDotProductAttention, TERowParallelLinear, causal
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


def _cross_attention_spec(linear, core_attention, linear_proj) -> ModuleSpec:
    # The decoder's queries attend to every context token (the image's patches): no mask.
    return ModuleSpec(
        module=CrossAttention,
        params={"attn_mask_type": AttnMaskType.no_mask},
        submodules=CrossAttentionSubmodules(
            linear_q=linear, linear_kv=linear, core_attention=core_attention, linear_proj=linear_proj
        ),
    )


def cross_decoder_layer_spec(use_te: bool) -> ModuleSpec:
    """A pre-norm decoder layer: causal self-attention, cross-attention to a context (the
    LocCa decoder reads the image's patch tokens), MLP; the T5 decoder layout of megatron-core's
    own specs (megatron/core/models/T5/t5_spec.py), with the towers' attention cores."""
    layer = encoder_layer_spec(use_te, causal=True)
    if use_te:
        from megatron.core.extensions.transformer_engine import (
            TEColumnParallelLinear,
            TEDotProductAttention,
            TENorm,
            TERowParallelLinear,
        )

        cross = _cross_attention_spec(TEColumnParallelLinear, TEDotProductAttention, TERowParallelLinear)
        norm = TENorm
    else:
        cross = _cross_attention_spec(ColumnParallelLinear, SDPACoreAttention, RowParallelLinear)
        norm = SequenceParallelLayerNorm
    sub = layer.submodules
    sub.pre_cross_attn_layernorm = norm
    sub.cross_attention = cross
    sub.cross_attn_bda = get_bias_dropout_add
    return layer


def final_norm_cls(use_te: bool):
    """The norm class for a tower's final LayerNorm (and the MAP head's)."""
    if use_te:
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    return SequenceParallelLayerNorm


def encoder_layer_spec(use_te: Optional[bool] = None, *, causal: bool = False) -> ModuleSpec:
    """One encoder layer's spec; use_te=None means `use_transformer_engine()` ('auto')."""
    if use_te is None:
        use_te = use_transformer_engine()
    return te_layer_spec(causal) if use_te else local_layer_spec(causal)


def block_spec(
    config: TransformerConfig, use_te: Optional[bool] = None, *, causal: bool = False,
    vp_stage: Optional[int] = None, cross_attention: bool = False,
) -> TransformerBlockSubmodules:
    """A tower's TransformerBlock spec: this pipeline stage's encoder layers and a final LayerNorm.

    causal=True (the caption decoder) makes every layer's self-attention causal. The layer count
    comes from `config` and megatron's pipeline rank (and `vp_stage`, the model chunk, under
    interleaved virtual stages); a decoder config with pipeline_model_parallel_size=1
    (models/megatron_config.decoder_config) gets all its layers.
    """
    if use_te is None:
        use_te = use_transformer_engine()
    layer = cross_decoder_layer_spec(use_te) if cross_attention else encoder_layer_spec(use_te, causal=causal)
    return TransformerBlockSubmodules(
        layer_specs=[layer] * get_num_layers_to_build(config, vp_stage),
        layer_norm=final_norm_cls(use_te),
    )
